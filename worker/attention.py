"""Training on text blocks with SDPA's causal flag instead of a mask.

Text blocks are full rows: no padding, and no second example starting inside a row, so plain
causal attention is exact for them. transformers cannot see that under `torch.compile`: it may
not read tensor values while tracing, so every step builds a (batch, 1, block, block) mask, and
SDPA, given a mask, computes the whole square in its memory-efficient kernel instead of skipping
the masked half in its flash kernel. In eager mode transformers does read the values (packed
position ids, padding), which makes the host wait for the device on every forward.

`causal_attention` switches a model to `CAUSAL_SDPA` (transformers' own SDPA function, with no
mask function registered, so transformers builds no mask) while it trains and evaluates on text
blocks. It first checks that the model's stock SDPA path masks nothing on such a block: a
sliding window shorter than the block, for one, needs its mask.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils.data import Dataset as TorchDataset
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from worker.data import PackedBlocks

STOCK_SDPA = "sdpa"
CAUSAL_SDPA = "tunery_causal_sdpa"
_PROBE = "tunery_sdpa_probe"


def _record_mask(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    masked_layers: list[bool] | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stock SDPA that also notes whether this layer got a mask (or is not causal)."""
    if masked_layers is not None:
        masked_layers.append(attention_mask is not None or not getattr(module, "is_causal", True))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(CAUSAL_SDPA, sdpa_attention_forward)
AttentionInterface.register(_PROBE, _record_mask)
AttentionMaskInterface.register(_PROBE, sdpa_mask)  # the masks stock SDPA would get


def _switch(model: PreTrainedModel, implementation: str) -> bool:
    """Whether `model` now runs `implementation` (a model that cannot switch only warns)."""
    model.set_attn_implementation(implementation)
    return model.config._attn_implementation == implementation


@torch.no_grad()
def masks_nothing(model: PreTrainedModel, block: torch.Tensor) -> bool:
    """Whether the stock SDPA path gives no layer a mask on `block` (token ids, one row)."""
    was_training = model.training
    masked_layers: list[bool] = []
    model.eval()
    try:
        if _switch(model, _PROBE):
            ids = block.view(1, -1).to(device=model.device, dtype=torch.long)
            model(input_ids=ids, use_cache=False, masked_layers=masked_layers)
    finally:
        _switch(model, STOCK_SDPA)
        model.train(was_training)
    return bool(masked_layers) and not any(masked_layers)


@contextmanager
def causal_attention(model: PreTrainedModel, train: TorchDataset) -> Iterator[bool]:
    """Run `model` with `CAUSAL_SDPA` on blocks like `train`'s where that is exact; yields
    whether it does. The stock implementation is back afterwards, for samples (prompts of any
    length) and for anything saved."""
    causal = (
        isinstance(train, PackedBlocks)
        and model.config._attn_implementation == STOCK_SDPA
        and masks_nothing(model, train.blocks[0])
        and _switch(model, CAUSAL_SDPA)
    )
    try:
        yield causal
    finally:
        if causal:
            _switch(model, STOCK_SDPA)
