"""Pack tokenized examples into rows of at most `block_size` tokens, and collate rows to batches.

Two layouts:
- `text` keeps the seed's blocks: every example's ids (EOS included) concatenated and cut into
  full `block_size` blocks, the tail dropped, labels equal to the inputs. Attention crosses
  examples inside a block, as it always did for plain text.
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

from worker.masking import IGNORE_INDEX, TokenizedExample

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


def _offsets(lengths: list[int]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(np.asarray(lengths, dtype=np.int64))]).astype(np.int64)


def pack_text(
    examples: Iterable[TokenizedExample], block_size: int, *, keep_tail: bool = False
) -> PackedData:
    """The seed's blocks: all ids concatenated, cut into `block_size` blocks, tail dropped (kept
    as one short last row with `keep_tail`, for a validation set smaller than a block)."""
    ids = array("i")
    count = 0
    for example in examples:
        ids.extend(example.input_ids)
        count += 1
    return pack_token_stream(ids, count, block_size, keep_tail=keep_tail)


def pack_token_stream(
    ids: array, examples: int, block_size: int, *, keep_tail: bool = False
) -> PackedData:
    """`pack_text` for ids already concatenated (each example's followed by EOS)."""
    stats = PackStats(examples=examples)
    full = len(ids) // block_size * block_size
    end = len(ids) if keep_tail and len(ids) - full >= 2 else full
    lengths = [block_size] * (full // block_size) + ([end - full] if end > full else [])
    offsets = _offsets(lengths)
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
    example: TokenizedExample, block_size: int, truncation: str, stats: PackStats
) -> tuple[list[int], list[bool]] | None:
    """The example's (ids, trained flags) ready to pack, or None when it is skipped."""
    ids, labels = example.input_ids, example.labels
    if len(ids) > block_size:
        if truncation == "drop":
            stats.dropped += 1
            stats.discarded_tokens += len(ids)
            return None
        stats.truncated += 1
        stats.discarded_tokens += len(ids) - block_size
        ids, labels = ids[:block_size], labels[:block_size]
    # The first token is never a target: in a packed row it would be predicted from the end
    # of the previous example.
    trained = [False] + [label != IGNORE_INDEX for label in labels[1:]]
    if not any(trained):
        stats.untrained += 1
        stats.discarded_tokens += len(ids)
        return None
    return ids, trained


def pack_examples(
    examples: Iterable[TokenizedExample],
    block_size: int,
    truncation: str = "truncate",
    *,
    pack: bool = True,
) -> PackedData:
    """Whole examples into rows of at most `block_size` tokens (one per row without `pack`)."""
    if truncation not in TRUNCATION_MODES:
        raise ValueError(f"truncation must be one of {TRUNCATION_MODES}, got {truncation!r}")
    stats = PackStats()
    kept: list[tuple[list[int], list[bool]]] = []
    rows: list[list[int]] = []  # indices into `kept`
    open_rows: list[tuple[int, int]] = []  # (row, free tokens), oldest first
    for example in examples:
        stats.examples += 1
        fitted = _fit(example, block_size, truncation, stats)
        if fitted is None:
            continue
        kept.append(fitted)
        size = len(fitted[0])
        slot = next((i for i, (_, free) in enumerate(open_rows) if size <= free), None)
        if pack and slot is not None:
            row, free = open_rows[slot]
            rows[row].append(len(kept) - 1)
            open_rows[slot] = (row, free - size)
            continue
        rows.append([len(kept) - 1])
        if pack:
            open_rows.append((len(rows) - 1, block_size - size))
            if len(open_rows) > OPEN_ROWS:
                open_rows.pop(0)
    ids, trained = array("i"), bytearray()
    segments: list[int] = []
    for row in rows:
        for index in row:
            ids.extend(kept[index][0])
            trained.extend(kept[index][1])
            segments.append(len(kept[index][0]))
    stats.rows = len(rows)
    stats.tokens = len(ids)
    stats.trainable_tokens = sum(trained)
    return PackedData(
        input_ids=np.frombuffer(ids, dtype=np.int32).copy(),
        trained=np.frombuffer(bytes(trained), dtype=np.uint8).astype(bool),
        row_offsets=_offsets([sum(len(kept[i][0]) for i in row) for row in rows]),
        segment_offsets=_offsets(segments),
        stats=stats,
    )


def fill_rate(data: PackedData, block_size: int) -> float:
    """Share of the row capacity that holds tokens (1.0 for text blocks), for an event."""
    return data.stats.tokens / (data.stats.rows * block_size) if data.stats.rows else 0.0
