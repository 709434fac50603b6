"""Batches of packed rows, collated so that no attention and no loss crosses two examples.

What transformers 5 supports (read in `masking_utils.py` and `modeling_flash_attention_utils.py`):
- sdpa, eager and flex attention: `create_causal_mask` calls `find_packed_sequence_indices`
  on `position_ids` and adds a block-diagonal mask where they restart, but *only* when no 2D
  `attention_mask` is passed and no cache exists. GPT-2 builds a `DynamicCache` whenever
  `use_cache` is on, even in training, and its config has `use_cache=True`; `Trainer` sets
  `model.config.use_cache = args.use_cache` (False by default), so training and evaluation
  through Trainer run with the packed mask. `packing_probe` checks a model really does this.
- flash attention 2/3/4: the varlen kernels take `cu_seq_lens_*` from
  `DataCollatorWithFlattening(return_flash_attn_kwargs=True)`: a batch is one flat sequence.

Modes (`collator_mode` picks one for a model):
- `blocks`: text blocks, all the same length, stacked (the seed's collation).
- `packed`: rows stay batch items, padded to the longest row with one extra segment of pad
  tokens (its own position ids, labels -100, so it neither sees nor is seen by real tokens).
  Keeping the batch dimension keeps sdpa's cost at batch x block^2, not (batch x block)^2.
- `flatten`: every example of the batch in one row via `DataCollatorWithFlattening`, for flash
  attention.
- `padded`: the fallback for attention that ignores restarting positions: rows hold one example
  each (`pack_examples(pack=False)`), right-padded to the longest with an attention mask.

Under `torch.compile` batches have one size, and packed ones one length (`compiled_collator`).
"""

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset as TorchDataset
from transformers import DataCollatorWithFlattening, PreTrainedModel

from shared.schemas import Collation
from worker.masking import IGNORE_INDEX
from worker.packing import PackedData

Mode = Collation
POSITION_MASK_ATTENTION = ("sdpa", "eager", "flex_attention")


class PackedDataset(TorchDataset):
    """The rows of `PackedData` as int64 numpy features (input_ids, labels, position_ids)."""

    def __init__(self, data: PackedData) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return self.data.row(index)

    @property
    def longest_row(self) -> int:
        return int(np.diff(self.data.row_offsets).max(initial=0))


def _segments(feature: dict[str, Any]) -> list[dict[str, list[int]]]:
    """A packed row split back into its examples, where the position ids restart."""
    positions = np.asarray(feature["position_ids"])
    starts = [*np.flatnonzero(positions == 0).tolist(), len(positions)]
    ids, labels = np.asarray(feature["input_ids"]), np.asarray(feature["labels"])
    return [
        {"input_ids": ids[a:b].tolist(), "labels": labels[a:b].tolist()}
        for a, b in zip(starts, starts[1:], strict=False)
    ]


class PackedCollator:
    """Collates `PackedDataset` rows for one `Mode` (see the module docstring): padded to the
    longest row of the batch, or to `length` when it is longer."""

    def __init__(self, mode: Mode, pad_token_id: int, length: int = 0) -> None:
        self.mode = mode
        self.pad_token_id = pad_token_id
        self.length = length
        self._flatten = DataCollatorWithFlattening(return_flash_attn_kwargs=True)

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if self.mode == "flatten":
            return self._flatten([seg for feature in features for seg in _segments(feature)])
        longest = max(self.length, *(len(feature["input_ids"]) for feature in features))
        ids = torch.full((len(features), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), longest), IGNORE_INDEX, dtype=torch.long)
        positions = torch.zeros((len(features), longest), dtype=torch.long)
        mask = torch.zeros((len(features), longest), dtype=torch.long)
        for row, feature in enumerate(features):
            size = len(feature["input_ids"])
            ids[row, :size] = torch.as_tensor(feature["input_ids"])
            labels[row, :size] = torch.as_tensor(feature["labels"])
            positions[row, :size] = torch.as_tensor(feature["position_ids"])
            positions[row, size:] = torch.arange(longest - size)  # the pad segment
            mask[row, :size] = 1
        if self.mode == "blocks":
            return {"input_ids": ids, "labels": labels}
        if self.mode == "packed":
            # No attention_mask: with one, transformers ignores the position-id segments.
            return {"input_ids": ids, "labels": labels, "position_ids": positions}
        if self.mode == "padded":
            return {"input_ids": ids, "labels": labels, "attention_mask": mask}
        raise ValueError(f"unknown collator mode {self.mode!r}")


Collate = Callable[[list[dict[str, Any]]], dict[str, Any]]


class FullBatches:
    """Batches of exactly `rows` rows, for a compiled model: a short batch (an epoch's last, an
    evaluation's last) is filled with copies of its first row whose labels the loss ignores.

    torch.compile specialises its graph to the batch's shape, and a batch of another shape makes
    it compile again, with that size left dynamic from then on: a job with validation compiled
    up to four graphs, and one without compiled again in the middle of training
    (`tests/worker/test_full_batches.py` counts them). Full batches of one length
    (`compiled_collator`) keep one static graph for training and one for evaluation. The
    filler changes no loss and no gradient: the loss averages over labelled tokens only, and
    Trainer's eval loop counts the last batch by the rows the dataset has left, not by the rows
    it got.
    """

    def __init__(self, collate: Collate, rows: int) -> None:
        self.collate = collate
        self.rows = rows

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        missing = self.rows - len(features)
        if missing <= 0:
            return self.collate(features)
        labels = features[0]["labels"]
        full_like = torch.full_like if isinstance(labels, torch.Tensor) else np.full_like
        filler = {**features[0], "labels": full_like(labels, IGNORE_INDEX)}
        return self.collate([*features, *[filler] * missing])


def compiled_collator(
    collator: Collate, datasets: Sequence[TorchDataset | None], rows: int
) -> Collate:
    """`collator` for a compiled model: full batches and, for packed rows, one length (the
    longest row of `datasets`; a None among them is no dataset). Packed rows are nearly full, so
    that padding costs little; rows of one example each (`padded`) keep their batch's length, as
    padding a short example to the longest would multiply its compute. Flash attention's
    flattened batches stay as they are: its kernels take any total length."""
    if isinstance(collator, PackedCollator):
        if collator.mode == "flatten":
            return collator
        if collator.mode == "packed":
            packed = [d.longest_row for d in datasets if isinstance(d, PackedDataset)]
            collator = PackedCollator("packed", collator.pad_token_id, max(packed, default=0))
    return FullBatches(collator, rows)


def _attention(model: PreTrainedModel) -> str:
    return str(getattr(model.config, "_attn_implementation", None) or "eager")


@torch.no_grad()
def packing_probe(model: PreTrainedModel) -> bool:
    """Whether `model` keeps packed segments apart in `packed` mode: the logits of a short
    sequence packed after another equal its logits alone. A few tokens, in eval mode."""
    vocab = int(model.config.vocab_size)
    first = [(7 * i + 3) % vocab for i in range(5)]
    second = [(11 * i + 5) % vocab for i in range(4)]
    device = next(model.parameters()).device
    row = {"input_ids": first + second, "labels": first + second}
    row["position_ids"] = list(range(5)) + list(range(4))
    batch = PackedCollator("packed", 0)([row])
    was_training = model.training
    model.eval()
    try:
        packed = model(
            input_ids=batch["input_ids"].to(device),
            position_ids=batch["position_ids"].to(device),
            use_cache=False,
        ).logits[0, 5:]
        alone = model(input_ids=torch.tensor([second], device=device), use_cache=False).logits[0]
    except (TypeError, ValueError, RuntimeError):  # no position_ids, or the kernel refuses
        return False
    finally:
        model.train(was_training)
    precise = packed.dtype == torch.float32
    scale = max(1.0, float(alone.abs().max()))
    return bool((packed - alone).abs().max() <= (1e-4 if precise else 2e-2) * scale)


def collator_mode(model: PreTrainedModel) -> Mode:
    """How masked shapes are batched for `model`: `flatten` with flash attention, `packed` when
    the attention honours restarting position ids (probed), else `padded`."""
    attention = _attention(model)
    if attention.startswith("flash_attention") or "flash" in attention:
        return "flatten"
    if attention in POSITION_MASK_ATTENTION and packing_probe(model):
        return "packed"
    return "padded"
