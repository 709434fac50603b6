"""Loss masks: exactly which tokens each dataset shape trains, with and without a chat template."""

from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from tests.chat_model import IM_END, build_chat_model
from tests.conftest import TINY_MODEL
from worker.errors import JobFailure
from worker.masking import (
    DEFAULT_CHAT_TEMPLATE,
    IGNORE_INDEX,
    BatchTokenizer,
    TokenizedBatch,
    TokenizedExample,
    _trained_by_spans,
    chat_template_of,
    render_conversations,
    render_marked,
    tokenize_batch,
    tokenize_example,
    tokenize_examples,
)

EOS = "<|endoftext|>"
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "yo"},
    {"role": "user", "content": "and?"},
    {"role": "assistant", "content": "done."},
]


@pytest.fixture(scope="module")
def plain(models_dir: Path) -> PreTrainedTokenizerBase:
    """The tiny byte-level BPE tokenizer: no chat template."""
    return AutoTokenizer.from_pretrained(models_dir / TINY_MODEL)


@pytest.fixture(scope="module")
def chat(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerBase:
    """The same tokenizer with a ChatML template and <|im_start|>/<|im_end|> tokens."""
    return AutoTokenizer.from_pretrained(build_chat_model(tmp_path_factory.mktemp("chat")))


def ids_of(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def runs(tokenizer: PreTrainedTokenizerBase, example: TokenizedExample) -> list[tuple[str, bool]]:
    """The example as maximal runs of (decoded text, trained): equal runs mean equal masks."""
    out: list[tuple[list[int], bool]] = []
    for token, label in zip(example.input_ids, example.labels, strict=True):
        trained = label != IGNORE_INDEX
        if trained:
            assert label == token  # a trained label is always the input id itself
        if out and out[-1][1] == trained:
            out[-1][0].append(token)
        else:
            out.append(([token], trained))
    return [(tokenizer.decode(tokens), trained) for tokens, trained in out]


class TestText:
    def test_every_token_and_eos_is_trained(self, plain: PreTrainedTokenizerBase) -> None:
        example = tokenize_example(plain, "the cat sat on the mat.", "text")
        expected = ids_of(plain, "the cat sat on the mat.") + [plain.eos_token_id]
        assert example.input_ids == expected
        assert example.labels == expected

    def test_jsonl_text_records_read_the_text_field(self, plain: PreTrainedTokenizerBase) -> None:
        example = tokenize_example(plain, {"text": "the dog"}, "text")
        assert example.input_ids == ids_of(plain, "the dog") + [plain.eos_token_id]


class TestPromptCompletion:
    def test_prompt_masked_completion_and_eos_trained(self, plain: PreTrainedTokenizerBase) -> None:
        prompt, completion = "Question: what sat on the mat?", " Answer: the cat."
        example = tokenize_example(
            plain, {"prompt": prompt, "completion": completion}, "prompt_completion"
        )
        p, c, eos = ids_of(plain, prompt), ids_of(plain, completion), plain.eos_token_id
        assert example.input_ids == p + c + [eos]
        assert example.labels == [IGNORE_INDEX] * len(p) + c + [eos]
        assert runs(plain, example) == [(prompt, False), (completion + EOS, True)]

    def test_boundary_is_exact_even_where_bpe_would_merge(
        self, plain: PreTrainedTokenizerBase
    ) -> None:
        # Tokenized together, "the cat" merges across the boundary; apart, it cannot.
        assert ids_of(plain, "the cat") != ids_of(plain, "the ca") + ids_of(plain, "t")
        example = tokenize_example(
            plain, {"prompt": "the ca", "completion": "t"}, "prompt_completion"
        )
        assert runs(plain, example) == [("the ca", False), ("t" + EOS, True)]

    def test_empty_completion_trains_only_eos(self, plain: PreTrainedTokenizerBase) -> None:
        example = tokenize_example(plain, {"prompt": "hi", "completion": ""}, "prompt_completion")
        assert example.labels == [IGNORE_INDEX] * len(ids_of(plain, "hi")) + [plain.eos_token_id]

    def test_batch_equals_one_by_one(self, plain: PreTrainedTokenizerBase) -> None:
        records = [{"prompt": f"Q{i}:", "completion": f" A{i}."} for i in range(5)]
        batch = tokenize_examples(plain, records, "prompt_completion")
        assert batch == [tokenize_example(plain, r, "prompt_completion") for r in records]


class TestTokenizedBatch:
    """Many examples in flat arrays, exactly as the rules above make them one by one."""

    RECORDS = [
        {"prompt": "Question: what sat on the mat?", "completion": " The cat."},
        {"prompt": "", "completion": " no prompt"},
        {"prompt": "no completion", "completion": ""},
        {"prompt": "", "completion": ""},
        {"prompt": "naïve ✓", "completion": " ✓✓"},
    ]

    def test_prompt_completion_examples_follow_the_rules(
        self, plain: PreTrainedTokenizerBase
    ) -> None:
        batch = tokenize_batch(plain, self.RECORDS, "prompt_completion")
        eos = plain.eos_token_id
        for example, record in zip(batch, self.RECORDS, strict=True):
            prompt = ids_of(plain, record["prompt"])
            completion = ids_of(plain, record["completion"])
            assert example.input_ids == prompt + completion + [eos]
            assert example.labels == [IGNORE_INDEX] * len(prompt) + completion + [eos]
        assert len(batch) == len(self.RECORDS)
        # The dtypes the packer and the token cache keep.
        assert batch.input_ids.dtype == np.int32
        assert batch.trained.dtype == np.bool_
        assert batch.offsets.dtype == np.int64

    def test_text_examples_are_all_trained(self, plain: PreTrainedTokenizerBase) -> None:
        texts = ["the cat sat.", "", "the dog"]
        batch = tokenize_batch(plain, texts, "text")
        assert [example.input_ids for example in batch] == [
            ids_of(plain, text) + [plain.eos_token_id] for text in texts
        ]
        assert batch.trained.all()

    def test_lists_and_arrays_round_trip(self, plain: PreTrainedTokenizerBase) -> None:
        batch = tokenize_batch(plain, self.RECORDS, "prompt_completion")
        again = TokenizedBatch.of(list(batch))
        for name in ("input_ids", "trained", "offsets"):
            np.testing.assert_array_equal(getattr(again, name), getattr(batch, name))

    def test_concatenate_keeps_every_example_in_order(self, plain: PreTrainedTokenizerBase) -> None:
        parts = [self.RECORDS[:2], [], self.RECORDS[2:]]
        batches = [tokenize_batch(plain, part, "prompt_completion") for part in parts]
        whole = TokenizedBatch.concatenate(batches)
        assert list(whole) == tokenize_examples(plain, self.RECORDS, "prompt_completion")
        assert len(TokenizedBatch.concatenate([])) == 0


class TestMessagesDefaultTemplate:
    """A tokenizer without a chat template gets the documented default."""

    def test_every_assistant_turn_is_trained_and_nothing_else(
        self, plain: PreTrainedTokenizerBase
    ) -> None:
        assert plain.chat_template is None
        example = tokenize_example(plain, {"messages": CONVERSATION}, "messages")
        assert runs(plain, example) == [
            ("<|system|>\nBe brief.\n<|user|>\nhi\n<|assistant|>\n", False),
            ("yo" + EOS, True),
            ("<|user|>\nand?\n<|assistant|>\n", False),
            ("done." + EOS, True),
        ]

    def test_ids_are_the_whole_rendering_tokenized_once(
        self, plain: PreTrainedTokenizerBase
    ) -> None:
        example = tokenize_example(plain, {"messages": CONVERSATION}, "messages")
        rendered = plain.apply_chat_template(
            CONVERSATION, chat_template=DEFAULT_CHAT_TEMPLATE, tokenize=False
        )
        assert example.input_ids == ids_of(plain, rendered)
        # EOS is the real end-of-sequence token, not its text spelled out in bytes.
        assert example.input_ids.count(plain.eos_token_id) == 2

    def test_trailing_user_turn_and_assistant_first(self, plain: PreTrainedTokenizerBase) -> None:
        messages = [
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "bye"},
        ]
        example = tokenize_example(plain, {"messages": messages}, "messages")
        assert runs(plain, example) == [
            ("<|assistant|>\n", False),
            ("Hello." + EOS, True),
            ("<|user|>\nbye\n", False),
        ]

    def test_role_markers_and_unicode_inside_content_stay_content(
        self, plain: PreTrainedTokenizerBase
    ) -> None:
        messages = [
            {"role": "user", "content": "say <|assistant|> ✓"},
            {"role": "assistant", "content": "<|user|>\nnaïve ✓"},
        ]
        example = tokenize_example(plain, {"messages": messages}, "messages")
        assert runs(plain, example) == [
            ("<|user|>\nsay <|assistant|> ✓\n<|assistant|>\n", False),
            ("<|user|>\nnaïve ✓" + EOS, True),
        ]


class TestMessagesChatTemplate:
    """A tokenizer with its own (ChatML) template and control tokens."""

    @pytest.mark.parametrize("with_template", [True, False])
    def test_conversations_render_as_apply_chat_template_renders_them(
        self, chat: PreTrainedTokenizerBase, plain: PreTrainedTokenizerBase, with_template: bool
    ) -> None:
        tokenizer = chat if with_template else plain
        with_none = [{"role": "user", "content": "hi", "name": None}, *CONVERSATION[2:3]]
        conversations = [CONVERSATION, CONVERSATION[:2], with_none]
        rendered = [text for text, _ in render_conversations(tokenizer, conversations)]
        assert rendered == [
            tokenizer.apply_chat_template(
                conversation, chat_template=chat_template_of(tokenizer), tokenize=False
            )
            for conversation in conversations
        ]

    def test_every_assistant_turn_with_its_end_marker(self, chat: PreTrainedTokenizerBase) -> None:
        example = tokenize_example(chat, {"messages": CONVERSATION}, "messages")
        assert runs(chat, example) == [
            (
                "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
                "<|im_start|>assistant\n",
                False,
            ),
            ("yo<|im_end|>\n", True),
            ("<|im_start|>user\nand?<|im_end|>\n<|im_start|>assistant\n", False),
            ("done.<|im_end|>\n", True),
        ]
        rendered = chat.apply_chat_template(CONVERSATION, tokenize=False)
        assert example.input_ids == ids_of(chat, rendered)

    def test_end_marker_is_one_trained_control_token(self, chat: PreTrainedTokenizerBase) -> None:
        example = tokenize_example(chat, {"messages": CONVERSATION}, "messages")
        end = chat.convert_tokens_to_ids(IM_END)
        trained_ends = [
            i
            for i, (t, label) in enumerate(zip(example.input_ids, example.labels, strict=True))
            if t == end and label == end
        ]
        assert len(trained_ends) == 2  # one per assistant turn; the other 3 are masked
        assert example.input_ids.count(end) == 5

    def test_prefix_unstable_template_is_refused(self, chat: PreTrainedTokenizerBase) -> None:
        # Marks the last message: earlier turns render differently once more turns follow.
        unstable = (
            "{% for m in messages %}{{ m['role'] + ':' + m['content'] }}"
            "{% if loop.last %}{{ ' (last)' }}{% endif %}{{ '\\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}"
        )
        tokenizer = AutoTokenizer.from_pretrained(chat.name_or_path)
        tokenizer.chat_template = unstable
        with pytest.raises(JobFailure) as caught:
            tokenize_example(tokenizer, {"messages": CONVERSATION}, "messages")
        assert caught.value.code == "chat_template_unsupported"
        assert caught.value.user_error

    def test_template_errors_become_user_errors(self, chat: PreTrainedTokenizerBase) -> None:
        tokenizer = AutoTokenizer.from_pretrained(chat.name_or_path)
        tokenizer.chat_template = (
            "{% if messages[0]['role'] == 'system' %}"
            "{{ raise_exception('System role not supported') }}{% endif %}"
        )
        with pytest.raises(JobFailure) as caught:
            tokenize_example(tokenizer, {"messages": CONVERSATION}, "messages")
        assert caught.value.code == "chat_template_failed"
        assert "System role not supported" in caught.value.message


class TestRenderMarked:
    def test_marks_trained_spans(self, plain: PreTrainedTokenizerBase) -> None:
        example = tokenize_example(
            plain, {"prompt": "Q: hi?", "completion": " A: yo."}, "prompt_completion"
        )
        assert render_marked(plain, example) == "Q: hi?« A: yo.<|endoftext|>»"

    def test_marks_every_assistant_turn(self, chat: PreTrainedTokenizerBase) -> None:
        example = tokenize_example(chat, {"messages": CONVERSATION[1:3]}, "messages")
        assert render_marked(chat, example, "[[", "]]") == (
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n[[yo<|im_end|>\n]]"
        )


def test_unknown_shape_is_refused(plain: PreTrainedTokenizerBase) -> None:
    with pytest.raises(JobFailure):
        tokenize_example(plain, "x", "tabular")


@pytest.mark.parametrize("shape", ["text", "prompt_completion", "messages"])
def test_pipelined_batches_come_back_in_order_as_one_by_one(
    chat: PreTrainedTokenizerBase, shape: str
) -> None:
    records = {
        "text": [f"line {i} of the text" for i in range(7)],
        "prompt_completion": [{"prompt": f"Q{i}:", "completion": f" A{i}."} for i in range(7)],
        "messages": [{"messages": CONVERSATION[: 3 + i % 3]} for i in range(7)],
    }[shape]
    batches = [(tag, records[start : start + 2]) for tag, start in enumerate(range(0, 7, 2))]
    tokenize = BatchTokenizer(chat, shape)
    pipelined = list(tokenize.pipelined(batches))
    assert [tag for tag, _ in pipelined] == [0, 1, 2, 3]
    for (_, batch), (_, records_of_batch) in zip(pipelined, batches, strict=True):
        assert list(batch) == tokenize_examples(chat, records_of_batch, shape)


def _trained_one_by_one(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """The rule as it reads, per token: its characters (at least the one it sits on) overlap
    some trained span."""
    return [
        any(span_start < max(end, start + 1) and start < span_end for span_start, span_end in spans)
        for start, end in offsets
    ]


class TestTrainedBySpans:
    def test_many_renderings_at_once_match_the_rule_per_token(self) -> None:
        rng = np.random.default_rng(3)
        for _ in range(300):
            count = int(rng.integers(0, 5))
            lengths, offsets, spans = [], [], []
            for _ in range(count):
                length = int(rng.integers(0, 30))
                cuts = sorted({0, length, *rng.integers(0, length + 1, size=6).tolist()})
                tokens = list(pairwise(cuts))
                # Zero-width tokens anywhere, the text's very end included.
                tokens += [(at, at) for at in rng.integers(0, length + 1, size=2).tolist()]
                tokens.sort()
                edges = sorted(set(rng.integers(0, length + 1, size=4).tolist()))
                example_spans = [(a, b) for a, b in pairwise(edges)][::2]
                lengths.append(length)
                offsets.append(tokens)
                spans.append(example_spans)
            trained = _trained_by_spans(offsets, spans, lengths)
            expected = [
                flag
                for tokens, example_spans in zip(offsets, spans, strict=True)
                for flag in _trained_one_by_one(tokens, example_spans)
            ]
            assert trained.tolist() == expected, (offsets, spans, lengths)
