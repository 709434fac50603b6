"""The streaming dataset validator: every accepted shape, every rejection with its exact line and
message, the same answers whatever the chunk boundaries, and never text when the file's name or
content says it is something else (CSV and Parquet themselves: test_dataset_tables.py)."""

import io
import json
import random

import pytest

from shared.dataset_formats import (
    DatasetError,
    DatasetSummary,
    DatasetValidator,
    iter_examples,
    read_chunks,
    validate,
)
from tests.seed_data import TECH_NEWS


def chunked(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def jsonl(*values: object) -> bytes:
    return b"".join(json.dumps(value).encode() + b"\n" for value in values)


def rejection(
    data: bytes, format: str = "auto", size: int | None = None, filename: str | None = None
) -> DatasetError:
    with pytest.raises(DatasetError) as caught:
        validate(chunked(data, size) if size else [data], format, filename)
    return caught.value


PC = {"prompt": "Summarize: Apple released a phone.", "completion": "A new iPhone."}
CHAT = {
    "messages": [
        {"role": "system", "content": "You summarize tech news."},
        {"role": "user", "content": "Apple released a phone."},
        {"role": "assistant", "content": "A new iPhone."},
    ]
}


class TestAccepted:
    def test_seed_tech_news_is_five_text_examples(self):
        assert validate([TECH_NEWS.encode()]) == DatasetSummary("text", "text", 5)

    @pytest.mark.parametrize(
        ("data", "shape", "examples"),
        [
            (jsonl({"text": "a"}, {"text": "b"}), "text", 2),
            (jsonl(PC, PC, PC), "prompt_completion", 3),
            (jsonl(CHAT, {"messages": [{"role": "assistant", "content": "hi"}]}), "messages", 2),
        ],
    )
    def test_jsonl_shapes(self, data, shape, examples):
        assert validate([data], "jsonl") == DatasetSummary("jsonl", shape, examples)
        assert validate([data]) == DatasetSummary("jsonl", shape, examples)  # auto

    def test_extra_keys_are_ignored(self):
        data = jsonl({**PC, "id": 1}, {**PC, "meta": {"source": "x"}})
        assert validate([data]) == DatasetSummary("jsonl", "prompt_completion", 2)

    def test_blank_lines_are_skipped_in_both_formats(self):
        assert validate([b"\n  \na\n\t\n\nb\n\n"]).examples == 2
        assert validate([b'\n{"text": "a"}\n   \n{"text": "b"}\n\n']).examples == 2

    def test_last_line_without_newline(self):
        assert validate([b"a\nb"]).examples == 2
        assert validate([b'{"text": "a"}']) == DatasetSummary("jsonl", "text", 1)

    def test_crlf_and_bom(self):
        data = b'\xef\xbb\xbf{"text": "a"}\r\n{"text": "b"}\r\n\r\n'
        assert validate([data]) == DatasetSummary("jsonl", "text", 2)
        assert validate([b"\xef\xbb\xbfone\r\ntwo\r\n"]) == DatasetSummary("text", "text", 2)

    @pytest.mark.parametrize(
        "data",
        [b"plain words\n", b'"a string"\n', b"42\n", b"{not json\n", b"\n\nhi\n", b"text\n"],
    )
    def test_auto_picks_text_unless_the_first_line_is_an_object(self, data):
        assert validate([data]) == DatasetSummary("text", "text", 1)

    def test_text_format_takes_json_lines_as_text(self):
        assert validate([jsonl(PC, {"text": "x"})], "text") == DatasetSummary("text", "text", 2)

    def test_non_ascii_text(self):
        data = "café ☕\n東京 🚀\n".encode()
        assert validate([data]) == DatasetSummary("text", "text", 2)


CASES = [
    # (data, format, line, message)
    (b"ok\nfine\nabcd\xffz\n", "auto", 3, "line 3: not valid UTF-8 (byte 0xff at column 5)"),
    (b"ok\ncaf\xc3\n", "text", 2, "line 2: not valid UTF-8 (byte 0xc3 at column 4)"),
    (b"\xff\xfeh\x00i\x00", "auto", 1, "line 1: not valid UTF-8 (byte 0xff at column 1)"),
    (b"", "auto", None, "the file holds no examples (it is empty or has only blank lines)"),
    (
        b"\n \r\n\t\n",
        "text",
        None,
        "the file holds no examples (it is empty or has only blank lines)",
    ),
    (b"", "jsonl", None, "the file holds no examples (it is empty or has only blank lines)"),
    (
        jsonl(PC, PC, PC, PC, PC, PC, {"text": "x"}),
        "jsonl",
        7,
        "line 7: expected the prompt/completion shape of line 1, got text",
    ),
    (
        b"\n" + jsonl(CHAT, PC),
        "auto",
        3,
        "line 3: expected the messages shape of line 2, got prompt/completion",
    ),
    (
        jsonl(*[{"text": "a"}] * 6, [1, 2]),
        "jsonl",
        7,
        "line 7: expected a JSON object, got a list",
    ),
    (jsonl({"text": "a"}, "s"), "jsonl", 2, "line 2: expected a JSON object, got a string"),
    (jsonl({"text": "a"}, None), "jsonl", 2, "line 2: expected a JSON object, got null"),
    (
        jsonl({"text": "a"}) + b'{"text": "b",}\n',
        "auto",
        2,
        "line 2: not valid JSON (Expecting property name enclosed in double quotes at column 14)",
    ),
    (b"plain text\n", "jsonl", 1, "line 1: not valid JSON (Expecting value at column 1)"),
    (jsonl(PC, PC, {"prompt": "p"}), "jsonl", 3, 'line 3: missing field "completion"'),
    (jsonl({"completion": "c"}), "jsonl", 1, 'line 1: missing field "prompt"'),
    (jsonl(PC, {"other": 1}), "jsonl", 2, 'line 2: missing field "prompt"'),
    (
        jsonl({"id": 1, "body": "x"}),
        "auto",
        1,
        'line 1: expected an object with "text", "prompt" and "completion", or "messages"; '
        'got keys "id", "body"',
    ),
    (
        jsonl({}),
        "auto",
        1,
        'line 1: expected an object with "text", "prompt" and "completion", or "messages"; '
        "got keys none",
    ),
    (jsonl({"text": 5}), "jsonl", 1, 'line 1: field "text" must be a string, got a number'),
    (
        jsonl(PC, {"prompt": "p", "completion": True}),
        "jsonl",
        2,
        'line 2: field "completion" must be a string, got a boolean',
    ),
    (
        jsonl({"messages": "hi"}),
        "jsonl",
        1,
        'line 1: field "messages" must be a list, got a string',
    ),
    (jsonl({"messages": []}), "jsonl", 1, 'line 1: field "messages" is empty'),
    (
        jsonl({"messages": ["hi"]}),
        "jsonl",
        1,
        "line 1: messages[0] must be an object, got a string",
    ),
    (
        jsonl({"messages": [{"content": "hi"}]}),
        "jsonl",
        1,
        'line 1: messages[0]: missing field "role"',
    ),
    (
        jsonl(CHAT, {"messages": [{"role": "assistant"}]}),
        "jsonl",
        2,
        'line 2: messages[0]: missing field "content"',
    ),
    (
        jsonl({"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}),
        "jsonl",
        1,
        'line 1: messages[1].role must be "system", "user" or "assistant", got "bot"',
    ),
    (
        jsonl({"messages": [{"role": 3, "content": "a"}]}),
        "jsonl",
        1,
        'line 1: messages[0].role must be "system", "user" or "assistant", got a number',
    ),
    (
        jsonl({"messages": [{"role": "assistant", "content": None}]}),
        "jsonl",
        1,
        "line 1: messages[0].content must be a string, got null",
    ),
    (
        jsonl(CHAT, {"messages": [{"role": "user", "content": "a"}]}),
        "jsonl",
        2,
        'line 2: field "messages" has no "assistant" message (at least one is needed)',
    ),
    (
        b'{"text": "a"}\n{"text": ' + b"9" * 5000 + b"}\n",
        "jsonl",
        2,
        "line 2: not valid JSON (Exceeds the limit (4300 digits) for integer string conversion: "
        "value has 5000 digits; use sys.set_int_max_str_digits() to increase the limit)",
    ),
    (
        b'{"text": ' + b"[" * 100_000 + b"\n",
        "jsonl",
        1,
        "line 1: not valid JSON (nested too deeply)",
    ),
]

# Every case split at several sizes (one byte at a time only through the small ones).
CHUNKED_CASES = [
    (*case, size)
    for case in CASES
    for size in (1, 2, 3, 5, 8, 13, 64, 4096)
    if len(case[0]) < 10_000 or size >= 64
]


class TestRejected:
    @pytest.mark.parametrize(("data", "format", "line", "message"), CASES)
    def test_exact_line_and_message(self, data, format, line, message):
        error = rejection(data, format)
        assert (error.line, str(error)) == (line, message)

    @pytest.mark.parametrize(("data", "format", "line", "message", "size"), CHUNKED_CASES)
    def test_same_answer_at_any_chunk_size(self, data, format, line, message, size):
        error = rejection(data, format, size)
        assert (error.line, str(error)) == (line, message)

    def test_a_line_over_the_limit_complete(self):
        validator = DatasetValidator("text", max_line_bytes=16)
        with pytest.raises(DatasetError) as caught:
            validator.feed(b"short\n" + b"x" * 17 + b"\nmore\n")
        assert caught.value.line == 2
        assert str(caught.value) == (
            "line 2: longer than 16 bytes, the limit for one line (is the file missing newlines?)"
        )

    def test_a_line_over_the_limit_is_stopped_before_its_end(self):
        # No newline ever comes: the validator must not keep buffering.
        validator = DatasetValidator("text", max_line_bytes=16)
        validator.feed(b"ok\n" + b"x" * 10)
        with pytest.raises(DatasetError) as caught:
            validator.feed(b"x" * 10)
        assert caught.value.line == 2

    def test_exactly_at_the_limit_is_fine(self):
        validator = DatasetValidator("text", max_line_bytes=16)
        validator.feed(b"x" * 16 + b"\n" + b"y" * 16)
        assert validator.finish().examples == 2

    def test_the_first_bad_line_wins_within_one_chunk(self):
        # An invalid JSON line before an undecodable one: the earlier one is reported.
        error = rejection(jsonl({"text": "a"}) + b"{oops\n" + b"\xff\n", "jsonl")
        assert error.line == 2
        error = rejection(jsonl({"text": "a"}) + b"{oops\n" + b"\xff\n", "text")
        assert error.line == 3

    def test_an_error_is_raised_while_feeding_not_only_at_the_end(self):
        validator = DatasetValidator("jsonl")
        validator.feed(jsonl(PC))
        with pytest.raises(DatasetError):
            validator.feed(b"[]\n")


class TestChunkBoundaries:
    DATA = (
        "\ufeffcafé ☕ naïve\r\n東京 🚀 ünïcödé\r\n\r\n€ at the end €\r\nno newline at the end 😀"
    ).encode()

    @pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 7, 11, 64, 10_000])
    def test_text_splits_anywhere(self, size):
        assert validate(chunked(self.DATA, size)) == DatasetSummary("text", "text", 4)
        lines = list(iter_examples(chunked(self.DATA, size), "text"))
        assert lines == [
            "café ☕ naïve",
            "東京 🚀 ünïcödé",
            "€ at the end €",
            "no newline at the end 😀",
        ]

    def test_text_counts_follow_the_rule_at_any_chunk_size(self):
        """Counted on bytes when a block is ASCII, else on text: both give the rule's count."""
        rng = random.Random(5)
        ascii_space = [chr(code) for code in range(128) if chr(code).isspace() and code != 10]
        unicode_space = [*ascii_space, "\u3000", "\xa0", "\x85", "\u2028"]
        for _ in range(1000):
            spaces = rng.choice([ascii_space, unicode_space])
            letters = rng.choice([["a", "b"], ["a", "é"]])
            lines = []
            for _ in range(rng.randint(1, 30)):
                kind = rng.random()
                if kind < 0.1:  # blank: nothing, or only whitespace
                    line = "".join(rng.choices(spaces, k=rng.randint(0, 3)))
                elif kind < 0.2:  # whitespace first, then words
                    line = rng.choice(spaces) + "".join(rng.choices([*letters, " "], k=5))
                else:  # words first
                    line = rng.choice(letters) + "".join(rng.choices([*letters, *spaces], k=8))
                lines.append(line)
            text = "".join(line + rng.choice(["\n", "\r\n"]) for line in lines)
            text = text[: rng.randint(len(text) - 3, len(text))]  # maybe no final newline
            expected = sum(1 for line in text.split("\n") if line.strip() != "")
            data = text.encode()
            for size in (1, 7, 64, len(data) or 1):
                if expected == 0:
                    assert rejection(data, "text", size).line is None
                else:
                    counted = validate(chunked(data, size), "text")
                    assert counted.examples == expected, (text, size)

    @pytest.mark.parametrize("size", [1, 2, 3, 5, 9, 64])
    def test_jsonl_splits_anywhere(self, size):
        data = b"\xef\xbb\xbf" + jsonl(
            CHAT, {"messages": [{"role": "assistant", "content": "é😀"}]}
        )
        data = data.replace(b"\n", b"\r\n")
        assert validate(chunked(data, size)) == DatasetSummary("jsonl", "messages", 2)

    @pytest.mark.parametrize("size", [1, 2, 3])
    def test_bad_utf8_position_is_the_same_when_split(self, size):
        data = "ok\nüü".encode() + b"\xe2\x82" + b"x\n"  # a euro sign cut short
        error = rejection(data, "text", size)
        assert str(error) == "line 2: not valid UTF-8 (byte 0xe2 at column 5)"

    def test_only_crlf_pairs_lose_their_cr(self):
        examples = list(iter_examples([b"a\r\r\nb\rc\r\n"], "text"))
        assert examples == ["a\r", "b\rc"]

    def test_bom_only_at_the_start_of_the_file(self):
        examples = list(iter_examples([b"\xef\xbb\xbfa\n\xef\xbb\xbfb\n"], "text"))
        assert examples == ["a", "\ufeffb"]


class TestFormatGivenLate:
    """A multipart form may send `format` after the file: both readings run until it comes."""

    def test_object_lines_become_text_when_told_so(self):
        validator = DatasetValidator(None)
        validator.feed(jsonl(PC, {"text": "other shape"}))
        validator.set_format("text")
        assert validator.finish() == DatasetSummary("text", "text", 2)

    def test_a_jsonl_error_waits_for_the_format(self):
        validator = DatasetValidator(None)
        validator.feed(jsonl(PC, {"text": "other shape"}))  # fine as text, wrong as JSONL
        with pytest.raises(DatasetError) as caught:
            validator.set_format("jsonl")
        assert caught.value.line == 2

    def test_no_format_at_all_means_auto(self):
        validator = DatasetValidator(None)
        validator.feed(jsonl(PC, {"text": "other shape"}))
        with pytest.raises(DatasetError) as caught:
            validator.finish()
        assert caught.value.line == 2
        validator = DatasetValidator(None)
        validator.feed(b"plain\n")
        assert validator.finish() == DatasetSummary("text", "text", 1)

    def test_a_later_fatal_error_picks_by_format(self):
        data = jsonl(PC) + b"{broken\n" + b"fine\n" + b"bad \xff\n"

        def fed() -> DatasetValidator:
            validator = DatasetValidator(None)
            validator.feed(data)  # nothing certain yet: line 2 counts only for JSONL
            return validator

        for format, line in [("jsonl", 2), ("auto", 2), ("text", 4)]:
            with pytest.raises(DatasetError) as caught:
                fed().set_format(format)
            assert caught.value.line == line, format

    def test_a_fatal_error_first_is_certain_at_once(self):
        validator = DatasetValidator(None)
        with pytest.raises(DatasetError) as caught:
            validator.feed(b"\xff\n")
        assert caught.value.line == 1


class TestReadingExamples:
    def test_jsonl_objects_in_order(self):
        stream = io.BytesIO(b"\r\n".join(json.dumps(v).encode() for v in (PC, PC, PC)))
        assert list(iter_examples(read_chunks(stream, size=7), "jsonl")) == [PC, PC, PC]

    def test_rechecks_what_it_reads(self):
        with pytest.raises(DatasetError, match="line 2: expected the prompt/completion shape"):
            list(iter_examples([jsonl(PC, {"text": "x"})], "jsonl"))

    def test_seed_lines(self):
        examples = list(iter_examples([TECH_NEWS.encode()], "text"))
        assert len(examples) == 5
        assert examples[0].startswith("Apple Inc. released")


PARQUET = b"PAR1" + b"\x15\x04\x15\x00\xff\xfe binary pages" + b"\x08\x00\x00\x00PAR1"
ARRAY = b'[\n  {"text": "a"},\n  {"text": "b"}\n]\n'


class TestNeverText:
    """A file whose name or content says it is another format is never read as text."""

    @pytest.mark.parametrize(
        ("filename", "said", "format"),
        [
            ("data.csv", "CSV", "csv"),
            ("DATA.CSV", "CSV", "csv"),
            ("data.parquet", "Parquet", "parquet"),
            ("data.pq", "Parquet", "parquet"),
            ("data.jsonl", "JSONL", "jsonl"),
            ("data.json", "JSON", "jsonl"),
        ],
    )
    def test_a_name_that_says_another_format(self, filename, said, format):
        error = rejection(b"plain words\n", "text", filename=filename)
        assert error.line is None
        assert str(error) == (
            f'the file name "{filename}" says {said}, not text; send format={format} or auto, '
            "or rename the file if it is text"
        )

    @pytest.mark.parametrize("format", ["auto", "text", "jsonl"])
    @pytest.mark.parametrize("size", [1, 3, 4096])
    @pytest.mark.parametrize(
        "data",
        [
            ARRAY,
            b"\n  \r\n" + ARRAY,
            b'[{"text": "a"}, {"text": "b"}]',
            b'[ "a line", "another" ]\n',
            b"[1, 2]\n",
        ],
    )
    def test_a_json_array_is_refused_with_what_to_send(self, data, format, size):
        error = rejection(data, format, size)
        assert error.line is None
        assert str(error).startswith('the file starts with "[" like a JSON array')
        assert "JSONL, one JSON object per line" in str(error)
        assert "jq -c '.[]' data.json > data.jsonl" in str(error)

    @pytest.mark.parametrize("filename", ["data.json", "data.jsonl", "data.txt", None])
    def test_a_json_array_under_any_name(self, filename):
        error = rejection(ARRAY, "auto", filename=filename)
        assert str(error).startswith('the file starts with "[" like a JSON array')

    def test_the_array_is_refused_before_the_rest_arrives(self):
        validator = DatasetValidator("auto")
        with pytest.raises(DatasetError, match="like a JSON array"):
            validator.feed(b"[\n")

    def test_a_bracket_later_in_the_file_is_text(self):
        assert validate([b"first\n[second]\n"]) == DatasetSummary("text", "text", 2)

    @pytest.mark.parametrize("first", [b"[INST] hi [/INST] hello", b"[1] Introduction", b"[]x"])
    def test_text_that_only_starts_with_a_bracket_is_text(self, first):
        assert validate([first + b"\nsecond\n"]) == DatasetSummary("text", "text", 2)

    @pytest.mark.parametrize("format", ["text", "jsonl", "csv"])
    @pytest.mark.parametrize("size", [1, 2, 4096])
    def test_parquet_magic_bytes(self, format, size):
        name = {"text": "text", "jsonl": "JSONL", "csv": "CSV"}[format]
        error = rejection(PARQUET, format, size)
        assert str(error) == (
            f"the file is Parquet (it starts with PAR1), not {name}; send format=parquet or auto"
        )

    def test_parquet_magic_bytes_under_a_text_name(self):
        error = rejection(PARQUET, "text", filename="data.txt")
        assert str(error).startswith("the file is Parquet (it starts with PAR1), not text")

    def test_declared_parquet_that_is_not(self):
        error = rejection(b"plain words\n", "parquet")
        assert str(error) == (
            "not a Parquet file: it does not start with Parquet's magic bytes PAR1"
        )

    @pytest.mark.parametrize("filename", ["data.jsonl", "data.json"])
    def test_auto_reads_a_json_name_as_jsonl(self, filename):
        error = rejection(b"plain words\n", "auto", filename=filename)
        assert str(error) == "line 1: not valid JSON (Expecting value at column 1)"
        data = jsonl({"text": "a"}, {"text": "b"})
        assert validate([data], filename=filename) == DatasetSummary("jsonl", "text", 2)

    @pytest.mark.parametrize("filename", ["data.txt", "data", "notes.md", None])
    def test_other_names_keep_the_content_rules(self, filename):
        assert validate([b"plain\n"], filename=filename) == DatasetSummary("text", "text", 1)

    @pytest.mark.parametrize("size", [1, 5, 4096])
    @pytest.mark.parametrize(
        ("data", "filename", "start"),
        [
            (b"words\n", "data.csv", "the file name"),
            (PARQUET, "data.txt", "the file is Parquet"),
            (ARRAY, "data.txt", 'the file starts with "["'),
        ],
    )
    def test_text_given_after_the_data_is_refused_too(self, data, filename, start, size):
        validator = DatasetValidator(None, filename=filename)
        with pytest.raises(DatasetError) as caught:
            for chunk in chunked(data, size):
                validator.feed(chunk)
            validator.set_format("text")
        assert str(caught.value).startswith(start)

    def test_jsonl_given_after_a_csv_name_reads_the_stored_lines(self):
        # The lines of a .csv were left to the stored file; JSONL, given late, reads them there.
        data = jsonl(PC, PC, {"text": "other"})
        validator = DatasetValidator(None, filename="data.csv")
        validator.feed(data)
        validator.set_format("jsonl")
        with pytest.raises(DatasetError) as caught:
            validator.finish(lambda: io.BytesIO(data))
        assert (
            str(caught.value) == "line 3: expected the prompt/completion shape of line 1, got text"
        )
        validator = DatasetValidator(None, filename="data.csv")
        validator.feed(jsonl(PC, PC))
        validator.set_format("jsonl")
        summary = validator.finish(lambda: io.BytesIO(jsonl(PC, PC)))
        assert summary == DatasetSummary("jsonl", "prompt_completion", 2)

    def test_a_table_needs_its_stored_file(self):
        validator = DatasetValidator("csv")
        validator.feed(b"text\na\n")
        with pytest.raises(ValueError, match="stored file"):
            validator.finish()
