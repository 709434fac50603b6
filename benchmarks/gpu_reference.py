"""The references `gpu_mfu.py` measures the service against, on the same data and settings.

- `bare_training`: the training loop an engineer writes by hand, with no Trainer and no
  callbacks: bf16 autocast, fused AdamW (on either device, as the service), gradient clipping
  at 1.0, the same linear schedule, optionally `torch.compile`, and the loss and gradient norm
  read on the host as often as the service logs them. Given the Hugging Face model, it tells
  what the service's loop costs; given `MinimalGPT`, what the Hugging Face model code costs.
- `MinimalGPT`: GPT-2 written as nanoGPT writes it (one fused QKV projection, SDPA with
  `is_causal`, tanh GELU, tied embeddings) from a `GPT2Config`: the same function, parameters
  and dropouts as Hugging Face's GPT-2, so the same FLOPs per token, and it can start from the
  same weights.
"""

import math
import time
from typing import Any

import torch
from torch import nn
from torch.nn import functional
from transformers import GPT2Config

# Where each parameter of `MinimalGPT` lives in a Hugging Face GPT2LMHeadModel.
_GPT2_NAMES = {
    "token_embedding": "wte",
    "position_embedding": "wpe",
    "blocks": "h",
    "qkv": "attn.c_attn",
    "attention_out": "attn.c_proj",
    "mlp_in": "mlp.c_fc",
    "mlp_out": "mlp.c_proj",
}
_GPT2_CONV1D = {"qkv", "attention_out", "mlp_in", "mlp_out"}  # weights stored (in, out)


class _Block(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        width = config.n_embd
        self.heads = config.n_head
        self.ln_1 = nn.LayerNorm(width, eps=config.layer_norm_epsilon)
        self.qkv = nn.Linear(width, 3 * width)
        self.attention_out = nn.Linear(width, width)
        self.ln_2 = nn.LayerNorm(width, eps=config.layer_norm_epsilon)
        self.mlp_in = nn.Linear(width, 4 * width)
        self.mlp_out = nn.Linear(4 * width, width)
        self.attention_dropout = config.attn_pdrop
        self.residual_dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(width, dim=2)
        q, k, v = (t.view(batch, length, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        attended = functional.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attention_dropout if self.training else 0.0, is_causal=True
        )
        attended = attended.transpose(1, 2).reshape(batch, length, width)
        x = x + self.residual_dropout(self.attention_out(attended))
        hidden = functional.gelu(self.mlp_in(self.ln_2(x)), approximate="tanh")
        return x + self.residual_dropout(self.mlp_out(hidden))


class MinimalGPT(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.n_embd)
        self.position_embedding = nn.Embedding(config.n_positions, config.n_embd)
        self.embedding_dropout = nn.Dropout(config.embd_pdrop)
        self.blocks = nn.ModuleList(_Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.token_embedding.weight

    @torch.no_grad()
    def copy_gpt2_weights(self, gpt2: nn.Module) -> None:
        """Take the weights of a Hugging Face GPT2LMHeadModel of the same config."""
        source = gpt2.state_dict()
        for name, parameter in self.named_parameters():  # the tied lm_head is not listed again
            *path, kind = name.split(".")
            value = source["transformer." + ".".join(_GPT2_NAMES.get(p, p) for p in [*path, kind])]
            parameter.copy_(value.T if kind == "weight" and path[-1] in _GPT2_CONV1D else value)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.token_embedding(input_ids) + self.position_embedding(positions)
        x = self.embedding_dropout(x)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        # Labels are the inputs, shifted here as Hugging Face models shift them: padding the
        # labels, not slicing the logits, so the vocabulary-wide logits are never copied.
        next_tokens = functional.pad(labels, (0, 1), value=-100)[:, 1:]
        return functional.cross_entropy(logits.flatten(0, 1).float(), next_tokens.flatten())


def bare_training(
    model: nn.Module,
    loader: Any,
    *,
    steps: int,
    warmup: int,
    learning_rate: float,
    compile_model: bool,
    log_every: int,
) -> tuple[float, dict[str, Any]]:
    """Train `steps` optimizer steps; seconds from the end of step `warmup` to the end of the last.

    The loader yields `{"input_ids", "labels"}` batches; `model` is a Hugging Face causal LM or a
    `MinimalGPT`, whose forward returns the loss itself.
    """
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    bf16 = cuda and torch.cuda.is_bf16_supported()
    if cuda:
        torch.backends.cuda.matmul.fp32_precision = "tf32"
    model.to(device).train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=learning_rate, weight_decay=0.0, fused=True
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    forward = torch.compile(model) if compile_model else model
    marks: dict[int, float] = {}
    logged = {"loss": math.nan, "grad_norm": math.nan}
    step = 0
    while step < steps:
        for batch in loader:
            input_ids = batch["input_ids"].to(device, non_blocking=True)
            labels = batch["labels"].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                output = forward(input_ids=input_ids, labels=labels)
                loss = output if isinstance(output, torch.Tensor) else output.loss
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % log_every == 0:
                logged = {"loss": loss.item(), "grad_norm": grad_norm.item()}
            if step in (warmup, steps):
                if cuda:
                    torch.cuda.synchronize()
                marks[step] = time.perf_counter()
            if step == steps:
                break
    settings = {
        "bf16": bf16,
        "optim": "adamw_torch_fused",
        "tf32": cuda,
        "torch_compile": compile_model,
        "last_logged": logged,
    }
    return marks[steps] - marks[warmup], settings
