"""Training data: read a stored dataset, split it, tokenize it with its loss mask, and pack it.

- `text`: the old `transformers.TextDataset` blocks: every example gets EOS appended, the token
  stream is concatenated and cut into `block_size` blocks, the tail that does not fill a block is
  dropped, and every token is trained.
- `prompt_completion` and `messages`: each example is tokenized with its label mask
  (`worker.masking`) and whole examples are packed into rows of at most `block_size` tokens with
  restarting position ids (`worker.packing`); an example longer than a block is truncated or
  dropped as the job's `truncation` says, and counted.

Examples are split into train and validation *before* packing, so no row mixes the two. Files
are streamed and tokenized in batches. The packed result is cached (`worker.token_cache`) under
a key of everything it depends on, so later jobs and resumed attempts skip tokenization.
"""

import logging
import math
import random
from array import array
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset as TorchDataset
from transformers import PreTrainedTokenizerBase, default_data_collator

from shared import dataset_formats, storage
from shared.dataset_formats import DatasetError
from shared.models import Dataset
from worker import token_cache
from worker.collate import Mode, PackedCollator, PackedDataset
from worker.errors import JobFailure
from worker.masking import TokenizedBatch, batch_encoder, eos_id, tokenize_batch
from worker.packing import PackedData, PackStats, pack_examples, pack_token_stream

logger = logging.getLogger(__name__)

TOKENIZE_BATCH = 1000  # examples per tokenizer call: large enough for the Rust batching to pay


def example_text(record: Any) -> str:
    """The text of a `text`-shaped example: a line of a text file or a `{"text": ...}` object."""
    return record if isinstance(record, str) else record["text"]


@contextmanager
def _chunks(dataset: Dataset) -> Iterator[Iterator[bytes]]:
    """The stored file of `dataset` as chunks of bytes."""
    try:
        stream = storage.open_read(storage.dataset_key(dataset.id))
    except FileNotFoundError:
        raise JobFailure(
            "dataset_unavailable",
            f"the file of dataset {dataset.id} is missing from storage",
            user_error=False,
        ) from None
    with stream:
        yield dataset_formats.read_chunks(stream)


def _invalid(dataset: Dataset, error: DatasetError) -> JobFailure:
    # Uploads are validated, so this means the stored file changed; say where, as upload does.
    return JobFailure("invalid_dataset", f"dataset {dataset.filename}: {error}", user_error=True)


def iter_records(dataset: Dataset) -> Iterator[Any]:
    """Every example of a stored dataset as uploaded (a line, or a JSON object), in file order.

    Lines are read exactly as upload validation reads them (`shared.dataset_formats`): blank
    lines skipped, a trailing `\\r` and a byte order mark dropped.
    """
    with _chunks(dataset) as chunks:
        try:
            yield from dataset_formats.iter_examples(chunks, dataset.format)
        except DatasetError as error:
            raise _invalid(dataset, error) from None


def iter_examples(dataset: Dataset) -> Iterator[str]:
    """Every example of a `text`-shaped dataset as its text."""
    return (example_text(record) for record in iter_records(dataset))


def count_examples(dataset: Dataset) -> int:
    with _chunks(dataset) as chunks:
        try:
            return sum(1 for _ in dataset_formats.iter_lines(chunks))
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

    All blocks are full, so there is no padding, and no collator can mistake an EOS that
    doubles as the pad token for padding and mask it out of the loss.
    """

    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.blocks[index].long()
        return {"input_ids": ids, "labels": ids.clone()}

    @property
    def tokens(self) -> int:
        return self.blocks.numel()

    @classmethod
    def of(cls, packed: PackedData, block_size: int) -> "PackedBlocks":
        """Text rows as blocks: all `block_size` long, or one shorter validation block."""
        width = block_size if len(packed) != 1 else int(packed.row_offsets[1])
        return cls(torch.from_numpy(packed.input_ids).view(len(packed), width))


class _TokenStream:
    """Token ids of many examples, each followed by EOS, concatenated.

    A full batch is tokenized on `executor`'s thread while the caller reads the next one; at
    most one batch per stream is in flight, so memory stays bounded.
    """

    def __init__(
        self,
        encode: Callable[[list[str]], list[list[int]]],
        eos_id: int,
        executor: ThreadPoolExecutor,
    ) -> None:
        self.encode = encode
        self.eos_id = eos_id
        self.executor = executor
        self.ids = array("i")
        self.examples = 0
        self._pending: list[str] = []
        self._in_flight: Future[list[list[int]]] | None = None

    def add(self, text: str) -> None:
        self._pending.append(text)
        if len(self._pending) >= TOKENIZE_BATCH:
            self._submit()

    def _submit(self) -> None:
        batch, self._pending = self._pending, []
        self._collect()
        self._in_flight = self.executor.submit(self.encode, batch)
        self.examples += len(batch)

    def _collect(self) -> None:
        if self._in_flight is None:
            return
        encoded, self._in_flight = self._in_flight.result(), None
        ids, eos = self.ids, self.eos_id
        for example in encoded:
            ids.extend(example)
            ids.append(eos)

    def flush(self) -> None:
        if self._pending:
            self._submit()
        self._collect()


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
    if cached is not None:
        train, held_out = cached
    elif shape == "text":
        train_stream, eval_stream = _tokenize_text(
            tokenizer, train_dataset, validation_dataset, validation_split, seed, on_progress
        )
        train = pack_token_stream(train_stream.ids, train_stream.examples, block_size)
        held_out = _pack_eval(eval_stream, block_size)
    else:
        train_examples, eval_examples = _tokenize_masked(
            tokenizer, train_dataset, validation_dataset, validation_split, seed, on_progress
        )
        pack = bool(options["pack"])
        train = pack_examples(train_examples, block_size, truncation, pack=pack)
        held_out = pack_examples(eval_examples, block_size, truncation, pack=pack)
    if len(train) == 0:
        raise JobFailure(
            "dataset_too_small",
            f"the training data has {train.stats.tokens + train.stats.discarded_tokens} tokens "
            f"after the validation split, fewer than one block of block_size {block_size}; add "
            "data or lower block_size",
            user_error=True,
        )
    if keys is not None and cached is None:
        token_cache.store(keys[0], train)
        token_cache.store(keys[1], held_out)
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


def _tokenize_text(
    tokenizer: PreTrainedTokenizerBase,
    train_dataset: Dataset,
    validation_dataset: Dataset | None,
    validation_split: float,
    seed: int,
    on_progress: Callable[[], None],
) -> tuple[_TokenStream, _TokenStream]:
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize") as executor:
        encode = batch_encoder(tokenizer)
        train = _TokenStream(encode, eos_id(tokenizer), executor)
        held_out = _TokenStream(encode, eos_id(tokenizer), executor)
        split = _split(train_dataset, validation_dataset, validation_split, seed)
        for index, (is_held_out, record) in enumerate(split):
            (held_out if is_held_out else train).add(example_text(record))
            if index % TOKENIZE_BATCH == 0:
                on_progress()
        train.flush()
        held_out.flush()
    return train, held_out


def _tokenize_masked(
    tokenizer: PreTrainedTokenizerBase,
    train_dataset: Dataset,
    validation_dataset: Dataset | None,
    validation_split: float,
    seed: int,
    on_progress: Callable[[], None],
) -> tuple[TokenizedBatch, TokenizedBatch]:
    shape = train_dataset.shape
    tokenized: dict[bool, list[TokenizedBatch]] = {False: [], True: []}
    pending: dict[bool, list[Any]] = {False: [], True: []}

    def flush(is_held_out: bool) -> None:
        if not pending[is_held_out]:
            return
        tokenized[is_held_out].append(tokenize_batch(tokenizer, pending[is_held_out], shape))
        pending[is_held_out] = []
        on_progress()

    for is_held_out, record in _split(train_dataset, validation_dataset, validation_split, seed):
        pending[is_held_out].append(record)
        if len(pending[is_held_out]) >= TOKENIZE_BATCH:
            flush(is_held_out)
    flush(False)
    flush(True)
    return TokenizedBatch.concatenate(tokenized[False]), TokenizedBatch.concatenate(tokenized[True])


def _pack_eval(held_out: _TokenStream, block_size: int) -> PackedData:
    # A validation set smaller than one block would leave nothing to evaluate on; one shorter
    # block still gives an honest loss over the held-out tokens.
    packed = pack_token_stream(held_out.ids, held_out.examples, block_size)
    if len(packed) == 0 and held_out.examples:
        return pack_token_stream(held_out.ids, held_out.examples, block_size, keep_tail=True)
    return packed


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
