"""A candidate for the service's causal LM loss, measured against transformers' own on the GPU
(`gpu_mfu.py --lean-loss`) before the service takes it.

transformers' `ForCausalLMLoss` upcasts the logits to float32 and takes `log_softmax`. Under
`compile`, the device profile of 2026-12-04 (GPT-2 124M, batch 32 x 1024, vocab 50,304: 1.65 G
logits) shows its forward and its backward as one reduction kernel of 3.3 ms each, 9% of a
step: about what writing a float32 copy of the logits (6.6 GB) and reading it back costs.

`lean_causal_lm_loss` computes the same numbers, in float32, but keeps only the logits as they
came (bf16) and one log-sum-exp per row for the backward, whose gradient is then one
elementwise pass: softmax minus the one-hot target, scaled. Same signature and reductions as
`ForCausalLMLoss` (a sum over the labelled tokens divided by `num_items_in_batch`, or their
mean), so it drops in as `model.loss_function`.
"""

from typing import Any

import torch
from torch.nn import functional


class _LeanCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `logits` (rows, classes) against `targets` (rows); a row whose
    target is `ignore_index` adds nothing to the loss nor to the gradient."""

    @staticmethod
    def forward(
        ctx: Any, logits: torch.Tensor, targets: torch.Tensor, ignore_index: int
    ) -> torch.Tensor:
        labelled = targets != ignore_index
        safe_targets = torch.where(labelled, targets, 0)
        wide = logits.float()
        log_sum_exp = torch.logsumexp(wide, dim=-1)
        target_logits = wide.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
        ctx.save_for_backward(logits, safe_targets, labelled, log_sum_exp)
        return torch.where(labelled, log_sum_exp - target_logits, 0.0).sum()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        logits, safe_targets, labelled, log_sum_exp = ctx.saved_tensors
        probabilities = torch.exp(logits.float() - log_sum_exp.unsqueeze(-1))
        # A comparison, not a one-hot tensor: under compile it fuses into the same pass.
        classes = torch.arange(logits.shape[-1], device=logits.device)
        is_target = classes == safe_targets.unsqueeze(-1)
        scale = (grad * labelled).unsqueeze(-1)
        return ((probabilities - is_target.float()) * scale).to(logits.dtype), None, None


def lean_causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    vocab_size: int,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
    **_: Any,
) -> torch.Tensor:
    """`transformers`' `ForCausalLMLoss`, computed with `_LeanCrossEntropy`."""
    if shift_labels is None:  # tokens < n predict n, as transformers shifts them
        shift_labels = functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    logits = logits.reshape(-1, vocab_size)
    targets = shift_labels.reshape(-1).to(logits.device)
    total = _LeanCrossEntropy.apply(logits, targets, ignore_index)
    if num_items_in_batch is None:
        return total / (targets != ignore_index).sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch
