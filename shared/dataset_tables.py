"""The table formats, CSV and Parquet, read with pyarrow from a stored file, a batch at a time
(a Parquet file keeps its index at its end, so it cannot be checked as it arrives): pyarrow's
streaming CSV reader a block at a time, Parquet a row-group batch at a time.

Rows count from 1 (a CSV header is not a row); the fields a shape uses may hold at most
`MAX_LINE_BYTES` per row together, and a file at most `MAX_ROWS` rows. `read_table` is reached
through `shared.dataset_formats.read_records`, the one reading of stored files.
"""

import csv
import io
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO, Final

import numpy as np

from shared.dataset_formats import (
    BOM,
    MAX_LINE_BYTES,
    PARQUET_MAGIC,
    REQUIRED_COLUMNS,
    DatasetError,
    Shape,
    check_messages,
    columns_shape,
    parse_json_line,
)

if TYPE_CHECKING:
    import pyarrow as pa

# Rows of one table. A Parquet file can claim billions of empty rows in a few bytes; this is
# more examples than a 1 GiB text file of the shortest lines holds.
MAX_ROWS: Final = 500_000_000
# pyarrow is imported where a table is read: it adds a fifth of a second to the start
# of every process, and most never read one.

# A CSV header must end within this many bytes and name at most `MAX_COLUMNS` columns: pyarrow
# keeps a converter per column, some kilobytes each, before we see a name (a 2 MB header of
# 200,000 columns took it 1.7 GB).
MAX_CSV_HEADER_BYTES: Final = 1024 * 1024
MAX_COLUMNS: Final = 1000
# Bytes of CSV parsed at once. A row must fit in about two blocks, so one at least as large as
# the row limit lets every row within it through.
_CSV_MIN_BLOCK_BYTES: Final = 1024 * 1024
# A Parquet file's footer (its schema and row-group index) is read whole: this bounds it.
MAX_PARQUET_FOOTER_BYTES: Final = 16 * 1024 * 1024
# Parquet is read a batch at a time, each about this many bytes as stored (by its row group's
# average row) and at most `_MAX_BATCH_ROWS` rows: a value stored once in a dictionary is
# copied into every row that uses it, so few rows keep a much-repeated long value small.
_PARQUET_BATCH_BYTES: Final = 8 * 1024 * 1024
_MAX_BATCH_ROWS: Final = 4096
_PARQUET_BUFFER_BYTES: Final = 1024 * 1024
# Python values are made from a batch this many bytes of rows at a time.
_SLICE_BYTES: Final = 8 * 1024 * 1024
# What a message takes in JSON besides its role and content: a row of many empty messages is
# as large as it would be in JSONL.
_MESSAGE_BYTES: Final = len('{"role": "", "content": ""}, ')


@dataclass(frozen=True)
class RowBatch:
    """Rows of a table as Arrow columns (one per field of the shape), checked column-wide: the
    number of the first row, each row's bytes, and the first bad row those checks found.

    Python values are made a slice of rows at a time, and the messages are checked as they are
    made; `check` and `records` raise the first bad row of either check at its place.
    """

    first: int
    fields: dict[str, "pa.Array"]
    row_bytes: np.ndarray
    error: DatasetError | None = None

    @property
    def size(self) -> int:
        return len(self.row_bytes)

    def check(self) -> None:
        if "messages" in self.fields:
            for _ in self._slices():
                pass
        elif self.error is not None:
            raise self.error

    def records(self) -> Iterator[dict[str, Any]]:
        names = list(self.fields)
        for columns in self._slices():
            for values in zip(*columns, strict=True):
                yield dict(zip(names, values, strict=True))

    def _slices(self) -> Iterator[list[list[Any]]]:
        good = self.size if self.error is None else (self.error.row or self.first) - self.first
        ends = np.cumsum(self.row_bytes[:good])
        start = 0
        while start < good:
            done = int(ends[start - 1]) if start else 0
            stop = max(int(np.searchsorted(ends, done + _SLICE_BYTES, side="right")), start + 1)
            columns = []
            for name, column in self.fields.items():
                values = column.slice(start, stop - start).to_pylist()
                if name == "messages":
                    _check_message_rows(values, _is_text_type(column.type), self.first + start)
                columns.append(values)
            yield columns
            start = stop
        if self.error is not None:
            raise self.error


@dataclass(frozen=True)
class TableReading:
    """A table's shape, known from its columns before any row, and its rows a batch at a time."""

    shape: Shape
    batches: Iterator[RowBatch]


def read_table(stream: BinaryIO, format: str, max_bytes: int = MAX_LINE_BYTES) -> TableReading:
    """Open a CSV or Parquet file: its columns are checked now, its rows as they are read."""
    if format == "csv":
        return _read_csv(stream, max_bytes)
    if format == "parquet":
        return _read_parquet(stream, max_bytes)
    raise ValueError(f"not a table format: {format!r}")


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def _table_columns(names: list[str]) -> tuple[Shape, list[str]]:
    """The shape a table's columns hold, and the columns it reads in the order of the shape's
    fields. Names match without the spaces around them."""
    stripped = [name.strip() for name in names]
    shape = columns_shape(stripped)
    if shape is None:
        found = ", ".join(f'"{_clip(name, 64)}"' for name in names[:20]) or "none"
        if len(names) > 20:
            found += f" and {len(names) - 20} more"
        raise DatasetError(
            'expected the columns "text", or "prompt" and "completion", or "messages"; '
            f"found {found}"
        )
    counts = Counter(stripped)
    for field in REQUIRED_COLUMNS[shape]:
        if counts[field] > 1:
            raise DatasetError(f'the column "{field}" appears {counts[field]} times')
    return shape, [names[stripped.index(field)] for field in REQUIRED_COLUMNS[shape]]


def _is_text_type(type: "pa.DataType", views: bool = False) -> bool:
    """Whether a column holds strings (dictionary-encoded too; string views if `views`)."""
    import pyarrow as pa

    if pa.types.is_dictionary(type):
        type = type.value_type
    return (
        pa.types.is_string(type)
        or pa.types.is_large_string(type)
        or (views and pa.types.is_string_view(type))
    )


def _checked(fields: dict[str, "pa.Array"], first: int, max_bytes: int) -> RowBatch:
    """Rows `first`.. of a table with the checks that need no Python values: every string
    field present and UTF-8, and each row's fields within `max_bytes` together."""
    size = len(next(iter(fields.values())))
    row_bytes = np.zeros(size, dtype=np.int64)
    errors = []
    for name, column in fields.items():
        if _is_text_type(column.type):
            errors.append(_text_error(name, column, first))
            row_bytes += _byte_lengths(column)
        else:  # Parquet messages: lists of structs
            row_bytes += _message_bytes(column)
    over = np.flatnonzero(row_bytes > max_bytes)
    if over.size:
        index = int(over[0])
        errors.append(
            DatasetError(
                f"{int(row_bytes[index])} bytes in its columns, more than {max_bytes}, the limit "
                "for one row",
                row=first + index,
            )
        )
    found = [error for error in errors if error is not None]
    first_bad = min(found, key=lambda error: error.row or 0) if found else None
    return RowBatch(first, fields, row_bytes, first_bad)


def _byte_lengths(column: "pa.Array") -> np.ndarray:
    """The UTF-8 bytes of each value of a string column (0 for a null)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_dictionary(column.type):  # each row's value, without making them
        lengths = np.append(_byte_lengths(column.dictionary), 0)
        return lengths[column.indices.fill_null(-1).to_numpy(zero_copy_only=False)]
    lengths = pc.binary_length(column).fill_null(0)
    return lengths.to_numpy(zero_copy_only=False).astype(np.int64)


def _message_bytes(column: "pa.Array") -> np.ndarray:
    """Bytes of each row of a list-of-structs column: its roles and contents, and
    `_MESSAGE_BYTES` a message."""
    import pyarrow.compute as pc

    messages = pc.list_flatten(column)
    lengths = np.full(len(messages), _MESSAGE_BYTES, dtype=np.int64)
    for key in ("role", "content"):
        lengths += _byte_lengths(messages.field(key))
    parents = pc.list_parent_indices(column).to_numpy(zero_copy_only=False)
    return np.bincount(parents, weights=lengths, minlength=len(column)).astype(np.int64)


def _text_error(name: str, column: "pa.Array", first: int) -> DatasetError | None:
    """The first null or not-UTF-8 value of a string column, as an error."""
    import pyarrow as pa
    import pyarrow.compute as pc

    errors = []
    if column.null_count:
        index = pc.index(column.is_null(), True).as_py()
        errors.append(DatasetError(f'field "{name}" must be a string, got null', row=first + index))
    encoded = pa.types.is_dictionary(column.type)
    values = column.dictionary if encoded else column
    try:
        values.validate(full=True)  # checks the UTF-8 of every value, in C
    except pa.ArrowInvalid:
        # Rare: found again in Python, to say which row and byte.
        bad = {}
        binary = pa.large_binary() if pa.types.is_large_string(values.type) else pa.binary()
        for index, raw in enumerate(values.view(binary).to_pylist()):
            if raw is None:
                continue
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as error:
                bad[index] = f"byte 0x{raw[error.start]:02x} at column {error.start + 1}"
                if not encoded:
                    break
        found = list(bad.items())[:1]  # (row, what is wrong)
        if encoded:  # a bad dictionary value is first met in the first row that points to it
            indices = column.indices.fill_null(-1).to_numpy(zero_copy_only=False)
            rows = np.flatnonzero(np.isin(indices, list(bad)))
            found = [(int(rows[0]), bad[int(indices[rows[0]])])] if rows.size else []
        for row, where in found:
            errors.append(
                DatasetError(f'field "{name}" is not valid UTF-8 ({where})', row=first + row)
            )
    return min(errors, key=lambda error: error.row or 0) if errors else None


def _check_message_rows(values: list[Any], is_json: bool, first: int) -> None:
    """Check each row's messages, parsing JSON text in place first."""
    for index, value in enumerate(values):
        row = first + index
        try:
            if is_json and isinstance(value, str):
                try:
                    value = values[index] = parse_json_line(value, row)
                except DatasetError as error:
                    raise DatasetError(f'field "messages" is {error.reason}') from None
            check_messages(value, row)
        except DatasetError as error:
            raise DatasetError(error.reason, row=row) from None


class _BadRows:
    """pyarrow's handler of CSV rows with the wrong number of fields: keeps the first."""

    def __init__(self) -> None:
        self.first: Any = None

    def __call__(self, row: Any) -> str:
        if self.first is None:
            self.first = row
        return "error"


def _read_csv(stream: BinaryIO, max_bytes: int) -> TableReading:
    import pyarrow as pa

    start = stream.tell()
    _check_header_width(stream)
    bad_rows = _BadRows()
    # The header first, to know the columns: the reader then takes them as strings, whatever
    # a block's values look like, and leaves the other columns unconverted.
    names = _open_csv(stream, max_bytes, bad_rows).schema.names
    shape, columns = _table_columns(names)
    stream.seek(start)
    reader = _open_csv(stream, max_bytes, bad_rows, {column: pa.string() for column in columns})
    return TableReading(shape, _csv_batches(reader, shape, columns, bad_rows, max_bytes))


def _check_header_width(stream: BinaryIO) -> None:
    """Refuse a CSV header too long or too wide for pyarrow to take in, read with Python's csv
    module from the start of the file (and the file put back where it was)."""
    start = stream.tell()
    head = stream.read(MAX_CSV_HEADER_BYTES)
    stream.seek(start)
    text = io.StringIO(head.decode("utf-8", "replace").removeprefix(BOM), newline="")
    try:
        header = next((record for record in csv.reader(text) if record), [])
    except csv.Error as error:
        raise DatasetError(f"the CSV header is not valid ({error})") from None
    if len(head) == MAX_CSV_HEADER_BYTES and text.tell() == len(text.getvalue()):
        raise DatasetError(
            f"the CSV header is longer than {MAX_CSV_HEADER_BYTES} bytes, the limit (or it does "
            "not end)"
        )
    if len(header) > MAX_COLUMNS:
        raise DatasetError(
            f"the CSV header names {len(header)} columns, more than {MAX_COLUMNS}, the limit"
        )


def _open_csv(
    stream: BinaryIO,
    max_bytes: int,
    bad_rows: _BadRows,
    types: "dict[str, pa.DataType] | None" = None,
) -> Any:
    import pyarrow as pa
    import pyarrow.csv as csv

    read = csv.ReadOptions(block_size=max(max_bytes, _CSV_MIN_BLOCK_BYTES), use_threads=False)
    parse = csv.ParseOptions(newlines_in_values=True, invalid_row_handler=bad_rows)
    # Not checked as a block is converted, which names no row: `_checked` finds the bad value.
    convert = csv.ConvertOptions(
        check_utf8=False,
        column_types=types,
        include_columns=list(types) if types else None,
        strings_can_be_null=False,
    )
    try:
        return csv.open_csv(stream, read_options=read, parse_options=parse, convert_options=convert)
    except pa.ArrowInvalid as error:
        raise _csv_error(error, bad_rows, 0, max_bytes) from None


def _csv_batches(
    reader: Any, shape: Shape, columns: list[str], bad_rows: _BadRows, max_bytes: int
) -> Iterator[RowBatch]:
    import pyarrow as pa

    rows = 0
    while True:
        try:
            batch = reader.read_next_batch()
        except StopIteration:
            return
        except pa.ArrowInvalid as error:
            raise _csv_error(error, bad_rows, rows, max_bytes) from None
        rows += batch.num_rows
        if rows > MAX_ROWS:
            raise DatasetError(f"the file has more than {MAX_ROWS} rows, the limit")
        fields = {
            field: batch.column(column)
            for field, column in zip(REQUIRED_COLUMNS[shape], columns, strict=True)
        }
        yield _checked(fields, rows - batch.num_rows + 1, max_bytes)


def _csv_error(error: Exception, bad_rows: _BadRows, rows: int, max_bytes: int) -> DatasetError:
    """What pyarrow's error means, at the row it happened."""
    message = str(error)
    if bad_rows.first is not None:
        bad = bad_rows.first
        got = f"{bad.actual_columns} fields where the header has {bad.expected_columns}"
        hint = " (a stray comma, or a quote left open?)"
        if bad.number is None:
            return DatasetError(f"a row after row {rows} has {got}{hint}")
        return DatasetError(f"has {got}{hint}", row=bad.number - 1)  # pyarrow counts the header
    if "straddling" in message:  # a row longer than pyarrow's block
        return DatasetError(
            f"longer than {max_bytes} bytes, the limit for one row (is a quote left open?)",
            row=rows + 1,
        )
    if message.startswith("Empty CSV file"):
        return DatasetError("the file holds no examples (it is empty)")
    return DatasetError(f"not valid CSV after row {rows} ({_clip(message, 200)})")


def _read_parquet(stream: BinaryIO, max_bytes: int) -> TableReading:
    import pyarrow as pa
    import pyarrow.parquet as pq

    _check_footer(stream)
    try:
        parquet = pq.ParquetFile(stream, buffer_size=_PARQUET_BUFFER_BYTES)
        schema = parquet.schema_arrow
    except (pa.ArrowException, OSError) as error:
        raise DatasetError(f"not a valid Parquet file ({_clip(str(error), 200)})") from None
    shape, columns = _table_columns(schema.names)
    for field, column in zip(REQUIRED_COLUMNS[shape], columns, strict=True):
        _check_parquet_type(field, column, schema.field(column).type)
    if parquet.metadata.num_rows > MAX_ROWS:
        raise DatasetError(
            f"the file has {parquet.metadata.num_rows} rows, more than {MAX_ROWS}, the limit"
        )
    return TableReading(shape, _parquet_batches(parquet, shape, columns, max_bytes))


def _check_footer(stream: BinaryIO) -> None:
    """Refuse a file whose end is not Parquet's, or whose footer is too large to read whole."""
    start = stream.tell()
    end = stream.seek(0, os.SEEK_END)
    if end - start < 2 * len(PARQUET_MAGIC) + 4:
        raise DatasetError("not a valid Parquet file (it is too short)")
    stream.seek(end - 8)
    tail = stream.read(8)
    stream.seek(start)
    if tail[4:] != PARQUET_MAGIC:
        raise DatasetError(
            "not a valid Parquet file: it does not end with the magic bytes PAR1 (cut short?)"
        )
    footer = int.from_bytes(tail[:4], "little")
    if footer > MAX_PARQUET_FOOTER_BYTES:
        raise DatasetError(
            f"the Parquet footer holds {footer} bytes, more than {MAX_PARQUET_FOOTER_BYTES}, "
            "the limit; write the file with fewer row groups or columns"
        )


def _check_parquet_type(field: str, column: str, type: "pa.DataType") -> None:
    import pyarrow as pa

    if _is_text_type(type, views=True):
        return  # messages too may be JSON text, as in CSV
    if field == "messages" and (pa.types.is_list(type) or pa.types.is_large_list(type)):
        item = type.value_type
        if pa.types.is_struct(item) and all(
            item.get_field_index(key) >= 0 and _is_text_type(item.field(key).type)
            for key in ("role", "content")
        ):
            return
    expected = (
        "a list of {role, content} structs of strings, or JSON text"
        if field == "messages"
        else "strings"
    )
    raise DatasetError(f'the column "{_clip(column, 64)}" holds {type}; expected {expected}')


def _parquet_batches(
    parquet: Any, shape: Shape, columns: list[str], max_bytes: int
) -> Iterator[RowBatch]:
    import pyarrow as pa

    rows = 0
    for group in range(parquet.num_row_groups):
        meta = parquet.metadata.row_group(group)
        average = meta.total_byte_size // max(meta.num_rows, 1)
        size = min(max(_PARQUET_BATCH_BYTES // max(average, 1), 1), _MAX_BATCH_ROWS)
        batches = parquet.iter_batches(
            batch_size=size, row_groups=[group], columns=columns, use_threads=False
        )
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                break
            except (pa.ArrowException, OSError) as error:
                raise DatasetError(
                    f"not a valid Parquet file (row group {group + 1}, after row {rows}: "
                    f"{_clip(str(error), 200)})"
                ) from None
            fields = {
                field: _without_views(batch.column(column))
                for field, column in zip(REQUIRED_COLUMNS[shape], columns, strict=True)
            }
            yield _checked(fields, rows + 1, max_bytes)
            rows += batch.num_rows


def _without_views(column: "pa.Array") -> "pa.Array":
    """A string-view column (as pyarrow's view types are read back) as plain strings, its UTF-8
    left to `_checked`, which names the row."""
    import pyarrow as pa

    if pa.types.is_string_view(column.type):
        return column.cast(pa.large_binary()).view(pa.large_string())
    return column
