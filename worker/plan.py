"""What a job will do with its data, before it spends GPU time: the dry run's answer, which
every training job reports too, so the two can be compared.

Peak memory is an estimate for the training device, not a measurement:
- weights, gradients and AdamW's two moments: 16 bytes per trainable parameter (fp32 master
  weights and states, as Trainer keeps them also under bf16 autocast), plus 4 bytes per frozen
  parameter (a LoRA job's base);
- activations: about 34 * hidden_size values per token per layer (Korthikanti et al., 2022,
  with memory-efficient attention), 2 bytes each under bf16, 4 under fp32;
- logits: batch * block * vocab in fp32, twice (the values and their gradient).
"""

import math
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from shared.models import Dataset
from shared.schemas import Hyperparameters
from worker.auto_hyperparameters import resolve, resolve_block_size
from worker.collate import Mode, collator_mode
from worker.data import PreparedData, iter_records, prepare_data, steps_per_epoch
from worker.lease import Lease
from worker.masking import render_marked, tokenize_example
from worker.trainer import describe_device, use_bf16

ACTIVATION_VALUES_PER_HIDDEN = 34
RENDERED_EXAMPLES = 3


@dataclass
class Plan:
    data: PreparedData
    hyperparameters: Hyperparameters  # every "auto" resolved
    total_steps: int
    report: dict[str, Any]  # the job's `plan`


def training_steps(rows: int, hp: Hyperparameters) -> int:
    """Optimizer steps, as Trainer counts them (max_steps wins over epochs)."""
    if hp.max_steps:
        return hp.max_steps
    per_epoch = steps_per_epoch(rows, int(hp.batch_size), hp.gradient_accumulation_steps)
    return max(1, math.ceil(float(hp.epochs) * per_epoch))


def peak_memory_bytes(model: PreTrainedModel, hp: Hyperparameters, *, bf16: bool) -> int:
    parameters = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    config = model.config.get_text_config()
    tokens = int(hp.batch_size) * int(hp.block_size)
    activations = tokens * config.num_hidden_layers * ACTIVATION_VALUES_PER_HIDDEN
    activations *= config.hidden_size * (2 if bf16 else 4)
    logits = 2 * tokens * config.vocab_size * 4
    return 16 * trainable + 4 * (parameters - trainable) + activations + logits


def collation(model: PreTrainedModel, shape: str) -> Mode:
    """Text is cut into equal blocks; masked shapes are packed when the attention keeps packed
    examples apart (`worker.collate`)."""
    return "blocks" if shape == "text" else collator_mode(model)


def plan(
    lease: Lease,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    dataset: Dataset,
    validation: Dataset | None,
    validation_split: float,
    hyperparameters: Hyperparameters,
    method: str,
    truncation: str,
    max_positions: int | None,
) -> Plan:
    """Tokenize and pack the data (or take it from the cache), resolve `auto`, and report."""
    block_size = resolve_block_size(hyperparameters, max_positions)
    hyperparameters = hyperparameters.model_copy(update={"block_size": block_size})
    mode = collation(model, dataset.shape)
    data = prepare_data(
        tokenizer,
        dataset,
        validation,
        validation_split,
        block_size=block_size,
        seed=hyperparameters.seed,
        truncation=truncation,
        mode=mode,
        use_cache=True,
        on_progress=lease.keep_going,
    )
    hp = resolve(
        hyperparameters,
        train_tokens=data.train_stats.tokens,
        train_blocks=len(data.train),
        parameters=sum(p.numel() for p in model.parameters()),
        method=method,
    )
    steps = training_steps(len(data.train), hp)
    train, held_out = data.train_stats, data.eval_stats
    report = {
        "examples": train.examples + held_out.examples,
        "train_examples": train.examples,
        "eval_examples": held_out.examples,
        "tokens": train.tokens + held_out.tokens,
        "train_tokens": train.tokens,
        "trainable_tokens": train.trainable_tokens,
        "blocks": len(data.train),
        "eval_blocks": len(data.eval) if data.eval is not None else 0,
        "truncated": train.truncated + held_out.truncated,
        "dropped": train.dropped + held_out.dropped,
        "untrained": train.untrained + held_out.untrained,
        "collation": mode,
        "total_steps": steps,
        "hyperparameters": hp.model_dump(mode="json"),
        "peak_memory_bytes": peak_memory_bytes(model, hp, bf16=use_bf16()),
        "cache_hit": data.cache_hit,
        **describe_device(),
    }
    return Plan(data=data, hyperparameters=hp, total_steps=steps, report=report)


def rendered_examples(tokenizer: PreTrainedTokenizerBase, dataset: Dataset) -> list[str]:
    """The first examples as the model will see them, trained spans marked «…»."""
    rendered = []
    for record in iter_records(dataset):
        if len(rendered) == RENDERED_EXAMPLES:
            break
        rendered.append(
            render_marked(tokenizer, tokenize_example(tokenizer, record, dataset.shape))
        )
    return rendered
