"""Dataset formats: a streaming validator for uploads and the one reader of stored dataset files.

Formats (one per file):
- `text`: UTF-8, one example per line. Blank (whitespace-only) lines are skipped.
- `jsonl`: one JSON object per line, every line of the same shape:
  `{"text": str}` (shape `text`), `{"prompt": str, "completion": str}` (`prompt_completion`) or
  `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}` (`messages`, with
  at least one assistant message). Other keys are ignored; blank lines are skipped.
- `csv`: a header, then one example per row (comma-separated, `"` quotes, newlines allowed in
  quoted cells). The columns `text`, or `prompt` and `completion`, or `messages` (a JSON list of
  {role, content} objects in each cell) give the shape; other columns are ignored.
- `parquet`: the same columns, `messages` as a list of {role, content} structs or as JSON text.
- `auto`: Parquet when the file starts with Parquet's magic bytes `PAR1`; else what the name's
  extension says (`.csv`; `.parquet`, `.pq`; `.jsonl`, `.json`: JSONL); else CSV when the first
  non-blank line is a header of two or more plain names that include the columns of a shape;
  else `jsonl` if the first non-blank line parses as a JSON object, else `text`.

A file is never read as text when its name (`.csv`, `.parquet`, `.pq`, `.json`, `.jsonl`) or its
content (`PAR1`, or a first line that opens a JSON array) says it is something else: it is
refused, and the message says what to send. A JSON array is refused as text and as JSONL alike:
only a format with one record per line or row can be checked in flat memory. Text whose first
line merely starts with a bracket (`[INST] ...`) is text.

The line formats strip one trailing `\\r` per line (CRLF files) and a UTF-8 byte order mark at the
start of the file. One line may hold at most `MAX_LINE_BYTES`, so a file without newlines cannot
make us buffer it whole. Lines and columns in messages count from 1; UTF-8 columns count bytes.
Their input arrives in chunks of any size: only complete lines are decoded (a newline byte never
occurs inside a multi-byte UTF-8 character), and only the unfinished last line is kept between
chunks.

Tables (CSV, Parquet) are read from the stored file by `read_records`, which upload validation
and the worker share, through `shared.dataset_tables`.
"""

import io
import itertools
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO, Final, Literal, NamedTuple

import numpy as np

if TYPE_CHECKING:
    pass

Format = Literal["text", "jsonl", "csv", "parquet"]
Shape = Literal["text", "prompt_completion", "messages"]
Example = str | dict[str, Any]

FORMATS: Final = ("auto", "text", "jsonl", "csv", "parquet")
TABLE_FORMATS: Final = ("csv", "parquet")
MAX_LINE_BYTES: Final = 8 * 1024 * 1024
ROLES: Final = ("system", "user", "assistant")
BOM: Final = "\ufeff"
_SHAPE_NAMES: Final = {
    "text": "text",
    "prompt_completion": "prompt/completion",
    "messages": "messages",
}
REQUIRED_COLUMNS: Final = {
    "text": ("text",),
    "prompt_completion": ("prompt", "completion"),
    "messages": ("messages",),
}
_FORMAT_NAMES: Final = {"text": "text", "jsonl": "JSONL", "csv": "CSV", "parquet": "Parquet"}
# What a file name's extension says the file is: (its name in messages, the format to read).
_EXTENSIONS: Final = {
    ".csv": ("CSV", "csv"),
    ".parquet": ("Parquet", "parquet"),
    ".pq": ("Parquet", "parquet"),
    ".jsonl": ("JSONL", "jsonl"),
    ".json": ("JSON", "jsonl"),
}
PARQUET_MAGIC: Final = b"PAR1"
_JSON_ARRAY: Final = (
    'the file starts with "[" like a JSON array, which cannot be read a record at a time: send '
    "JSONL, one JSON object per line (convert an array with `jq -c '.[]' data.json > "
    "data.jsonl`), or CSV or Parquet; text whose first line looks like one goes as JSONL "
    '{"text": ...}'
)


class DatasetError(ValueError):
    """The file is not a valid dataset; `line` is the first bad line, or `row` the first bad row
    of a table (neither: the whole file). `reason` is the message without its place."""

    def __init__(self, message: str, line: int | None = None, *, row: int | None = None) -> None:
        if line is not None:
            super().__init__(f"line {line}: {message}")
        elif row is not None:
            super().__init__(f"row {row}: {message}")
        else:
            super().__init__(message)
        self.line = line
        self.row = row
        self.reason = message


@dataclass(frozen=True)
class DatasetSummary:
    format: Format
    shape: Shape
    examples: int


def type_name(value: object) -> str:
    """How a JSON value is named in messages ("got a list")."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):  # before int: bool is a subclass of int
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return "null"


def _line_of(error: DatasetError) -> int:
    return error.line or 0


def _is_blank(line: str) -> bool:
    return not line or line.isspace()


# Blank lines found in a whole block of text, so that a file read as `text` is counted without
# a Python string per line. `[^\S\n]` is what `str.isspace` accepts, less the newline: a blank
# line after the first is a newline followed by such characters up to the next newline. Matching
# only the leading newline (the rest is a lookahead) lets back-to-back blank lines each match.
_BLANK_FIRST_LINE: Final = re.compile(r"[^\S\n]*\n")
_BLANK_LATER_LINE: Final = re.compile(r"\n(?=[^\S\n]*\n)")


# Every ASCII character `str.isspace` accepts is a byte up to 0x20 (the space), so a blank line
# of ASCII text is empty or starts with one.
_SPACE: Final = ord(" ")


def _ascii_lines(block: bytes) -> tuple[int, bool]:
    """The lines of an ASCII block that ends with a newline, and whether any of them may be
    blank, found with numpy: no Python object per line. A line that starts with any byte up to
    0x20 may be blank (a compare, not a lookup per line); only then is the exact count run."""
    data = np.frombuffer(block, dtype=np.uint8)
    newline = data == ord("\n")
    low_starts = data[1:] <= _SPACE  # kept only where a line starts: after a newline
    np.logical_and(newline[:-1], low_starts, out=low_starts)
    may_have_blanks = bool(data[0] <= _SPACE) or bool(low_starts.any())
    return int(np.count_nonzero(newline)), may_have_blanks


def parse_json_line(line: str, number: int) -> Any:
    """The JSON value of one line, or a DatasetError that says what is wrong with it."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as error:
        raise DatasetError(
            f"not valid JSON ({error.msg} at column {error.colno})", number
        ) from None
    except RecursionError:
        raise DatasetError("not valid JSON (nested too deeply)", number) from None
    except ValueError as error:  # e.g. an integer longer than Python's digit limit
        raise DatasetError(f"not valid JSON ({error})", number) from None


def shape_of(value: dict[str, Any]) -> Shape | None:
    """The shape an object claims by its keys (its fields are checked by `check_example`)."""
    if "messages" in value:
        return "messages"
    if "prompt" in value or "completion" in value:
        return "prompt_completion"
    if "text" in value:
        return "text"
    return None


def columns_shape(names: list[str]) -> Shape | None:
    """The shape a table with these columns holds, the first complete set winning."""
    shape: Shape
    for shape in ("messages", "prompt_completion", "text"):
        if all(field in names for field in REQUIRED_COLUMNS[shape]):
            return shape
    return None


def check_example(value: Any, number: int, expected: Shape | None, first_line: int) -> Shape:
    """Check one JSONL value against the file's shape (None: this is the first example, which
    sets it); returns its shape. `first_line` is the line that set the shape."""
    if not isinstance(value, dict):
        raise DatasetError(f"expected a JSON object, got {type_name(value)}", number)
    shape = shape_of(value)
    if shape is None:
        if expected is not None:
            missing = next(field for field in REQUIRED_COLUMNS[expected] if field not in value)
            raise DatasetError(f'missing field "{missing}"', number)
        keys = ", ".join(f'"{key}"' for key in list(value)[:5]) or "none"
        raise DatasetError(
            'expected an object with "text", "prompt" and "completion", or "messages"; '
            f"got keys {keys}",
            number,
        )
    if expected is not None and shape != expected:
        raise DatasetError(
            f"expected the {_SHAPE_NAMES[expected]} shape of line {first_line}, "
            f"got {_SHAPE_NAMES[shape]}",
            number,
        )
    for field in REQUIRED_COLUMNS[shape]:
        if field not in value:
            raise DatasetError(f'missing field "{field}"', number)
    if shape == "messages":
        check_messages(value["messages"], number)
    else:
        for field in REQUIRED_COLUMNS[shape]:
            if not isinstance(value[field], str):
                raise DatasetError(
                    f'field "{field}" must be a string, got {type_name(value[field])}', number
                )
    return shape


def check_messages(messages: Any, number: int) -> None:
    if not isinstance(messages, list):
        raise DatasetError(f'field "messages" must be a list, got {type_name(messages)}', number)
    if not messages:
        raise DatasetError('field "messages" is empty', number)
    has_assistant = False
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise DatasetError(f"{where} must be an object, got {type_name(message)}", number)
        for field in ("role", "content"):
            if field not in message:
                raise DatasetError(f'{where}: missing field "{field}"', number)
        role = message["role"]
        if role not in ROLES:  # also rejects non-strings
            got = json.dumps(role) if isinstance(role, str) else type_name(role)
            raise DatasetError(
                f'{where}.role must be "system", "user" or "assistant", got {got}', number
            )
        if not isinstance(message["content"], str):
            raise DatasetError(
                f"{where}.content must be a string, got {type_name(message['content'])}", number
            )
        has_assistant = has_assistant or role == "assistant"
    if not has_assistant:
        raise DatasetError(
            'field "messages" has no "assistant" message (at least one is needed)', number
        )


class Lines(NamedTuple):
    """Complete lines from one chunk: the number of the first, their decoded text (every line
    ends with a newline), and the error that stopped the chunk (the lines before it are good
    and are still returned)."""

    first: int
    text: str
    error: DatasetError | None = None
    count: int = 0  # lines in `text`, counted once by the splitter
    may_have_blanks: bool = True  # False when the splitter saw that no line can be blank

    def split(self) -> list[str]:
        """The lines, each without its newline and one trailing `\\r`."""
        lines = self.text.replace("\r\n", "\n").split("\n")
        lines.pop()  # the empty string after the final newline
        return lines

    def non_blank(self) -> int:
        """How many lines are not blank, counted over the whole text at once (a `\\r` is
        whitespace, so it needs no stripping here)."""
        if not self.text or not self.may_have_blanks:
            return self.count
        blank = len(_BLANK_LATER_LINE.findall(self.text))
        blank += _BLANK_FIRST_LINE.match(self.text) is not None
        return self.count - blank


class LineSplitter:
    """Turns chunks of bytes into decoded lines, keeping only the unfinished last line.

    After an error, the splitter must not be fed again.
    """

    def __init__(self, max_line_bytes: int = MAX_LINE_BYTES) -> None:
        self.max_line_bytes = max_line_bytes
        self.lines_done = 0  # complete lines handed out so far
        self._tail: list[bytes] = []
        self._tail_bytes = 0
        self._at_start = True

    def feed(self, chunk: bytes) -> Lines:
        cut = chunk.rfind(b"\n")
        if cut < 0:
            self._tail.append(chunk)
            self._tail_bytes += len(chunk)
            return Lines(self.lines_done + 1, "", self._tail_error())
        # Keep the final newline in the block so that every line, the last included, ends with
        # one (and loses its "\r" in the one `replace` of `Lines.split`).
        block = b"".join([*self._tail, chunk[: cut + 1]]) if self._tail else chunk[: cut + 1]
        rest = chunk[cut + 1 :]
        self._tail = [rest] if rest else []
        self._tail_bytes = len(rest)
        first = self.lines_done + 1
        text, error = self._decode(block)
        if len(text) == len(block):  # all ASCII (no bad byte, no BOM, nothing cut off)
            count, may_have_blanks = _ascii_lines(block)
        else:
            count, may_have_blanks = text.count("\n"), True
        self.lines_done += count
        return Lines(first, text, error or self._tail_error(), count, may_have_blanks)

    def finish(self) -> Lines:
        """The last line, when the input does not end with a newline."""
        first = self.lines_done + 1
        if not self._tail_bytes:
            return Lines(first, "")
        block = b"".join([*self._tail, b"\n"])
        self._tail, self._tail_bytes = [], 0
        text, error = self._decode(block)
        return Lines(first, text, error, self._count(text))

    def _tail_error(self) -> DatasetError | None:
        if self._tail_bytes > self.max_line_bytes:
            return self._too_long(self.lines_done + 1)
        return None

    def _too_long(self, number: int) -> DatasetError:
        return DatasetError(
            f"longer than {self.max_line_bytes} bytes, the limit for one line "
            "(is the file missing newlines?)",
            number,
        )

    def _decode(self, block: bytes) -> tuple[str, DatasetError | None]:
        """The text of a block that ends with a newline, up to the first bad line; one decode
        checks the UTF-8 of the whole block."""
        error = None
        if len(block) > self.max_line_bytes:  # rare: only then can a line in it be too long
            start = 0
            for offset, line in enumerate(block.split(b"\n")):
                if len(line) > self.max_line_bytes:
                    error = self._too_long(self.lines_done + 1 + offset)
                    block = block[:start]
                    break
                start += len(line) + 1
        try:
            text = block.decode("utf-8")
        except UnicodeDecodeError as decode_error:
            # Earlier than any overlong line: that one was cut off the block already.
            bad = decode_error.start
            line_start = block.rfind(b"\n", 0, bad) + 1
            number = self.lines_done + block.count(b"\n", 0, bad) + 1
            error = DatasetError(
                f"not valid UTF-8 (byte 0x{block[bad]:02x} at column {bad - line_start + 1})",
                number,
            )
            text = block[:line_start].decode("utf-8")
        if self._at_start and text:
            self._at_start = False
            text = text.removeprefix(BOM)
        return text, error

    def _count(self, text: str) -> int:
        count = text.count("\n")
        self.lines_done += count
        return count


# The first non-space character of a text, for the first non-blank line.
_NON_SPACE: Final = re.compile(r"\S")
# A CSV header cell that auto may take for a column name: one plain word, perhaps quoted (a
# first line of prose such as "text, and more text" is not a header).
_HEADER_NAME: Final = re.compile(r'\s*"?([A-Za-z_][A-Za-z0-9_.-]{0,63})"?\s*')


def _header_columns(line: str) -> list[str] | None:
    """The column names when `line` looks like a CSV header of two or more plain names."""
    cells = line.split(",")
    if len(cells) < 2:
        return None
    names = []
    for cell in cells:
        match = _HEADER_NAME.fullmatch(cell)
        if match is None:
            return None
        names.append(match.group(1))
    return names


def opens_a_json_array(line: str) -> bool:
    """Whether a file's first line is the start of a JSON array: `[` alone (pretty-printed),
    `[` before an object, an array or a string, or a whole array on one line. Text that only
    starts with a bracket, such as `[INST] ...` or `[1] Introduction`, is not."""
    stripped = line.strip()
    if not stripped.startswith("["):
        return False
    if stripped == "[" or stripped[1:].lstrip()[:1] in ("{", "[", '"'):
        return True
    try:
        return isinstance(json.loads(stripped), list)
    except ValueError:
        return False


def _named_format(filename: str | None) -> tuple[str, str] | None:
    """(what the name says, the format to read) for a file name whose extension names one."""
    if filename is None:
        return None
    return _EXTENSIONS.get(os.path.splitext(filename)[1].lower())


class DatasetValidator:
    """Validates a dataset fed in chunks; `finish()` says what it holds or raises DatasetError.

    The format may be unknown when the data starts (a multipart form can send its `format`
    field after the file): then both line readings are checked side by side and `set_format` or
    `finish` picks one. An error is raised as soon as it is certain whatever the format is.

    A table (CSV, Parquet) is read by `finish` from the stored file, through `read_records`, as
    the worker reads it; its lines are not looked at as it arrives.
    """

    def __init__(
        self,
        format: str | None = "auto",
        max_line_bytes: int = MAX_LINE_BYTES,
        filename: str | None = None,
    ) -> None:
        self._lines = LineSplitter(max_line_bytes)
        self._max_line_bytes = max_line_bytes
        self._format: str | None = None
        self.examples = 0
        # What the file says it is besides its lines: its name, its first bytes (is it Parquet?
        # None until four bytes are in), and its first non-blank line.
        self._filename: str | None = None
        self._named: tuple[str, str] | None = None
        self._head = b""
        self._parquet: bool | None = None
        self._first_line_seen = False
        self._starts_array = False
        self._csv_header = False
        # Set once the lines are left to the stored file: they are not read as they come.
        self._lines_skipped = False
        # The JSONL reading: what the first non-blank line is, the shape the first object set,
        # and the first error met.
        self._first_is_object: bool | None = None
        self._shape: Shape | None = None
        self._shape_line = 0
        self._json_error: DatasetError | None = None
        # An error in every line reading (bad UTF-8, an overlong line): nothing after it is read.
        self._fatal: DatasetError | None = None
        if filename is not None:
            self.set_filename(filename)
        if format is not None:
            self.set_format(format)

    @property
    def format(self) -> str | None:
        return self._format

    def set_format(self, format: str) -> None:
        if format not in FORMATS:
            raise ValueError(f"unknown format {format!r}")
        self._format = format
        self._raise_if_decided()

    def set_filename(self, filename: str) -> None:
        """The uploaded file's name, before its first byte: its extension says what it is."""
        self._filename = filename
        self._named = _named_format(filename)
        self._raise_if_decided()

    def feed(self, chunk: bytes) -> None:
        if self._fatal is not None or not chunk:
            return  # after a fatal error the rest is not read; the caller only drains its input
        if self._parquet is None:
            self._see_head(chunk)
        if self._lines_skipped or self._skip_lines():
            self._lines_skipped = True
            return
        self._take(self._lines.feed(chunk))

    def finish(self, stored: Callable[[], BinaryIO] | None = None) -> DatasetSummary:
        """What the file holds. `stored` opens the file as stored so far: a table, or a file
        whose lines were skipped, is read from it."""
        if self._format is None:  # the form never said: the documented default
            self._format = "auto"
        if self._parquet is None:  # shorter than the magic bytes
            self._parquet = False
        if self._fatal is None and not self._lines_skipped:
            self._take(self._lines.finish())
        self._raise_if_decided()
        reading = self._reading()
        if reading in TABLE_FORMATS or self._lines_skipped:
            if stored is None:
                raise ValueError("a table is validated from its stored file: pass `stored`")
            with stored() as stream:
                return summarize(stream, reading or "jsonl", self._max_line_bytes)
        if self.examples == 0:
            raise DatasetError("the file holds no examples (it is empty or has only blank lines)")
        if reading == "jsonl":
            assert self._shape is not None  # set by the first example, which had no error
            return DatasetSummary("jsonl", self._shape, self.examples)
        return DatasetSummary("text", "text", self.examples)

    def _see_head(self, chunk: bytes) -> None:
        self._head += chunk[: len(PARQUET_MAGIC) - len(self._head)]
        if not PARQUET_MAGIC.startswith(self._head):
            self._parquet = False
        elif len(self._head) == len(PARQUET_MAGIC):
            self._parquet = True
            self._raise_if_decided()

    def _table_hint(self) -> str | None:
        """The table format the file's first bytes or its name say it is."""
        if self._parquet:
            return "parquet"
        if self._named is not None and self._named[1] in TABLE_FORMATS:
            return self._named[1]
        return None

    def _skip_lines(self) -> bool:
        """Whether the lines are left to the stored file: it is read as a table, or may be."""
        if self._format is None:
            return self._table_hint() is not None
        return self._reading() in TABLE_FORMATS

    def _reading(self) -> str | None:
        """The format the file is read as, once that is known."""
        if self._format != "auto":
            return self._format
        hint = self._table_hint()
        if hint is not None:
            return hint
        if self._named is not None:  # .json, .jsonl
            return self._named[1]
        if self._csv_header:
            return "csv"
        if self._first_is_object is not None:
            return "jsonl" if self._first_is_object else "text"
        return None

    def _mismatch(self, reading: str | None) -> DatasetError | None:
        """The error when the file's name or content says it is not what it is read as."""
        if reading is None:
            return None
        if reading == "parquet":
            if self._parquet is False:
                return DatasetError(
                    "not a Parquet file: it does not start with Parquet's magic bytes PAR1"
                )
            return None
        if self._parquet:
            return DatasetError(
                f"the file is Parquet (it starts with PAR1), not {_FORMAT_NAMES[reading]}; send "
                "format=parquet or auto"
            )
        if reading == "text" and self._named is not None:
            said, format = self._named
            return DatasetError(
                f'the file name "{self._filename}" says {said}, not text; send format={format} '
                "or auto, or rename the file if it is text"
            )
        if reading in ("text", "jsonl") and self._starts_array:
            return DatasetError(_JSON_ARRAY)
        return None

    def _raise_if_decided(self) -> None:
        reading = self._reading()
        mismatch = self._mismatch(reading)
        if mismatch is not None:
            raise mismatch
        if reading in TABLE_FORMATS or self._lines_skipped:
            return  # read from the stored file at the end
        fatal, json_error = self._fatal, self._json_error
        if reading == "jsonl":
            errors = [error for error in (fatal, json_error) if error is not None]
            if errors:
                raise min(errors, key=_line_of)
        elif reading == "text":
            if fatal is not None:
                raise fatal
        elif (
            fatal is not None
            and not self._csv_header  # auto may still read it as CSV, maybe not this column
            and (json_error is None or _line_of(json_error) > _line_of(fatal))
        ):
            raise fatal  # the format is still open, but this line is bad in every reading

    def _take(self, got: Lines) -> None:
        if not self._first_line_seen:
            self._see_first_line(got)
        if self._format == "text" or self._json_error is not None:
            # Only counted: the hot path of a large text upload.
            self.examples += got.non_blank()
        else:
            for number, line in enumerate(got.split(), start=got.first):
                if _is_blank(line):
                    continue
                self.examples += 1
                if self._json_error is None:
                    self._check_json(line, number)
        self._fatal = got.error
        self._raise_if_decided()

    def _see_first_line(self, got: Lines) -> None:
        """Note what the first non-blank line says: a JSON array, or a CSV header."""
        found = _NON_SPACE.search(got.text)
        if found is None:
            return
        start = got.text.rfind("\n", 0, found.start()) + 1
        line = got.text[start : got.text.index("\n", found.start())].removesuffix("\r")
        self._first_line_seen = True
        self._starts_array = opens_a_json_array(line)
        columns = _header_columns(line)
        self._csv_header = columns is not None and columns_shape(columns) is not None

    def _check_json(self, line: str, number: int) -> None:
        try:
            value = parse_json_line(line, number)
            if self._first_is_object is None:
                self._first_is_object = isinstance(value, dict)
            self._shape = check_example(value, number, self._shape, self._shape_line)
            self._shape_line = self._shape_line or number
        except DatasetError as error:
            self._json_error = error
            if self._first_is_object is None:
                self._first_is_object = False


def iter_lines(
    chunks: Iterable[bytes], max_line_bytes: int = MAX_LINE_BYTES
) -> Iterator[tuple[int, str]]:
    """(line number, line) for every non-blank line, decoded and checked as in validation."""
    splitter = LineSplitter(max_line_bytes)
    for got in itertools.chain((splitter.feed(chunk) for chunk in chunks), [None]):
        if got is None:
            got = splitter.finish()
        for number, line in enumerate(got.split(), start=got.first):
            if not _is_blank(line):
                yield number, line
        if got.error is not None:
            raise got.error


def iter_examples(
    chunks: Iterable[bytes], format: str, max_line_bytes: int = MAX_LINE_BYTES
) -> Iterator[Example]:
    """The examples of a line format, in order: a str per line for `text`, the object of each
    line for `jsonl` (checked again, so a file changed behind our back fails loudly)."""
    shape: Shape | None = None
    shape_line = 0
    for number, line in iter_lines(chunks, max_line_bytes):
        if format == "text":
            yield line
            continue
        value = parse_json_line(line, number)
        shape = check_example(value, number, shape, shape_line)
        shape_line = shape_line or number
        yield value


def read_chunks(stream: BinaryIO, size: int = 1024 * 1024) -> Iterator[bytes]:
    """Chunks of a binary file object, for `iter_examples(read_chunks(f), ...)`."""
    while chunk := stream.read(size):
        yield chunk


def read_records(
    stream: BinaryIO, format: str, max_bytes: int = MAX_LINE_BYTES
) -> Iterator[Example]:
    """Every example of a stored dataset file, in order: a str per line of `text`, else an object
    per line or row, checked as upload checks it. The one reading of stored files: the worker
    reads every dataset through here, and upload validation every table."""
    if format in TABLE_FORMATS:
        from shared.dataset_tables import read_table  # pyarrow, only where a table is read

        for batch in read_table(stream, format, max_bytes).batches:
            yield from batch.records()
    else:
        yield from iter_examples(read_chunks(stream), format, max_bytes)


def count_records(stream: BinaryIO, format: str, max_bytes: int = MAX_LINE_BYTES) -> int:
    """How many examples a stored dataset file holds, without building them. A table's rows are
    not checked here: `read_records`, which follows, checks them."""
    if format in TABLE_FORMATS:
        from shared.dataset_tables import read_table

        return sum(batch.size for batch in read_table(stream, format, max_bytes).batches)
    return sum(1 for _ in iter_lines(read_chunks(stream), max_bytes))


def summarize(stream: BinaryIO, format: str, max_bytes: int = MAX_LINE_BYTES) -> DatasetSummary:
    """What a stored file holds, read whole with `read_records`' reading: a table, or a file
    whose lines the validator left to storage."""
    shape: Shape | None = "text"
    examples = 0
    if format in TABLE_FORMATS:
        from shared.dataset_tables import read_table

        table = read_table(stream, format, max_bytes)
        shape = table.shape
        for batch in table.batches:
            batch.check()
            examples += batch.size
        empty = "the file holds no examples (it has no rows)"
    else:
        for record in iter_examples(read_chunks(stream), format, max_bytes):
            if examples == 0 and isinstance(record, dict):
                shape = shape_of(record)
            examples += 1
        empty = "the file holds no examples (it is empty or has only blank lines)"
    if examples == 0:
        raise DatasetError(empty)
    assert shape is not None  # the first record passed `check_example`
    return DatasetSummary(format, shape, examples)  # type: ignore[arg-type]


def validate(
    chunks: Iterable[bytes], format: str = "auto", filename: str | None = None
) -> DatasetSummary:
    """Validate a whole dataset at once (tests, the CLI): the summary, or a DatasetError."""
    validator = DatasetValidator(format, filename=filename)
    kept = []
    for chunk in chunks:
        kept.append(chunk)
        validator.feed(chunk)
    return validator.finish(lambda: io.BytesIO(b"".join(kept)))
