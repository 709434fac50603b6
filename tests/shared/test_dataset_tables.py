"""CSV and Parquet datasets: each shape read into the records the worker trains on, `auto`
finding them, every refusal naming its row, and a large file read in bounded batches. Parquet
files are written here with pyarrow itself."""

import csv
import gc
import io
import json
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shared import dataset_tables
from shared.dataset_formats import (
    DatasetError,
    DatasetSummary,
    DatasetValidator,
    count_records,
    read_records,
    validate,
)

PC = [
    {"prompt": "Summarize: Apple released a phone.", "completion": "A new iPhone."},
    {"prompt": "Summarize: Tesla, café, 東京.", "completion": " Cars 🚗"},
]
CHAT = [
    [
        {"role": "system", "content": "You summarize tech news."},
        {"role": "user", "content": "Apple released a phone."},
        {"role": "assistant", "content": "A new iPhone."},
    ],
    [{"role": "assistant", "content": "only me"}],
]
MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])


def csv_bytes(header: list[str], *rows: list[Any], line_end: str = "\n") -> bytes:
    """A CSV file as Python's csv module writes one (quotes where needed)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator=line_end)
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue().encode()


def parquet_bytes(table: pa.Table | dict[str, Any], **options: Any) -> bytes:
    table = table if isinstance(table, pa.Table) else pa.table(table)
    out = io.BytesIO()
    pq.write_table(table, out, **options)
    return out.getvalue()


def records(data: bytes, format: str, **options: Any) -> list[Any]:
    return list(read_records(io.BytesIO(data), format, **options))


def refusal(data: bytes, format: str, **options: Any) -> DatasetError:
    with pytest.raises(DatasetError) as caught:
        records(data, format, **options)
    return caught.value


def summary(data: bytes, format: str = "auto", filename: str | None = None) -> DatasetSummary:
    return validate([data], format, filename)


class TestCsv:
    def test_text(self):
        data = csv_bytes(["id", "text"], [1, "first line"], [2, "second, with a comma"])
        assert summary(data, filename="data.csv") == DatasetSummary("csv", "text", 2)
        assert records(data, "csv") == [{"text": "first line"}, {"text": "second, with a comma"}]

    def test_prompt_completion_in_any_column_order(self):
        rows = [[row["completion"], "x", row["prompt"]] for row in PC]
        data = csv_bytes(["completion", "source", "prompt"], *rows)
        assert summary(data, "csv") == DatasetSummary("csv", "prompt_completion", 2)
        assert records(data, "csv") == PC

    def test_messages_cells_hold_json(self):
        data = csv_bytes(["messages"], *[[json.dumps(chat)] for chat in CHAT])
        assert summary(data, filename="chat.csv") == DatasetSummary("csv", "messages", 2)
        assert records(data, "csv") == [{"messages": chat} for chat in CHAT]

    def test_messages_win_over_the_other_columns(self):
        data = csv_bytes(["text", "messages"], ["t", json.dumps(CHAT[1])])
        assert records(data, "csv") == [{"messages": CHAT[1]}]

    def test_cells_are_kept_as_written(self):
        # Nothing is a number, a null or trimmed: every cell is the text it holds.
        cells = ["007", "1e3", "NA", "null", "", "  spaced  ", 'a "quote"', "two\nlines", "x\r\ny"]
        data = csv_bytes(["text"], *[[cell] for cell in cells])
        assert records(data, "csv") == [{"text": cell} for cell in cells]

    def test_bom_crlf_and_blank_lines(self):
        data = b"\xef\xbb\xbf" + csv_bytes(["prompt", "completion"], ["p", "c"], line_end="\r\n")
        data += b"\r\n\r\n" + b"p2,c2\r\n"
        assert summary(data, filename="data.csv") == DatasetSummary("csv", "prompt_completion", 2)
        assert records(data, "csv")[1] == {"prompt": "p2", "completion": "c2"}

    def test_column_names_match_without_their_spaces(self):
        data = b" prompt , completion\np,c\n"
        assert records(data, "csv") == [{"prompt": "p", "completion": "c"}]

    @pytest.mark.parametrize(
        ("header", "shape"),
        [
            ("text,label", "text"),
            ('"prompt","completion"', "prompt_completion"),
            ("id,messages,source", "messages"),
        ],
    )
    def test_auto_knows_a_header_without_the_extension(self, header, shape):
        row = {"text": "a,1", "prompt_completion": "a,b", "messages": ""}[shape]
        if shape == "messages":
            row = csv_bytes(["id"], [1, json.dumps(CHAT[1]), "x"]).decode().split("\n")[1]
        data = f"{header}\n{row}\n".encode()
        assert summary(data, filename="data.txt") == DatasetSummary("csv", shape, 1)

    @pytest.mark.parametrize(
        "first", ["text", "title,body", "Dear team, hello", "text,", "text, and more text"]
    )
    def test_a_line_that_is_no_such_header_stays_text(self, first):
        data = f"{first}\nmore\n".encode()
        assert summary(data, filename="notes.txt") == DatasetSummary("text", "text", 2)

    def test_header_columns_read_as_text_when_text_is_declared(self):
        assert summary(b"text,label\na,1\n", "text") == DatasetSummary("text", "text", 2)

    def test_the_count_is_the_rows(self):
        data = csv_bytes(["text"], *[[f"row {n}"] for n in range(2500)])
        assert count_records(io.BytesIO(data), "csv") == 2500


CSV_REFUSALS = [
    # (data, row, message)
    (
        b"id,body\n1,x\n",
        None,
        'expected the columns "text", or "prompt" and "completion", or "messages"; '
        'found "id", "body"',
    ),
    (
        b"prompt,label\np,1\n",
        None,
        'expected the columns "text", or "prompt" and "completion", or "messages"; '
        'found "prompt", "label"',
    ),
    (b"text, text\na,b\n", None, 'the column "text" appears 2 times'),
    (b"", None, "the file holds no examples (it is empty)"),
    (
        b"text,label\na,1\nb,2,3\n",
        2,
        "row 2: has 3 fields where the header has 2 (a stray comma, or a quote left open?)",
    ),
    (
        b'text,label\na,1\n"b\nc",2\n"open,3\nd,4\n',
        3,
        "row 3: has 1 fields where the header has 2 (a stray comma, or a quote left open?)",
    ),
    (
        b"text,label\nok,1\ncaf\xc3,2\n",
        2,
        'row 2: field "text" is not valid UTF-8 (byte 0xc3 at column 4)',
    ),
    (
        b'messages\n"[{""role"": ""user"", ""content"": ""hi""}]"\n',
        1,
        'row 1: field "messages" has no "assistant" message (at least one is needed)',
    ),
    (
        b"messages\nnot json\n",
        1,
        'row 1: field "messages" is not valid JSON (Expecting value at column 1)',
    ),
    (
        b'messages\n""\n',
        1,
        'row 1: field "messages" is not valid JSON (Expecting value at column 1)',
    ),
    (
        b'messages\n"{""role"": ""assistant""}"\n',
        1,
        'row 1: field "messages" must be a list, got an object',
    ),
    (
        b'messages\n"[{""role"": ""bot"", ""content"": ""x""}]"\n',
        1,
        'row 1: messages[0].role must be "system", "user" or "assistant", got "bot"',
    ),
]


class TestCsvRefused:
    @pytest.mark.parametrize(("data", "row", "message"), CSV_REFUSALS)
    def test_row_and_message(self, data, row, message):
        error = refusal(data, "csv")
        assert (error.row, error.line, str(error)) == (row, None, message)
        # Upload validation reads the file the same way, and says the same.
        with pytest.raises(DatasetError) as caught:
            summary(data, filename="data.csv")
        assert str(caught.value) == message

    def test_a_header_without_rows(self):
        assert records(b"text,label\n", "csv") == []
        with pytest.raises(DatasetError, match=r"^the file holds no examples \(it has no rows\)$"):
            summary(b"text,label\n", filename="data.csv")

    def test_an_unused_column_may_hold_anything(self):
        data = b"text,blob\nok,\xff\xfe\n"
        assert records(data, "csv") == [{"text": "ok"}]

    def test_a_row_over_the_limit(self):
        data = csv_bytes(["prompt", "completion", "other"], ["p" * 40, "c" * 40, "x" * 500])
        assert len(records(data, "csv", max_bytes=80)) == 1  # other columns do not count
        error = refusal(data + b"p,cc" + b"c" * 80 + b",x\n", "csv", max_bytes=80)
        assert (error.row, str(error)) == (
            2,
            "row 2: 83 bytes in its columns, more than 80, the limit for one row",
        )

    def test_a_row_longer_than_a_block_is_stopped(self):
        # A quote left open swallows the rest of the file into one cell: pyarrow stops at its
        # block, and nothing past the limit is buffered.
        data = b'text\nfine\n"open\n' + b"x" * (3 * 1024 * 1024) + b"\n"
        error = refusal(data, "csv", max_bytes=1024)
        assert (error.row, str(error)) == (
            2,
            "row 2: longer than 1024 bytes, the limit for one row (is a quote left open?)",
        )

    def test_rows_are_numbered_across_blocks(self):
        rows = [[f"example number {n:06d}", n] for n in range(100_000)]  # about 3 MiB
        good = csv_bytes(["text", "n"], *rows)
        assert count_records(io.BytesIO(good), "csv") == 100_000
        bad_utf8 = good.replace(b"number 090000", b"number \xff90000")
        assert refusal(bad_utf8, "csv").row == 90_001
        extra_field = good.replace(b"number 090000,", b"number 090000,1,")
        assert refusal(extra_field, "csv").row == 90_001

    def test_a_header_too_wide_or_too_long_never_reaches_pyarrow(self, monkeypatch):
        # pyarrow sizes its work by the header: a wide one is refused before it is read.
        monkeypatch.setattr(dataset_tables, "MAX_COLUMNS", 3)
        assert len(records(b"text,a,b\nx,1,2\n", "csv")) == 1
        error = refusal(b'text,a,"b\nc",d\nx,1,2,3\n', "csv")
        assert str(error) == "the CSV header names 4 columns, more than 3, the limit"
        monkeypatch.setattr(dataset_tables, "MAX_CSV_HEADER_BYTES", 16)
        assert len(records(b"text,long_name\n", "csv")) == 0  # the whole file: it ends
        error = refusal(b"text,a_longer_name\nx,1\n", "csv")
        assert str(error) == (
            "the CSV header is longer than 16 bytes, the limit (or it does not end)"
        )

    def test_the_row_limit(self, monkeypatch):
        monkeypatch.setattr(dataset_tables, "MAX_ROWS", 10)
        data = csv_bytes(["text"], *[["a"]] * 11)
        assert str(refusal(data, "csv")) == "the file has more than 10 rows, the limit"
        assert len(records(csv_bytes(["text"], *[["a"]] * 10), "csv")) == 10


class TestParquet:
    def test_text_with_other_columns(self):
        data = parquet_bytes({"id": [1, 2], "text": ["first", "second"]})
        assert summary(data) == DatasetSummary("parquet", "text", 2)
        assert records(data, "parquet") == [{"text": "first"}, {"text": "second"}]

    def test_prompt_completion_large_strings(self):
        table = pa.table(
            {
                "completion": pa.array([row["completion"] for row in PC], pa.large_string()),
                "prompt": pa.array([row["prompt"] for row in PC], pa.large_string()),
            }
        )
        data = parquet_bytes(table)
        assert summary(data, filename="data.parquet") == DatasetSummary(
            "parquet", "prompt_completion", 2
        )
        assert records(data, "parquet") == PC

    def test_string_views(self):
        data = parquet_bytes(pa.table({"text": pa.array(["a", "b"], pa.string_view())}))
        assert records(data, "parquet") == [{"text": "a"}, {"text": "b"}]

    def test_messages_as_structs(self):
        data = parquet_bytes(pa.table({"messages": pa.array(CHAT, pa.list_(MESSAGE))}))
        assert summary(data, "parquet") == DatasetSummary("parquet", "messages", 2)
        assert records(data, "parquet") == [{"messages": chat} for chat in CHAT]

    def test_messages_as_json_text(self):
        data = parquet_bytes({"messages": [json.dumps(chat) for chat in CHAT]})
        assert records(data, "parquet") == [{"messages": chat} for chat in CHAT]

    def test_rows_are_numbered_across_row_groups(self):
        texts = [f"row {n}" for n in range(10)]
        data = parquet_bytes({"text": texts}, row_group_size=3)
        assert pq.ParquetFile(io.BytesIO(data)).num_row_groups == 4
        assert records(data, "parquet") == [{"text": text} for text in texts]
        texts[7] = None
        error = refusal(parquet_bytes({"text": texts}, row_group_size=3), "parquet")
        assert (error.row, str(error)) == (8, 'row 8: field "text" must be a string, got null')

    @pytest.mark.parametrize("compression", ["snappy", "zstd", "gzip", "none"])
    def test_compressions(self, compression):
        data = parquet_bytes({"text": ["a"] * 5}, compression=compression)
        assert count_records(io.BytesIO(data), "parquet") == 5

    def test_dictionary_columns(self):
        # pandas writes a categorical column as a dictionary; its rows read as their values.
        texts = pa.array(["a", "bb", "a", None, "bb"]).dictionary_encode()
        data = parquet_bytes(pa.table({"text": texts}))
        assert pq.read_schema(io.BytesIO(data)).field("text").type.value_type == pa.string()
        error = refusal(data, "parquet")
        assert (error.row, str(error)) == (4, 'row 4: field "text" must be a string, got null')
        data = parquet_bytes(pa.table({"text": texts.fill_null("ccc")}))
        assert records(data, "parquet") == [{"text": t} for t in ["a", "bb", "a", "ccc", "bb"]]
        bad = pa.array([b"ok", b"b\xff", b"ok", b"b\xff"], pa.binary()).view(pa.string())
        data = parquet_bytes(pa.table({"text": bad.dictionary_encode()}))
        assert str(refusal(data, "parquet")) == (
            'row 2: field "text" is not valid UTF-8 (byte 0xff at column 2)'
        )

    def test_python_values_are_made_a_slice_at_a_time(self, monkeypatch):
        monkeypatch.setattr(dataset_tables, "_SLICE_BYTES", 64)
        chats = [CHAT[1]] * 9
        assert records(_message_rows(*chats), "parquet") == [{"messages": c} for c in chats]
        # The first bad row wins across slices: a message error before a null, a null before
        # a message error.
        late = [{"role": "user", "content": "no answer"}]
        error = refusal(_message_rows(*chats[:4], late, *chats[:2], None), "parquet")
        assert error.row == 5
        error = refusal(_message_rows(*chats[:4], None, *chats[:2], late), "parquet")
        assert (error.row, str(error)) == (5, 'row 5: field "messages" must be a list, got null')

    def test_the_first_bad_row_of_a_batch_wins(self):
        # A message error in row 2 comes before a null in row 3, whichever check finds it.
        table = pa.table(
            {
                "messages": pa.array(
                    [CHAT[1], [{"role": "user", "content": "no answer"}], None],
                    pa.list_(MESSAGE),
                )
            }
        )
        error = refusal(parquet_bytes(table), "parquet")
        assert error.row == 2
        assert str(error).endswith('has no "assistant" message (at least one is needed)')


def _message_rows(*chats: Any) -> bytes:
    return parquet_bytes(pa.table({"messages": pa.array(list(chats), pa.list_(MESSAGE))}))


PARQUET_REFUSALS = [
    # (data, row, message)
    (
        parquet_bytes({"id": [1], "body": ["x"]}),
        None,
        'expected the columns "text", or "prompt" and "completion", or "messages"; '
        'found "id", "body"',
    ),
    (parquet_bytes({"text": [1, 2]}), None, 'the column "text" holds int64; expected strings'),
    (
        parquet_bytes({"text": pa.array([b"a"], pa.binary())}),
        None,
        'the column "text" holds binary; expected strings',
    ),
    (
        parquet_bytes({"messages": [[1, 2]]}),
        None,
        'the column "messages" holds list<element: int64>; expected a list of {role, content} '
        "structs of strings, or JSON text",
    ),
    (
        parquet_bytes({"prompt": ["p", "p"], "completion": ["c", None]}),
        2,
        'row 2: field "completion" must be a string, got null',
    ),
    (
        parquet_bytes({"text": pa.array([b"ok", b"b\xff"], pa.binary()).view(pa.string())}),
        2,
        'row 2: field "text" is not valid UTF-8 (byte 0xff at column 2)',
    ),
    (_message_rows(CHAT[0], None), 2, 'row 2: field "messages" must be a list, got null'),
    (_message_rows(CHAT[0], []), 2, 'row 2: field "messages" is empty'),
    (
        _message_rows([{"role": "assistant", "content": None}]),
        1,
        "row 1: messages[0].content must be a string, got null",
    ),
]


class TestParquetRefused:
    @pytest.mark.parametrize(("data", "row", "message"), PARQUET_REFUSALS)
    def test_row_and_message(self, data, row, message):
        error = refusal(data, "parquet")
        assert (error.row, error.line, str(error)) == (row, None, message)
        with pytest.raises(DatasetError) as caught:
            summary(data)  # auto: the magic bytes say Parquet
        assert str(caught.value) == message

    def test_no_rows(self):
        data = parquet_bytes({"text": pa.array([], pa.string())})
        with pytest.raises(DatasetError, match=r"^the file holds no examples \(it has no rows\)$"):
            summary(data)

    def test_a_file_cut_short(self):
        data = parquet_bytes({"text": ["a", "b"]})
        error = refusal(data[:-10], "parquet")
        assert str(error) == (
            "not a valid Parquet file: it does not end with the magic bytes PAR1 (cut short?)"
        )
        assert str(refusal(b"PAR1", "parquet")) == "not a valid Parquet file (it is too short)"

    def test_a_damaged_footer(self):
        data = bytearray(parquet_bytes({"text": ["a", "b"]}))
        footer = int.from_bytes(data[-8:-4], "little")
        data[-8 - footer : -8] = b"\x00" * footer
        assert str(refusal(bytes(data), "parquet")).startswith("not a valid Parquet file (")

    def test_a_footer_over_the_limit(self, monkeypatch):
        monkeypatch.setattr(dataset_tables, "MAX_PARQUET_FOOTER_BYTES", 64)
        error = refusal(parquet_bytes({"text": ["a"]}), "parquet")
        assert str(error).startswith("the Parquet footer holds ")
        assert str(error).endswith(
            "more than 64, the limit; write the file with fewer row groups or columns"
        )

    def test_the_row_limit(self, monkeypatch):
        monkeypatch.setattr(dataset_tables, "MAX_ROWS", 10)
        error = refusal(parquet_bytes({"text": [""] * 11}), "parquet")
        assert str(error) == "the file has 11 rows, more than 10, the limit"

    def test_a_row_over_the_limit(self):
        data = parquet_bytes({"text": ["a" * 10, "b" * 101]})
        error = refusal(data, "parquet", max_bytes=100)
        assert str(error) == "row 2: 101 bytes in its columns, more than 100, the limit for one row"

    def test_messages_over_the_limit_count_roles_contents_and_json(self):
        # A message counts its role and content, and what its JSON would add: 29 bytes.
        chat = [{"role": "user", "content": "x" * 40}, {"role": "assistant", "content": "y" * 47}]
        assert len(records(_message_rows(chat), "parquet", max_bytes=158)) == 1  # 100 + 2 * 29
        error = refusal(_message_rows(CHAT[1], chat), "parquet", max_bytes=157)
        assert (error.row, str(error)) == (
            2,
            "row 2: 158 bytes in its columns, more than 157, the limit for one row",
        )
        many = [{"role": "user", "content": ""}] * 10 + [{"role": "assistant", "content": ""}]
        error = refusal(_message_rows(many), "parquet", max_bytes=300)
        # Empty messages still count: 10 * (4 + 29) + (9 + 29).
        assert str(error) == "row 1: 368 bytes in its columns, more than 300, the limit for one row"


class TestBoundedMemory:
    """A large table is read a batch at a time: Arrow's live memory stays far below the file."""

    def _peak_while_reading(self, data: bytes, format: str) -> tuple[int, int]:
        gc.collect()  # what earlier tests left is freed before the baseline, not during it
        pool = pa.default_memory_pool()
        base, peak, rows = pool.bytes_allocated(), 0, 0
        for batch in dataset_tables.read_table(io.BytesIO(data), format).batches:
            peak = max(peak, pool.bytes_allocated() - base)
            rows += batch.size
        return peak, rows

    def test_parquet(self):
        text = "Apple Inc. released its new iPhone model yesterday, with a longer battery life. "
        texts = [f"{n:08d} {text * 2}" for n in range(400_000)]  # about 70 MB of text
        data = parquet_bytes({"text": texts}, compression="none", row_group_size=200_000)
        peak, rows = self._peak_while_reading(data, "parquet")
        assert rows == 400_000
        assert 1024 * 1024 < peak < 40 * 1024 * 1024, peak  # a whole read takes over 70 MB

    def test_parquet_of_one_long_value_repeated(self):
        # Stored once in a dictionary, copied into each row it is read in: batches of few
        # rows keep that bounded, from a file of a few kilobytes.
        data = parquet_bytes({"text": ["x" * 4096] * 50_000}, compression="zstd")
        assert len(data) < 64 * 1024
        peak, rows = self._peak_while_reading(data, "parquet")
        assert rows == 50_000
        assert peak < 40 * 1024 * 1024, peak  # all of it: 200 MB

    def test_csv(self):
        line = b"Apple Inc. released its new iPhone model yesterday with a longer battery life.\n"
        data = b"text\n" + line * 800_000  # about 65 MB
        peak, rows = self._peak_while_reading(data, "csv")
        assert rows == 800_000
        assert 1024 * 1024 < peak < 40 * 1024 * 1024, peak  # a whole read takes over 70 MB


class TestValidatorFormatLate:
    """The multipart form may name the format after the file: a table waits for it."""

    def test_a_csv_header_then_auto(self):
        validator = DatasetValidator(None)
        validator.feed(b"text,label\nhello,\xff\n")  # bad UTF-8, but in a column never read
        validator.set_format("auto")
        summary = validator.finish(lambda: io.BytesIO(b"text,label\nhello,\xff\n"))
        assert summary == DatasetSummary("csv", "text", 1)

    def test_a_csv_header_then_text(self):
        validator = DatasetValidator(None)
        validator.feed(b"text,label\nhello,1\n")
        validator.set_format("text")
        assert validator.finish() == DatasetSummary("text", "text", 2)

    def test_parquet_then_parquet(self):
        data = parquet_bytes({"text": ["a", "b", "c"]})
        validator = DatasetValidator(None, filename="upload.bin")
        for start in range(0, len(data), 7):
            validator.feed(data[start : start + 7])
        validator.set_format("parquet")
        assert validator.finish(lambda: io.BytesIO(data)) == DatasetSummary("parquet", "text", 3)
