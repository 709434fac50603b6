"""Training data: read a stored dataset, render examples to text, split, tokenize and pack.

Packing follows the old `transformers.TextDataset`: every example gets EOS appended, the token
stream is concatenated and cut into `block_size` blocks, and the tail that does not fill a block
is dropped. Examples are split into train and validation *before* packing, so no block mixes the
two. Files are streamed and tokenized in batches; only the token ids are held in memory (int32).
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
from transformers import PreTrainedTokenizerBase

from shared import dataset_formats, storage
from shared.dataset_formats import DatasetError
from shared.models import Dataset
from worker.errors import JobFailure

logger = logging.getLogger(__name__)

TOKENIZE_BATCH = 1000  # examples per tokenizer call: large enough for the Rust batching to pay


def render_example(record: Any, shape: str) -> str:
    """One example as the text the model trains on.

    The single place that decides the rendering: prompt/completion and chat messages are plain
    concatenations for now; a later issue replaces this with templates and loss masking.
    """
    if shape == "text":
        return record if isinstance(record, str) else record["text"]
    if shape == "prompt_completion":
        return f"{record['prompt']}{record['completion']}"
    if shape == "messages":
        return "\n".join(f"{turn['role']}: {turn['content']}" for turn in record["messages"])
    raise JobFailure("invalid_dataset", f"unknown dataset shape {shape!r}", user_error=True)


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


def iter_examples(dataset: Dataset) -> Iterator[str]:
    """Every example of a stored dataset, rendered to text, in file order.

    Lines are read exactly as upload validation reads them (`shared.dataset_formats`): blank
    lines skipped, a trailing `\\r` and a byte order mark dropped.
    """
    with _chunks(dataset) as chunks:
        try:
            for example in dataset_formats.iter_examples(chunks, dataset.format):
                yield render_example(example, dataset.shape)
        except DatasetError as error:
            raise _invalid(dataset, error) from None


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


def _batch_encoder(tokenizer: PreTrainedTokenizerBase) -> Callable[[list[str]], list[list[int]]]:
    """A function from texts to their token ids (no special tokens).

    For a fast tokenizer this calls the Rust backend's `encode_batch_fast` directly: the same
    ids as `tokenizer(texts)`, without the offsets and the per-example Python dicts that
    `BatchEncoding` builds, and with the GIL released while Rust works. One ordinary call first
    puts the backend in the state `tokenizer(...)` uses (no truncation, no padding, its special
    token handling).
    """
    backend = getattr(tokenizer, "_tokenizer", None)
    tokenizer([""], add_special_tokens=False, return_attention_mask=False, verbose=False)
    if backend is not None and hasattr(backend, "encode_batch_fast"):

        def encode_fast(texts: list[str]) -> list[list[int]]:
            return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]

        return encode_fast

    def encode(texts: list[str]) -> list[list[int]]:
        return tokenizer(
            texts, add_special_tokens=False, return_attention_mask=False, verbose=False
        )["input_ids"]

    return encode


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

    def blocks(self, block_size: int) -> torch.Tensor:
        """The stream cut into full blocks, the tail dropped: shape (n_blocks, block_size)."""
        self.flush()
        count = len(self.ids) // block_size
        if count == 0:
            return torch.empty((0, block_size), dtype=torch.int32)
        tokens = torch.frombuffer(self.ids, dtype=torch.int32)[: count * block_size]
        return tokens.clone().view(count, block_size)

    def whole(self) -> torch.Tensor:
        """The stream as one short block, for a validation set smaller than a block."""
        self.flush()
        return torch.frombuffer(self.ids, dtype=torch.int32).clone().view(1, -1)


@dataclass
class PreparedData:
    """The packed splits, with the counts the events and the model card report."""

    train: PackedBlocks
    eval: PackedBlocks | None
    train_examples: int
    eval_examples: int
    train_tokens_total: int
    eval_tokens_total: int
    eval_is_short_block: bool = False


def prepare_data(
    tokenizer: PreTrainedTokenizerBase,
    train_dataset: Dataset,
    validation_dataset: Dataset | None,
    validation_split: float,
    *,
    block_size: int,
    seed: int,
    on_progress: Callable[[], None] = lambda: None,
) -> PreparedData:
    """Tokenize and pack the training data and the validation set (the validation dataset if
    given, else a seeded `validation_split` of the training examples; none when the split is 0).

    `on_progress` is called once per tokenizer batch so the caller can heartbeat.
    """
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise JobFailure(
            "base_model_invalid",
            "the base model's tokenizer has no end-of-sequence token",
            user_error=True,
        )
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize") as executor:
        encode = _batch_encoder(tokenizer)
        train = _TokenStream(encode, eos_id, executor)
        held_out = _TokenStream(encode, eos_id, executor)
        _tokenize(
            train, held_out, train_dataset, validation_dataset, validation_split, seed, on_progress
        )
        train.flush()
        held_out.flush()

    train_blocks = train.blocks(block_size)
    if train_blocks.shape[0] == 0:
        raise JobFailure(
            "dataset_too_small",
            f"the training data has {len(train.ids)} tokens after the validation split, fewer "
            f"than one block of block_size {block_size}; add data or lower block_size",
            user_error=True,
        )
    eval_set, short = _eval_blocks(held_out, block_size)
    return PreparedData(
        train=PackedBlocks(train_blocks),
        eval=eval_set,
        train_examples=train.examples,
        eval_examples=held_out.examples,
        train_tokens_total=len(train.ids),
        eval_tokens_total=len(held_out.ids),
        eval_is_short_block=short,
    )


def _tokenize(
    train: _TokenStream,
    held_out: _TokenStream,
    train_dataset: Dataset,
    validation_dataset: Dataset | None,
    validation_split: float,
    seed: int,
    on_progress: Callable[[], None],
) -> None:
    """Feed every example to its stream: the validation dataset's to `held_out`, else a seeded
    `validation_split` of the training examples."""
    if validation_dataset is not None:
        mask = None
        for index, text in enumerate(iter_examples(validation_dataset)):
            held_out.add(text)
            if index % TOKENIZE_BATCH == 0:
                on_progress()
    else:
        mask = validation_mask(count_examples(train_dataset), validation_split, seed)
    for index, text in enumerate(iter_examples(train_dataset)):
        # The file cannot change under us (stored files are immutable), so index < len(mask).
        stream = held_out if mask is not None and mask[index] else train
        stream.add(text)
        if index % TOKENIZE_BATCH == 0:
            on_progress()


def _eval_blocks(held_out: _TokenStream, block_size: int) -> tuple[PackedBlocks | None, bool]:
    held_out.flush()
    if held_out.examples == 0:
        return None, False
    blocks = held_out.blocks(block_size)
    if blocks.shape[0] > 0:
        return PackedBlocks(blocks), False
    if len(held_out.ids) < 2:  # a causal LM needs two tokens for one prediction
        return None, False
    # Dropping the tail would leave nothing to evaluate on; one shorter block still gives an
    # honest loss over the held-out tokens.
    return PackedBlocks(held_out.whole()), True


def steps_per_epoch(blocks: int, batch_size: int, accumulation: int) -> int:
    """Optimizer steps in one pass over `blocks` (as Trainer counts them, at least one)."""
    return max(math.ceil(blocks / batch_size) // accumulation, 1)
