"""Pack tokenized examples into rows of at most `block_size` tokens, and collate rows to batches.

Two layouts:
- `text` keeps the seed's blocks: every example's ids (EOS included) concatenated and cut into
  `block_size` blocks, the tail a shorter last one, labels equal to the inputs. Attention
  crosses examples inside a block, as it always did for plain text.
- masked shapes (`prompt_completion`, `messages`) are packed *whole*: first-fit over a window of
  open rows, in file order. Each example is a segment whose position ids restart at 0 and whose
  first label is -100 (its first token is never predicted from the previous example). With a
  collator that keeps segments apart (see `collator_mode`), no attention and no loss crosses two
  examples. With `pack=False` every row holds one example (for the padding fallback).

An example longer than `block_size` is never cut silently: `truncation="truncate"` keeps its
first `block_size` tokens, `"drop"` skips it, and both are counted. An example left with nothing
to train (a prompt that fills the block) is skipped and counted as `untrained`.

Arrays, not Python lists, hold the data (int32 ids, a bool "trained" flag per token), so the
token cache can store them as they are.
"""

from array import array
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np

from worker.masking import IGNORE_INDEX, TokenizedBatch, TokenizedExample, offsets_of

Truncation = Literal["truncate", "drop"]
TRUNCATION_MODES: tuple[str, ...] = ("truncate", "drop")
OPEN_ROWS = 64  # rows still open to first-fit: good fill, linear time, near file order


@dataclass
class PackStats:
    """What packing did, for the job's events and the model card."""

    examples: int = 0  # examples given
    rows: int = 0
    tokens: int = 0  # tokens in the rows
    trainable_tokens: int = 0  # loss terms: trained tokens that are not a segment's first
    truncated: int = 0  # longer than block_size, cut to it
    dropped: int = 0  # longer than block_size, skipped (truncation="drop")
    untrained: int = 0  # skipped: no trained token left
    discarded_tokens: int = 0  # tokens cut, skipped, or in the text tail

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class PackedData:
    """Rows of packed tokens, flat: row r is `[row_offsets[r], row_offsets[r+1])` of the token
    arrays; position ids restart at every `segment_offsets` entry (each row starts one)."""

    input_ids: np.ndarray  # int32 (tokens,)
    trained: np.ndarray  # bool (tokens,): label = input id where True, -100 where False
    row_offsets: np.ndarray  # int64 (rows + 1,)
    segment_offsets: np.ndarray  # int64 (segments + 1,)
    stats: PackStats = field(default_factory=PackStats)

    def __len__(self) -> int:
        return len(self.row_offsets) - 1

    def row(self, index: int) -> dict[str, np.ndarray]:
        """Row `index` as int64 arrays: input_ids, labels (-100 untrained), position_ids."""
        start, end = int(self.row_offsets[index]), int(self.row_offsets[index + 1])
        ids = self.input_ids[start:end].astype(np.int64)
        labels = np.where(self.trained[start:end], ids, IGNORE_INDEX)
        first = np.searchsorted(self.segment_offsets, start, side="left")
        last = np.searchsorted(self.segment_offsets, end, side="left")
        starts = self.segment_offsets[first:last]
        tokens = np.arange(start, end)
        positions = tokens - starts[np.searchsorted(starts, tokens, side="right") - 1]
        return {"input_ids": ids, "labels": labels, "position_ids": positions}


def pack_text(examples: Iterable[TokenizedExample], block_size: int) -> PackedData:
    """The seed's blocks: all ids concatenated, cut into `block_size` blocks, and the tail that
    does not fill one as a shorter last row, so that every token is trained (a tail of one
    token predicts nothing, and is left out)."""
    ids = array("i")
    count = 0
    for example in examples:
        ids.extend(example.input_ids)
        count += 1
    return pack_token_stream(ids, count, block_size)


def pack_token_stream(ids: array, examples: int, block_size: int) -> PackedData:
    """`pack_text` for ids already concatenated (each example's followed by EOS)."""
    stats = PackStats(examples=examples)
    full = len(ids) // block_size * block_size
    end = len(ids) if len(ids) - full >= 2 else full
    lengths = [block_size] * (full // block_size) + ([end - full] if end > full else [])
    offsets = offsets_of(lengths)
    stats.rows = len(lengths)
    stats.tokens = end
    stats.trainable_tokens = end - len(lengths)
    stats.discarded_tokens = len(ids) - end
    return PackedData(
        input_ids=np.frombuffer(ids, dtype=np.int32)[:end].copy(),
        trained=np.ones(end, dtype=bool),
        row_offsets=offsets,
        segment_offsets=offsets.copy(),
        stats=stats,
    )


def _fit(
    batch: TokenizedBatch, block_size: int, truncation: str, stats: PackStats
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(starts, lengths) of the examples to pack, cut to `block_size` (skipped ones left out),
    and the batch's trained flags with every example's first token untrained."""
    starts, lengths = batch.offsets[:-1], np.diff(batch.offsets)
    too_long = lengths > block_size
    if truncation == "drop":
        stats.dropped = int(too_long.sum())
        stats.discarded_tokens += int(lengths[too_long].sum())
        starts, lengths = starts[~too_long], lengths[~too_long]
    else:
        stats.truncated = int(too_long.sum())
        stats.discarded_tokens += int((lengths[too_long] - block_size).sum())
        lengths = np.minimum(lengths, block_size)
    # The first token is never a target: in a packed row it would be predicted from the end
    # of the previous example.
    trained = batch.trained.copy()
    trained[starts[lengths > 0]] = False
    trained_before = offsets_of(trained)  # trained_before[t]: trained tokens before token t
    untrained = trained_before[starts + lengths] == trained_before[starts]
    stats.untrained = int(untrained.sum())
    stats.discarded_tokens += int(lengths[untrained].sum())
    return starts[~untrained], lengths[~untrained], trained


def _first_fit(lengths: list[int], block_size: int) -> list[int]:
    """Each example's row: the oldest of the newest `OPEN_ROWS` rows with room for it, else a
    new row."""
    free: list[int] = []  # room left in each row
    rows: list[int] = []
    for size in lengths:
        oldest_open = max(0, len(free) - OPEN_ROWS)
        row = next((r for r in range(oldest_open, len(free)) if free[r] >= size), len(free))
        if row == len(free):
            free.append(block_size)
        free[row] -= size
        rows.append(row)
    return rows


def pack_examples(
    examples: TokenizedBatch | Iterable[TokenizedExample],
    block_size: int,
    truncation: str = "truncate",
    *,
    pack: bool = True,
) -> PackedData:
    """Whole examples into rows of at most `block_size` tokens (one per row without `pack`)."""
    if truncation not in TRUNCATION_MODES:
        raise ValueError(f"truncation must be one of {TRUNCATION_MODES}, got {truncation!r}")
    batch = examples if isinstance(examples, TokenizedBatch) else TokenizedBatch.of(examples)
    stats = PackStats(examples=len(batch))
    starts, lengths, trained = _fit(batch, block_size, truncation, stats)
    rows = np.asarray(
        _first_fit(lengths.tolist(), block_size) if pack else range(len(lengths)), dtype=np.int64
    )
    # Row after row, each with its examples in file order.
    order = np.argsort(rows, kind="stable")
    tokens = _token_indices(starts[order], lengths[order])
    packed_trained = trained[tokens]
    row_tokens = np.bincount(rows, weights=lengths).astype(np.int64)
    stats.rows = len(row_tokens)
    stats.tokens = len(tokens)
    stats.trainable_tokens = int(packed_trained.sum())
    return PackedData(
        input_ids=batch.input_ids[tokens],
        trained=packed_trained,
        row_offsets=offsets_of(row_tokens),
        segment_offsets=offsets_of(lengths[order]),
        stats=stats,
    )


def _token_indices(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The indices of the tokens of segments `[start, start + length)`, one after the other."""
    ends = offsets_of(lengths)
    return np.arange(ends[-1]) + np.repeat(starts - ends[:-1], lengths)


def fill_rate(data: PackedData, block_size: int) -> float:
    """Share of the row capacity that holds tokens (1.0 for text blocks), for an event."""
    return data.stats.tokens / (data.stats.rows * block_size) if data.stats.rows else 0.0
