"""Tokenize one example into input ids and labels, with -100 on every token the loss skips.

The most common fine-tuning bugs live here (prompts trained on, only the last assistant turn
trained), so the rules are few and exact:

- `text`: every token of the line and an appended EOS is trained.
- `prompt_completion`: the prompt and the completion are tokenized *separately* and the ids
  concatenated, then EOS appended. The prompt tokens get -100; the completion tokens and EOS are
  trained. Separate tokenization makes the boundary exact (no BPE merge can straddle it) and is
  what inference sees: the prompt is tokenized alone and the model generates the completion ids.
- `messages`: the conversation is rendered with the tokenizer's chat template, or, when it has
  none, with `DEFAULT_CHAT_TEMPLATE`, turn after turn with nothing in between:

      system, user:  "<|{role}|>\\n{content}\\n"
      assistant:     "<|assistant|>\\n{content}" + eos_token
      generation prompt (inference): "<|assistant|>\\n"

  The trained text of assistant turn i is exactly what the template adds *after the generation
  prompt*: the characters between render(messages[:i], add_generation_prompt=True) and
  render(messages[:i+1]). With the default template that is the content and EOS; with a ChatML
  template it is the content, `<|im_end|>` and the newline after it. Every assistant turn is
  trained; system and user turns and the role headers never are. The whole rendering is then
  tokenized once (`add_special_tokens=False`: templates write their own BOS), and a token is
  trained when its character span overlaps a trained span (HF's `{% generation %}` rule, so a
  token straddling a boundary is trained). Templates that re-render earlier turns differently
  once later turns exist (prefix-unstable) are refused with a clear error instead of guessed.

In every case BOS is not added (the seed pipeline never adds special tokens either). A batch of
examples comes out as a `TokenizedBatch`: flat arrays, not a Python object per token.
"""

from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from itertools import chain, pairwise
from typing import Any, TypeVar

import numpy as np
from transformers import PreTrainedTokenizerBase
from transformers.utils.chat_template_utils import render_jinja_template

from worker.errors import JobFailure

Tag = TypeVar("Tag")

IGNORE_INDEX = -100  # the label PyTorch's cross entropy and transformers' losses skip

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


@dataclass
class TokenizedExample:
    """One example: token ids and labels of the same length (labels are -100 where untrained)."""

    input_ids: list[int]
    labels: list[int]


def offsets_of(lengths: np.ndarray | list[int]) -> np.ndarray:
    """Where consecutive pieces of these lengths start, and where the last one ends (int64)."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, dtype=np.int64, out=offsets[1:])
    return offsets


@dataclass
class TokenizedBatch:
    """Many examples end to end: example i is `[offsets[i], offsets[i+1])` of the token arrays.

    What data preparation works on: a Python list per example, and a Python int per token,
    would cost more than the tokenizing itself.
    """

    input_ids: np.ndarray  # int32 (tokens,)
    trained: np.ndarray  # bool (tokens,): label = input id where True, -100 where False
    offsets: np.ndarray  # int64 (examples + 1,)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __iter__(self) -> Iterator[TokenizedExample]:
        for start, end in pairwise(self.offsets.tolist()):
            ids = self.input_ids[start:end]
            labels = np.where(self.trained[start:end], ids, IGNORE_INDEX)
            yield TokenizedExample(ids.tolist(), labels.tolist())

    @classmethod
    def of(cls, examples: Iterable[TokenizedExample]) -> "TokenizedBatch":
        """The examples' arrays (a label is -100 or its input id, as every shape makes it)."""
        examples = list(examples)
        lengths = [len(example.input_ids) for example in examples]
        tokens = sum(lengths)
        ids = chain.from_iterable(example.input_ids for example in examples)
        labels = chain.from_iterable(example.labels for example in examples)
        return cls(
            input_ids=np.fromiter(ids, dtype=np.int32, count=tokens),
            trained=np.fromiter(labels, dtype=np.int64, count=tokens) != IGNORE_INDEX,
            offsets=offsets_of(lengths),
        )

    @classmethod
    def concatenate(cls, batches: Sequence["TokenizedBatch"]) -> "TokenizedBatch":
        if not batches:
            return cls.of([])
        return cls(
            input_ids=np.concatenate([batch.input_ids for batch in batches]),
            trained=np.concatenate([batch.trained for batch in batches]),
            offsets=offsets_of(np.concatenate([np.diff(batch.offsets) for batch in batches])),
        )


def eos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    if tokenizer.eos_token_id is None:
        raise JobFailure(
            "base_model_invalid",
            "the base model's tokenizer has no end-of-sequence token",
            user_error=True,
        )
    return int(tokenizer.eos_token_id)


def chat_template_of(tokenizer: PreTrainedTokenizerBase) -> str:
    """The template `messages` datasets are rendered with: the tokenizer's, else the default."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.get_chat_template()  # picks "default" when there are named templates
    return DEFAULT_CHAT_TEMPLATE


def _render(
    tokenizer: PreTrainedTokenizerBase,
    template: str,
    conversations: list[list[dict[str, Any]]],
    gen: bool,
) -> list[str]:
    """Each conversation rendered as `apply_chat_template` renders it, in one call for all.

    `apply_chat_template` first turns message objects into dicts and drops the keys whose
    value is None (templates handle a missing key better). Dataset messages are JSON objects,
    so dropping the None values is all of that work that applies, and skipping the rest
    halves the rendering time. Unlike it, this also renders an empty conversation: the prompt
    before an opening assistant turn is one.
    """
    plain = [
        [{key: value for key, value in message.items() if value is not None} for message in chat]
        for chat in conversations
    ]
    try:
        rendered, _ = render_jinja_template(
            conversations=plain,
            chat_template=template,
            add_generation_prompt=gen,
            **tokenizer.special_tokens_map,
        )
    except Exception as exc:  # Jinja errors, raise_exception() in templates (role order, ...)
        raise JobFailure(
            "chat_template_failed",
            f"the chat template could not render a conversation: {exc}",
            user_error=True,
        ) from exc
    return rendered


def render_prompts(
    tokenizer: PreTrainedTokenizerBase, conversations: list[list[dict[str, Any]]]
) -> list[str]:
    """Conversations rendered as the job's chat template renders them up to the assistant's
    turn: prompts for samples of a chat model."""
    return _render(tokenizer, chat_template_of(tokenizer), conversations, gen=True)


def render_conversations(
    tokenizer: PreTrainedTokenizerBase, conversations: list[list[dict[str, Any]]]
) -> list[tuple[str, list[tuple[int, int]]]]:
    """Each rendered conversation and the [start, end) character spans of its assistant turns.

    A turn's span runs from the end of the rendering up to it, with the generation prompt, to
    the end of the rendering through it. Every rendering of a batch is made in one template
    call per kind (whole conversations, prompts, turns); the last turn of a conversation is the
    whole conversation, so it is not rendered twice.
    """
    template = chat_template_of(tokenizer)
    full = _render(tokenizer, template, conversations, gen=False)
    turns = [
        (number, index)
        for number, messages in enumerate(conversations)
        for index, message in enumerate(messages)
        if message["role"] == "assistant"
    ]
    prompts = _render(
        tokenizer, template, [conversations[n][:index] for n, index in turns], gen=True
    )
    earlier = [(n, index) for n, index in turns if index + 1 < len(conversations[n])]
    earlier_turns = dict(
        zip(
            earlier,
            _render(tokenizer, template, [conversations[n][: i + 1] for n, i in earlier], False),
            strict=True,
        )
    )
    spans: list[list[tuple[int, int]]] = [[] for _ in conversations]
    for (number, index), prompt in zip(turns, prompts, strict=True):
        turn = earlier_turns.get((number, index), full[number])
        if not (turn.startswith(prompt) and full[number].startswith(turn)):
            raise JobFailure(
                "chat_template_unsupported",
                f"the chat template renders assistant turn {index + 1} differently once later "
                "turns follow, so its trained tokens cannot be located exactly",
                user_error=True,
            )
        if len(turn) > len(prompt):
            spans[number].append((len(prompt), len(turn)))
    return list(zip(full, spans, strict=True))


def _end_to_end(pairs: list[list[tuple[int, int]]], bases: np.ndarray) -> np.ndarray:
    """Each rendering's (start, end) pairs moved to where the rendering starts, as (n, 2)."""
    counts = np.fromiter(map(len, pairs), dtype=np.int64, count=len(pairs))
    flat = chain.from_iterable(chain.from_iterable(pairs))
    return (
        np.fromiter(flat, dtype=np.int64, count=2 * int(counts.sum())).reshape(-1, 2)
        + np.repeat(bases, counts)[:, None]
    )


def _trained_by_spans(
    offsets: list[list[tuple[int, int]]],
    spans: list[list[tuple[int, int]]],
    text_lengths: list[int],
) -> np.ndarray:
    """Whether each token of each rendering is trained: its character span overlaps a trained
    span (a zero-width token counts as the character it sits on).

    All renderings are laid end to end with one character between them, so that one sorted
    search over every span answers for every token: for a token starting at `start`, the only
    span it can overlap is the first one ending after `start`. The gap keeps a zero-width token
    at the end of one rendering off a span at the start of the next.
    """
    bases = offsets_of([length + 1 for length in text_lengths])[:-1]
    pairs, span_pairs = _end_to_end(offsets, bases), _end_to_end(spans, bases)
    if not len(span_pairs):
        return np.zeros(len(pairs), dtype=bool)
    starts, ends = pairs[:, 0], pairs[:, 1]
    candidate = np.searchsorted(span_pairs[:, 1], starts, side="right")
    found = candidate < len(span_pairs)
    candidate_start = span_pairs[np.minimum(candidate, len(span_pairs) - 1), 0]
    return found & (candidate_start < np.maximum(ends, starts + 1))


def _backend(tokenizer: PreTrainedTokenizerBase) -> Any:
    """The Rust tokenizer of a fast tokenizer (else None), in the state `tokenizer(...)` uses:
    no truncation, no padding, its special-token handling. One ordinary call puts it there."""
    tokenizer([""], add_special_tokens=False, return_attention_mask=False, verbose=False)
    return getattr(tokenizer, "_tokenizer", None)


def batch_encoder(tokenizer: PreTrainedTokenizerBase) -> Callable[[list[str]], list[list[int]]]:
    """A function from texts to their token ids (no special tokens).

    For a fast tokenizer this calls the Rust backend's `encode_batch_fast` directly: the same
    ids as `tokenizer(texts)`, without the offsets and the per-example Python dicts that
    `BatchEncoding` builds, and with the GIL released while Rust works.
    """
    backend = _backend(tokenizer)
    if backend is not None and hasattr(backend, "encode_batch_fast"):

        def encode_fast(texts: list[str]) -> list[list[int]]:
            return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]

        return encode_fast

    def encode(texts: list[str]) -> list[list[int]]:
        return tokenizer(
            texts, add_special_tokens=False, return_attention_mask=False, verbose=False
        )["input_ids"]

    return encode


def _joined(pieces: list[list[int]], trained_parts: tuple[bool, ...], eos: int) -> TokenizedBatch:
    """Examples of `len(trained_parts)` consecutive pieces each, then a trained EOS; the tokens
    of an example's k-th piece are trained when `trained_parts[k]` is."""
    parts = len(trained_parts)
    lengths = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))
    ids = np.fromiter(chain.from_iterable(pieces), dtype=np.int32, count=int(lengths.sum()))
    trained = np.repeat(np.tile(trained_parts, len(pieces) // parts), lengths)
    example_ends = np.cumsum(lengths).reshape(-1, parts)[:, -1]
    return TokenizedBatch(
        input_ids=np.insert(ids, example_ends, eos),
        trained=np.insert(trained, example_ends, True),
        offsets=offsets_of(lengths.reshape(-1, parts).sum(axis=1) + 1),
    )


class BatchTokenizer:
    """Tokenizes and masks batches of examples of one dataset shape, one tokenizer call per batch.

    A batch's work is the call into the Rust tokenizer, which releases the GIL, and the Python
    on either side of it (rendering conversations before; reading ids and offsets into arrays
    after). `pipelined` runs a batch's tokenizer call on a thread while the caller's thread
    builds the arrays of the batch before it and reads and renders the next.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, shape: str) -> None:
        if shape not in ("text", "prompt_completion", "messages"):
            raise JobFailure("invalid_dataset", f"unknown dataset shape {shape!r}", user_error=True)
        if shape == "messages" and not tokenizer.is_fast:
            raise JobFailure(
                "base_model_invalid",
                "chat datasets need a fast (Rust) tokenizer for exact loss masks",
                user_error=True,
            )
        self.tokenizer = tokenizer
        self.shape = shape
        self.eos = eos_id(tokenizer)
        # Set up here, once: setting up touches the tokenizer's state, which must not happen
        # while a thread is inside it. Conversations need the offsets; the other shapes ids.
        self.encode: Callable[[list[str]], Any] = (
            partial(_backend(tokenizer).encode_batch, add_special_tokens=False)
            if shape == "messages"
            else batch_encoder(tokenizer)
        )

    def __call__(self, records: Sequence[Any]) -> TokenizedBatch:
        encode, build = self._steps(records)
        return build(encode())

    def pipelined(
        self, batches: Iterable[tuple[Tag, Sequence[Any]]]
    ) -> Iterator[tuple[Tag, TokenizedBatch]]:
        """Each batch tokenized, in order, with its tag; at most two batches in flight."""
        in_flight: list[tuple[Tag, Future[Any], Callable[[Any], TokenizedBatch]]] = []
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize") as executor:
            for tag, records in batches:
                encode, build = self._steps(records)
                in_flight.append((tag, executor.submit(encode), build))
                if len(in_flight) == 2:
                    yield _built(*in_flight.pop(0))
            for waiting in in_flight:
                yield _built(*waiting)

    def _steps(
        self, records: Sequence[Any]
    ) -> tuple[Callable[[], Any], Callable[[Any], TokenizedBatch]]:
        """The tokenizer call for these records, and what builds the batch from its result."""
        build: Callable[[Any], TokenizedBatch]
        if self.shape == "messages":
            rendered = render_conversations(self.tokenizer, [r["messages"] for r in records])
            texts = [text for text, _ in rendered]
            build = partial(_masked_by_spans, rendered=rendered)
        elif self.shape == "text":
            texts = [record if isinstance(record, str) else record["text"] for record in records]
            build = partial(_joined, trained_parts=(True,), eos=self.eos)
        else:
            # Side by side in one call, yet each text is tokenized on its own: the boundary stays
            # exact.
            texts = [text for r in records for text in (r["prompt"], r["completion"])]
            build = partial(_joined, trained_parts=(False, True), eos=self.eos)
        return partial(self.encode, texts), build


def _built(
    tag: Tag, encoded: Future[Any], build: Callable[[Any], TokenizedBatch]
) -> tuple[Tag, TokenizedBatch]:
    return tag, build(encoded.result())


def _masked_by_spans(
    encodings: list[Any], rendered: list[tuple[str, list[tuple[int, int]]]]
) -> TokenizedBatch:
    """Rendered conversations' encodings (with offsets), masked by their assistant spans."""
    ids = [encoding.ids for encoding in encodings]
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    return TokenizedBatch(
        input_ids=np.fromiter(chain.from_iterable(ids), dtype=np.int32, count=int(lengths.sum())),
        trained=_trained_by_spans(
            [encoding.offsets for encoding in encodings],
            [spans for _, spans in rendered],
            [len(text) for text, _ in rendered],
        ),
        offsets=offsets_of(lengths),
    )


def tokenize_batch(
    tokenizer: PreTrainedTokenizerBase, records: Sequence[Any], shape: str
) -> TokenizedBatch:
    """Tokenize and mask one batch of examples (see the module docstring for the rules)."""
    return BatchTokenizer(tokenizer, shape)(records)


def tokenize_examples(
    tokenizer: PreTrainedTokenizerBase, records: Sequence[Any], shape: str
) -> list[TokenizedExample]:
    """`tokenize_batch`, one list of ids and labels per example."""
    return list(tokenize_batch(tokenizer, records, shape))


def tokenize_example(
    tokenizer: PreTrainedTokenizerBase, record: Any, shape: str
) -> TokenizedExample:
    """One example's ids and labels; see the module docstring for the exact rules."""
    return tokenize_examples(tokenizer, [record], shape)[0]


def render_marked(
    tokenizer: PreTrainedTokenizerBase,
    example: TokenizedExample,
    open_mark: str = "«",
    close_mark: str = "»",
) -> str:
    """The example as text with every trained run of tokens wrapped in «…», for the dry run."""
    parts: list[str] = []
    run: list[int] = []
    trained = False
    for token, label in [*zip(example.input_ids, example.labels, strict=True), (None, None)]:
        is_trained = label is not None and label != IGNORE_INDEX
        if token is None or (run and is_trained != trained):
            text = tokenizer.decode(run, skip_special_tokens=False)
            parts.append(f"{open_mark}{text}{close_mark}" if trained and run else text)
            run = []
        if token is not None:
            run.append(token)
            trained = is_trained
    return "".join(parts)
