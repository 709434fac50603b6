"""Training data: read a stored dataset, split it, tokenize it with its loss mask, and pack it.

- `text`: the old `transformers.TextDataset` blocks: every example gets EOS appended, the token
  stream is concatenated and cut into `block_size` blocks, the tail that does not fill a block
  is a last, shorter block (padded where the loss ignores it), and every token is trained.
- `prompt_completion` and `messages`: each example is tokenized with its label mask
  (`worker.masking`) and whole examples are packed into rows of at most `block_size` tokens with
  restarting position ids (`worker.packing`); an example longer than a block is truncated or
  dropped as the job's `truncation` says, and counted.

Examples are split into train and validation *before* packing, so no row mixes the two. Files
are streamed and tokenized in batches. The packed result is cached (`worker.token_cache`) under
a key of everything it depends on, so later jobs and resumed attempts skip tokenization.
"""

import gc
import logging
import math
import random
from array import array
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import torch
from torch.utils.data import Dataset as TorchDataset
from transformers import PreTrainedTokenizerBase, default_data_collator

from shared import dataset_formats, storage
from shared.dataset_formats import DatasetError
from shared.models import Dataset
from worker import token_cache
from worker.collate import Mode, PackedCollator, PackedDataset
from worker.errors import JobFailure
from worker.masking import BatchTokenizer, TokenizedBatch, eos_id
from worker.packing import PackedData, PackStats, pack_examples, pack_token_stream

logger = logging.getLogger(__name__)

TOKENIZE_BATCH = 1000  # examples per tokenizer call: large enough for the Rust batching to pay


def example_text(record: Any) -> str:
    """The text of a `text`-shaped example: a line of a text file or a `{"text": ...}` object."""
    return record if isinstance(record, str) else record["text"]


@contextmanager
def _stored(dataset: Dataset) -> Iterator[BinaryIO]:
    """The stored file of `dataset`, open."""
    try:
        stream = storage.open_read(storage.dataset_key(dataset.id))
    except FileNotFoundError:
        raise JobFailure(
            "dataset_unavailable",
            f"the file of dataset {dataset.id} is missing from storage",
            user_error=False,
        ) from None
    with stream:
        yield stream


def _invalid(dataset: Dataset, error: DatasetError) -> JobFailure:
    # Uploads are validated, so this means the stored file changed; say where, as upload does.
    return JobFailure("invalid_dataset", f"dataset {dataset.filename}: {error}", user_error=True)


def iter_records(dataset: Dataset) -> Iterator[Any]:
    """Every example of a stored dataset as uploaded (a line, or an object of a JSONL line or a
    CSV or Parquet row), in file order.

    Read by `shared.dataset_formats.read_records`, as upload validation reads the file: blank
    lines skipped, a trailing `\\r` and a byte order mark dropped; a table's rows as objects of
    its shape's columns.
    """
    with _stored(dataset) as stream:
        try:
            yield from dataset_formats.read_records(stream, dataset.format)
        except DatasetError as error:
            raise _invalid(dataset, error) from None


def iter_examples(dataset: Dataset) -> Iterator[str]:
    """Every example of a `text`-shaped dataset as its text."""
    return (example_text(record) for record in iter_records(dataset))


def count_examples(dataset: Dataset) -> int:
    with _stored(dataset) as stream:
        try:
            return dataset_formats.count_records(stream, dataset.format)
        except DatasetError as error:
            raise _invalid(dataset, error) from None


def validation_mask(examples: int, split: float, seed: int) -> bytearray:
    """mask[i] == 1 when example i is held out: a seeded random subset of round(n * split)
    examples (at least one, and never all of them), the same for the same seed."""
    mask = bytearray(examples)
    if split <= 0 or examples < 2:
        return mask
    held_out = min(max(1, round(examples * split)), examples - 1)
    for index in random.Random(seed).sample(range(examples), held_out):
        mask[index] = 1
    return mask


class PackedBlocks(TorchDataset):
    """Equal-length blocks of token ids; labels are the inputs (the model shifts them).

    Every block is full but the last, which holds the text's tail: it is padded at its end,
    where the loss ignores it (labels -100). Causal attention needs no mask for that: no real
    token attends to a later position. The labels, not the token ids, say what is padding, so
    no collator can mistake an EOS that doubles as the pad token for padding.
    """

    def __init__(self, blocks: torch.Tensor, last_length: int | None = None) -> None:
        self.blocks = blocks
        self.last_length = blocks.shape[1] if last_length is None else last_length

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.blocks[index].long()
        labels = ids.clone()
        if index in (-1, len(self) - 1):
            labels[self.last_length :] = -100
        return {"input_ids": ids, "labels": labels}

    @property
    def tokens(self) -> int:
        return self.blocks.numel() - (self.blocks.shape[1] - self.last_length)

    @classmethod
    def of(cls, packed: PackedData, block_size: int) -> "PackedBlocks":
        """Text rows as blocks of `block_size`, the shorter last one padded."""
        blocks = torch.zeros((len(packed), block_size), dtype=torch.int32)
        blocks.view(-1)[: len(packed.input_ids)] = torch.from_numpy(packed.input_ids)
        last = int(packed.row_offsets[-1] - packed.row_offsets[-2]) if len(packed) else 0
        return cls(blocks, last_length=last)


@dataclass
class _TokenStream:
    """Token ids of many examples, each followed by EOS, end to end: 4 bytes a token."""

    ids: array = field(default_factory=lambda: array("i"))
    examples: int = 0


@dataclass
class PreparedData:
    """The packed splits, with the counts the events, the plan and the model card report."""

    train: TorchDataset
    eval: TorchDataset | None
    train_stats: PackStats
    eval_stats: PackStats
    collator: Callable[[list[dict[str, Any]]], dict[str, Any]]
    cache_hit: bool = False
    eval_is_short_block: bool = False

    @property
    def train_examples(self) -> int:
        return self.train_stats.examples

    @property
    def eval_examples(self) -> int:
        return self.eval_stats.examples

    @property
    def train_tokens_total(self) -> int:
        return self.train_stats.tokens + self.train_stats.discarded_tokens

    @property
    def eval_tokens_total(self) -> int:
        return self.eval_stats.tokens + self.eval_stats.discarded_tokens


@contextmanager
def _cyclic_gc_paused() -> Iterator[None]:
    """Preparing data makes millions of short-lived lists, tuples and dicts and no reference
    cycles, yet each burst of allocations would start the cyclic collector, which walks the
    worker's whole heap (torch, transformers): a fifth of a chat dataset's preparation."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@_cyclic_gc_paused()
def prepare_data(
    tokenizer: PreTrainedTokenizerBase,
    train_dataset: Dataset,
    validation_dataset: Dataset | None,
    validation_split: float,
    *,
    block_size: int,
    seed: int,
    truncation: str = "truncate",
    mode: Mode = "packed",
    use_cache: bool = False,
    on_progress: Callable[[], None] = lambda: None,
) -> PreparedData:
    """Tokenize and pack the training data and the validation set (the validation dataset if
    given, else a seeded `validation_split` of the training examples; none when the split is 0).

    `mode` is how masked shapes are batched (`worker.collate.collator_mode`): rows of several
    examples, or one example per row for `padded`. `on_progress` is called once per tokenizer
    batch so the caller can heartbeat.
    """
    shape = train_dataset.shape
    if validation_dataset is not None and validation_dataset.shape != shape:
        raise JobFailure(
            "invalid_dataset",
            f"the validation dataset has the {validation_dataset.shape} shape, the training "
            f"dataset the {shape} shape; they must match",
            user_error=True,
        )
    eos_id(tokenizer)  # a tokenizer without EOS is refused before any work
    options: dict[str, str | int | float | bool | None] = {
        "truncation": truncation,
        "pack": mode in ("packed", "flatten"),
        "seed": seed,
        "validation_split": validation_split,
        "validation_dataset_sha256": validation_dataset.sha256 if validation_dataset else None,
    }
    keys = _cache_keys(tokenizer, train_dataset, block_size, options) if use_cache else None
    cached = _from_cache(keys)
    # A generator: the dataset is read only if a branch below consumes it.
    batches = _tokenized(
        tokenizer, train_dataset, validation_dataset, validation_split, seed, on_progress
    )
    if cached is not None:
        train, held_out = cached
    elif shape == "text":
        streams = _token_streams(batches)
        train = pack_token_stream(streams[False].ids, streams[False].examples, block_size)
        held_out = pack_token_stream(streams[True].ids, streams[True].examples, block_size)
    else:
        examples = _examples(batches)
        pack = bool(options["pack"])
        train = pack_examples(examples[False], block_size, truncation, pack=pack)
        held_out = pack_examples(examples[True], block_size, truncation, pack=pack)
    if len(train) == 0:
        split = validation_dataset is None and validation_split > 0
        raise JobFailure(
            "dataset_too_small",
            f"the training data has {train.stats.tokens + train.stats.discarded_tokens} tokens"
            f"{' after the validation split' if split else ''}, fewer than one block of "
            f"block_size {block_size}; add data or lower block_size",
            user_error=True,
        )
    if keys is not None and cached is None:
        sources = [train_dataset.sha256]
        if validation_dataset is not None:
            sources.append(validation_dataset.sha256)
        token_cache.store(keys[0], train, sources)
        token_cache.store(keys[1], held_out, sources)
    return _prepared(tokenizer, train, held_out, shape, mode, block_size, cached is not None)


def _prepared(
    tokenizer: PreTrainedTokenizerBase,
    train: PackedData,
    held_out: PackedData,
    shape: str,
    mode: Mode,
    block_size: int,
    cache_hit: bool,
) -> PreparedData:
    if shape == "text":
        short = len(held_out) == 1 and int(held_out.row_offsets[1]) < block_size
        return PreparedData(
            train=PackedBlocks.of(train, block_size),
            eval=PackedBlocks.of(held_out, block_size) if len(held_out) else None,
            train_stats=train.stats,
            eval_stats=held_out.stats,
            # All blocks have the same length: stacking is all a batch needs.
            collator=default_data_collator,
            cache_hit=cache_hit,
            eval_is_short_block=short,
        )
    return PreparedData(
        train=PackedDataset(train),
        eval=PackedDataset(held_out) if len(held_out) else None,
        train_stats=train.stats,
        eval_stats=held_out.stats,
        collator=PackedCollator(mode, tokenizer.pad_token_id or eos_id(tokenizer)),
        cache_hit=cache_hit,
    )


def _split(
    train_dataset: Dataset,
    validation_dataset: Dataset | None,
    validation_split: float,
    seed: int,
) -> Iterator[tuple[bool, Any]]:
    """(held out?, record) for every example: the validation dataset's, then the training
    dataset's with a seeded `validation_split` of them held out when there is none."""
    mask = None
    if validation_dataset is not None:
        for record in iter_records(validation_dataset):
            yield True, record
    else:
        mask = validation_mask(count_examples(train_dataset), validation_split, seed)
    for index, record in enumerate(iter_records(train_dataset)):
        # The file cannot change under us (stored files are immutable), so index < len(mask).
        yield mask is not None and bool(mask[index]), record


def _tokenized(
    tokenizer: PreTrainedTokenizerBase,
    train_dataset: Dataset,
    validation_dataset: Dataset | None,
    validation_split: float,
    seed: int,
    on_progress: Callable[[], None],
) -> Iterator[tuple[bool, TokenizedBatch]]:
    """(held out?, tokenized batch) for every batch of the split, in file order."""
    split = _split(train_dataset, validation_dataset, validation_split, seed)
    tokenize = BatchTokenizer(tokenizer, train_dataset.shape)
    for is_held_out, batch in tokenize.pipelined(_batches(split)):
        yield is_held_out, batch
        on_progress()


def _token_streams(batches: Iterator[tuple[bool, TokenizedBatch]]) -> dict[bool, _TokenStream]:
    streams = {False: _TokenStream(), True: _TokenStream()}
    for is_held_out, batch in batches:
        streams[is_held_out].ids.frombytes(batch.input_ids.tobytes())
        streams[is_held_out].examples += len(batch)
    return streams


def _examples(
    batches: Iterator[tuple[bool, TokenizedBatch]],
) -> dict[bool, TokenizedBatch]:
    tokenized: dict[bool, list[TokenizedBatch]] = {False: [], True: []}
    for is_held_out, batch in batches:
        tokenized[is_held_out].append(batch)
    return {split: TokenizedBatch.concatenate(parts) for split, parts in tokenized.items()}


def _batches(split: Iterable[tuple[bool, Any]]) -> Iterator[tuple[bool, list[Any]]]:
    """The split's records in batches of `TOKENIZE_BATCH`, held-out ones apart, in file order."""
    pending: dict[bool, list[Any]] = {False: [], True: []}
    for is_held_out, record in split:
        pending[is_held_out].append(record)
        if len(pending[is_held_out]) >= TOKENIZE_BATCH:
            yield is_held_out, pending[is_held_out]
            pending[is_held_out] = []
    for is_held_out, records in pending.items():
        if records:
            yield is_held_out, records


def _cache_keys(
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    block_size: int,
    options: dict[str, str | int | float | bool | None],
) -> tuple[str, str]:
    """One entry per split; the key covers every input the packed rows depend on."""
    fingerprint = token_cache.tokenizer_fingerprint(tokenizer)
    return tuple(  # type: ignore[return-value]
        token_cache.cache_key(
            dataset_sha256=dataset.sha256,
            tokenizer_hash=fingerprint,
            shape=dataset.shape,
            block_size=block_size,
            options={**options, "split": split},
        )
        for split in ("train", "eval")
    )


def _from_cache(keys: tuple[str, str] | None) -> tuple[PackedData, PackedData] | None:
    if keys is None:
        return None
    train, held_out = token_cache.load(keys[0]), token_cache.load(keys[1])
    return (train, held_out) if train is not None and held_out is not None else None


def steps_per_epoch(blocks: int, batch_size: int, accumulation: int) -> int:
    """Optimizer steps in one pass over `blocks` (as Trainer counts them, at least one)."""
    return max(math.ceil(blocks / batch_size) // accumulation, 1)
