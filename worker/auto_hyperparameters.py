"""The rule that turns `"auto"` hyperparameters into numbers, from the data and the model.

- block_size: 512 tokens, or the model's positions where it has fewer (resolved before the data
  are packed: the rest depends on it).
- batch_size: blocks per step such that a step sees about 16k tokens (the largest power of
  two <= 16384 / block_size), between 1 and 64, and never more than the training blocks.
- epochs: enough passes that training sees about 2M tokens (ceil(2M / training tokens)),
  between 1 and 10: small datasets get more passes, large ones one.
- learning_rate: 5e-5 for a GPT-2-small-sized model (124M parameters), scaled by
  sqrt(124M / parameters) (smaller models tolerate larger steps), ten times that for LoRA,
  and kept within [5e-6, 1e-3] for full fine-tuning and [1e-5, 2e-3] for LoRA.

The resolved values are stored on the job, so a job always says what it trained with.
"""

import math

from shared.schemas import Hyperparameters

BLOCK_SIZE = 512
TOKENS_PER_STEP = 16_384
TOKENS_SEEN = 2_000_000
REFERENCE_PARAMETERS = 124_000_000
REFERENCE_LEARNING_RATE = 5e-5


def resolve_block_size(hyperparameters: Hyperparameters, max_positions: int | None) -> int:
    if hyperparameters.block_size != "auto":
        return hyperparameters.block_size
    return min(BLOCK_SIZE, max_positions) if max_positions else BLOCK_SIZE


def auto_batch_size(block_size: int, train_blocks: int) -> int:
    per_step = max(1, TOKENS_PER_STEP // block_size)
    power_of_two = 2 ** int(math.log2(per_step))
    return max(1, min(power_of_two, 64, train_blocks))


def auto_epochs(train_tokens: int) -> float:
    return float(min(10, max(1, math.ceil(TOKENS_SEEN / max(1, train_tokens)))))


def auto_learning_rate(parameters: int, method: str) -> float:
    rate = REFERENCE_LEARNING_RATE * math.sqrt(REFERENCE_PARAMETERS / max(1, parameters))
    if method == "lora":
        return float(f"{min(2e-3, max(1e-5, rate * 10)):.3g}")
    return float(f"{min(1e-3, max(5e-6, rate)):.3g}")


def resolve(
    hyperparameters: Hyperparameters,
    *,
    train_tokens: int,
    train_blocks: int,
    parameters: int,
    method: str,
) -> Hyperparameters:
    """A copy with every `"auto"` replaced by the rule's number; other values are kept."""
    resolved: dict[str, float | int] = {}
    if hyperparameters.batch_size == "auto":
        resolved["batch_size"] = auto_batch_size(int(hyperparameters.block_size), train_blocks)
    if hyperparameters.epochs == "auto":
        resolved["epochs"] = auto_epochs(train_tokens)
    if hyperparameters.learning_rate == "auto":
        resolved["learning_rate"] = auto_learning_rate(parameters, method)
    return hyperparameters.model_copy(update=resolved)
