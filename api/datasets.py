"""Datasets: upload (streamed, hashed and validated on the way to storage), list, read, download,
delete.

The upload never holds the file in memory: the request body is read chunk by chunk and fed to
python-multipart's streaming parser, whose `file` part goes through the validator and the hash
into a storage file that is renamed into place only when everything passed. Starlette's own form
parsing is not used because it spools the whole file before the route runs.

Lines (text, JSONL) are validated as they arrive. A table (CSV, Parquet) is validated when the
file is all in, from the stored file before its rename, through the reading the worker uses.
"""

import asyncio
import hashlib
import io
import logging
import re
import threading
import unicodedata
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from typing import Annotated, Any, BinaryIO
from urllib.parse import quote

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from sqlalchemy import or_, select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from api.deps import DatasetDep, DatasetSnapshotDep, PrincipalDep, SessionDep
from api.errors import RESOURCE_ERRORS, APIError, not_found
from api.pagination import list_of, newest_first
from shared import storage
from shared.dataset_formats import FORMATS, DatasetError, DatasetSummary, DatasetValidator
from shared.ids import new_id
from shared.jobs import UNFINISHED
from shared.models import Dataset, Job, utcnow
from shared.schemas import DatasetRead, ErrorRead, ListRead
from shared.settings import get_settings
from shared.storage import dataset_key

router = APIRouter(prefix="/datasets", tags=["datasets"], responses=RESOURCE_ERRORS)
logger = logging.getLogger(__name__)

Limit = Annotated[int, Query(ge=1, le=100)]

# Body bytes handed to the parser at once, in a worker thread so the event loop stays free.
BATCH_BYTES = 1024 * 1024
# File bytes that may still be on their way to storage while the next batch is parsed.
STORE_BACKLOG_BYTES = 8 * BATCH_BYTES
# What a body may carry besides the file's bytes: boundaries, part headers, the format field.
FORM_OVERHEAD_BYTES = 64 * 1024
MAX_FIELD_BYTES = 64
MAX_FILENAME_CHARS = 255
_SEPARATORS = re.compile(r"[/\\]")
_MEDIA_TYPES = {
    "text": "text/plain; charset=utf-8",
    "jsonl": "application/jsonl",
    "csv": "text/csv; charset=utf-8",
    "parquet": "application/vnd.apache.parquet",
}

_UPLOAD_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["file"],
                "properties": {
                    "file": {
                        "type": "string",
                        "format": "binary",
                        "description": (
                            "The dataset: UTF-8 text or JSONL, one example per line, or CSV or "
                            "Parquet, one example per row."
                        ),
                    },
                    "format": {"type": "string", "enum": list(FORMATS), "default": "auto"},
                },
            }
        }
    },
}


def safe_filename(raw: bytes | None) -> str:
    """The client's file name as a label only: its last path component, without control
    characters, at most 255 characters. It never becomes a path."""
    name = raw.decode("utf-8", "replace") if raw else ""
    name = _SEPARATORS.split(name)[-1]
    name = "".join(ch for ch in name if unicodedata.category(ch) != "Cc").strip()
    if name in ("", ".", ".."):
        return "dataset"
    return name[:MAX_FILENAME_CHARS]


def _too_large(limit: int) -> APIError:
    return APIError(
        413,
        "dataset_too_large",
        f"the dataset is larger than the limit of {limit} bytes",
        param="file",
        details={"limit_bytes": limit},
    )


def _invalid_dataset(error: DatasetError) -> APIError:
    details = {"row": error.row} if error.row is not None else {"line": error.line}
    return APIError(422, "invalid_dataset", str(error), param="file", details=details)


def _malformed(message: str) -> APIError:
    return APIError(400, "invalid_multipart", message)


class _Upload:
    """One multipart body, parsed as it arrives. The `file` part is hashed, validated and
    written to storage; the `format` field is kept; other parts are skipped."""

    def __init__(self, dataset_id: str, boundary: bytes, limit: int) -> None:
        self.dataset_id = dataset_id
        self.limit = limit
        self.validator = DatasetValidator(format=None)  # the format field may come last
        self.sha256 = hashlib.sha256()
        self.bytes = 0
        self.filename: str | None = None
        self.format: str | None = None
        self.complete = False
        # One batch at a time (`write`, `finish`); `abort` waits for the one in progress.
        self._busy = threading.Lock()
        # The file's bytes are hashed on one thread and written on another, each in order,
        # beside the validator in the caller's thread (hashlib and file writes release the
        # GIL). A batch does not wait for its own bytes to be stored: up to
        # `STORE_BACKLOG_BYTES` may still be on their way when the next batch is parsed.
        self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="upload-hash")
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="upload-write")
        self._stores: deque[tuple[int, Future[None], Future[int]]] = deque()
        self._backlog_bytes = 0
        self._files = ExitStack()
        self._sink: BinaryIO | None = None
        self._part: str | None = None
        self._headers: dict[bytes, bytes] = {}
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._field = bytearray()
        self._parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._on_part_begin,
                "on_header_field": self._on_header_field,
                "on_header_value": self._on_header_value,
                "on_header_end": self._on_header_end,
                "on_headers_finished": self._on_headers_finished,
                "on_part_data": self._on_part_data,
                "on_part_end": self._on_part_end,
                "on_end": self._on_end,
            },
        )

    def write(self, data: bytes) -> None:
        """Parse one batch of the body; returns once its file bytes are validated, and at most
        `STORE_BACKLOG_BYTES` of them are still being hashed and written. Raises the first
        error: a failed store of earlier bytes, else this batch's."""
        with self._busy:
            try:
                self._parse(data)
            except BaseException:
                self._settle(backlog=0)
                raise
            self._settle(backlog=STORE_BACKLOG_BYTES)

    def _parse(self, data: bytes) -> None:
        try:
            self._parser.write(data)
        except DatasetError as error:
            raise _invalid_dataset(error) from None
        except FormParserError as error:
            raise _malformed(f"the multipart body is malformed: {error}") from None

    def _store(self, piece: bytes) -> None:
        assert self._sink is not None
        self._stores.append(
            (
                len(piece),
                self._hasher.submit(self.sha256.update, piece),
                self._writer.submit(self._sink.write, piece),
            )
        )
        self._backlog_bytes += len(piece)

    def _settle(self, backlog: int) -> None:
        """Wait until at most `backlog` bytes are still being stored, and raise the first
        failure of the stores that are done."""
        while self._stores and (self._backlog_bytes > backlog or self._stores[0][2].done()):
            size, hashed, written = self._stores.popleft()
            self._backlog_bytes -= size
            hashed.result()
            written.result()

    def finish(self) -> DatasetSummary:
        """Check the whole form, then move the file into place."""
        with self._busy:
            try:
                self._settle(backlog=0)
                return self._finish()
            finally:
                self._shutdown_stores()

    def _shutdown_stores(self) -> None:
        self._hasher.shutdown()
        self._writer.shutdown()

    def _finish(self) -> DatasetSummary:
        if not self.complete:
            raise _malformed("the multipart body ended before its closing boundary")
        if self.filename is None:
            raise APIError(
                422,
                "invalid_request",
                "file: required; send the dataset as a multipart part named `file`",
                param="file",
            )
        try:
            summary = self.validator.finish(self._stored_so_far)
        except DatasetError as error:
            raise _invalid_dataset(error) from None
        self._files.close()  # fsync and rename: from here on the file is stored
        return summary

    def _stored_so_far(self) -> BinaryIO:
        """The file as written, before its rename: a table is validated from it. Every store
        has settled (`finish`), so flushing the buffer puts all of it on the file."""
        assert self._sink is not None
        self._sink.flush()
        return open(self._sink.name, "rb")  # noqa: SIM115 - the validator closes it

    def abort(self, error: BaseException) -> None:
        """Remove the partial file (an error passed into `open_write` skips the rename). A
        batch still in its thread (the request was cancelled) and the bytes still being stored
        are waited for first, so the file is never closed under a write."""
        with self._busy:
            self._shutdown_stores()
            self._files.__exit__(type(error), error, error.__traceback__)

    def _on_part_begin(self) -> None:
        self._headers = {}
        self._part = None

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _on_header_end(self) -> None:
        self._headers[bytes(self._header_name).strip().lower()] = bytes(self._header_value)
        self._header_name.clear()
        self._header_value.clear()

    def _on_headers_finished(self) -> None:
        disposition = self._headers.get(b"content-disposition")
        if disposition is None:
            raise _malformed("a multipart part has no Content-Disposition header")
        _, params = parse_options_header(disposition)
        name = params.get(b"name", b"").decode("utf-8", "replace")
        if name == "file":
            if self.filename is not None:
                raise APIError(
                    422, "invalid_request", "file: send one file per upload", param="file"
                )
            self.filename = safe_filename(params.get(b"filename"))
            self.validator.set_filename(self.filename)  # before the data: its extension counts
            self._sink = self._files.enter_context(storage.open_write(dataset_key(self.dataset_id)))
            self._part = "file"
        elif name == "format":
            if self.format is not None:
                raise APIError(422, "invalid_request", "format: given twice", param="format")
            self._field.clear()
            self._part = "format"

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._part == "file":
            assert self._sink is not None
            piece = data[start:end]
            self.bytes += len(piece)
            if self.bytes > self.limit:
                raise _too_large(self.limit)
            self._store(piece)
            self.validator.feed(piece)
        elif self._part == "format":
            self._field += data[start:end]
            if len(self._field) > MAX_FIELD_BYTES:
                raise self._bad_format()

    def _on_part_end(self) -> None:
        if self._part == "format":
            value = self._field.decode("utf-8", "replace").strip()
            if value not in FORMATS:
                raise self._bad_format()
            self.format = value
            self.validator.set_format(value)  # may decide an error the file part left open
        self._part = None

    def _on_end(self) -> None:
        self.complete = True

    def _bad_format(self) -> APIError:
        value = self._field[:MAX_FIELD_BYTES].decode("utf-8", "replace").strip()
        return APIError(
            422,
            "invalid_request",
            f"format: must be one of {', '.join(FORMATS)}; got {value!r}",
            param="format",
        )


def _boundary(request: Request) -> bytes:
    content_type, params = parse_options_header(request.headers.get("content-type"))
    if content_type != b"multipart/form-data":
        raise APIError(
            415,
            "unsupported_media_type",
            "send the dataset as multipart/form-data with a `file` part",
        )
    boundary = params.get(b"boundary", b"")
    if not 1 <= len(boundary) <= 200:
        raise _malformed("the multipart/form-data Content-Type needs a boundary of 1-200 chars")
    return boundary


async def _receive(request: Request, upload: _Upload, limit: int) -> DatasetSummary:
    """Feed the body to the upload in batches; stop at the first error.

    One batch is processed in a thread while the next one is read from the socket, so the
    network and the processing overlap with at most two batches in memory (and up to
    `STORE_BACKLOG_BYTES` of earlier ones on their way to storage). An error in the
    batch in the thread is raised as soon as it is seen, and comes before any error found
    later in the body (the limit, a disconnect), as if the batches had run one by one.
    """
    received = 0
    batch: list[bytes] = []
    batch_bytes = 0
    pending: asyncio.Future[None] | None = None
    try:
        try:
            async for chunk in request.stream():
                if pending is not None and pending.done():
                    pending, done = None, pending
                    done.result()
                received += len(chunk)
                # Counted here too, so a body that is all form overhead or junk cannot run
                # forever.
                if received > limit + FORM_OVERHEAD_BYTES:
                    raise _too_large(limit)
                batch.append(chunk)
                batch_bytes += len(chunk)
                if batch_bytes >= BATCH_BYTES:
                    if pending is not None:
                        pending, running = None, pending
                        await running
                    data = b"".join(batch)
                    batch, batch_bytes = [], 0
                    pending = asyncio.ensure_future(run_in_threadpool(upload.write, data))
        except ClientDisconnect:
            raise APIError(400, "client_disconnected", "the client went away mid-upload") from None
        if pending is not None:
            pending, running = None, pending
            await running
    except Exception:
        if pending is not None:
            # The earlier bytes' own error wins; the thread is done before the file is removed.
            pending, running = None, pending
            await running
        raise
    except BaseException:
        if pending is not None:  # cancelled: `abort` waits for the thread; see its result
            pending.add_done_callback(lambda done: done.cancelled() or done.exception())
        raise
    if batch:
        await run_in_threadpool(upload.write, b"".join(batch))
    return await run_in_threadpool(upload.finish)


def _store_row(session: Session, dataset: Dataset) -> None:
    session.add(dataset)
    session.commit()


@router.post(
    "",
    status_code=201,
    openapi_extra={"requestBody": _UPLOAD_BODY},
    responses={
        400: {"model": ErrorRead},
        413: {"model": ErrorRead},
        415: {"model": ErrorRead},
        422: {"model": ErrorRead},
    },
)
async def upload_dataset(
    request: Request, response: Response, session: SessionDep, principal: PrincipalDep
) -> DatasetRead:
    """Upload a dataset (multipart `file`, optional `format`); it is validated as it streams."""
    limit = get_settings().max_dataset_bytes
    boundary = _boundary(request)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit + FORM_OVERHEAD_BYTES:
        raise _too_large(limit)  # before reading a byte: a client that sent Expect waits for us
    # Hand back the connection that authentication used: an upload can take minutes.
    await run_in_threadpool(session.close)
    upload = _Upload(new_id("ds"), boundary, limit)
    try:
        summary = await _receive(request, upload, limit)
    except BaseException as error:
        upload.abort(error)
        if isinstance(error, APIError):
            logger.info("upload %s refused: %s %s", upload.dataset_id, error.code, error.message)
        raise
    dataset = Dataset(
        id=upload.dataset_id,
        project_id=principal.project_id,
        filename=upload.filename,
        format=summary.format,
        shape=summary.shape,
        bytes=upload.bytes,
        sha256=upload.sha256.hexdigest(),
        examples=summary.examples,
        created_at=utcnow(),
    )
    try:
        await run_in_threadpool(_store_row, session, dataset)
    except BaseException:
        # The file is in place but no row points to it: remove it, so nothing is kept.
        storage.delete(dataset_key(dataset.id))
        raise
    logger.info(
        "dataset %s stored: %d bytes, %d examples, %s/%s",
        dataset.id,
        dataset.bytes,
        dataset.examples,
        dataset.format,
        dataset.shape,
    )
    response.headers["Location"] = f"/datasets/{dataset.id}"
    return DatasetRead.model_validate(dataset)


@router.get("")
def list_datasets(
    session: SessionDep,
    principal: PrincipalDep,
    limit: Limit = 20,
    after: Annotated[str | None, Query(max_length=64)] = None,
) -> ListRead[DatasetRead]:
    """List your datasets, newest first."""
    statement = select(Dataset).where(
        Dataset.project_id == principal.project_id, Dataset.deleted_at.is_(None)
    )
    rows, has_more = newest_first(session, statement, Dataset.id, limit, after)
    return list_of([DatasetRead.model_validate(row) for row in rows], has_more)


@router.get("/{dataset_id}")
def get_dataset(dataset: DatasetSnapshotDep) -> DatasetRead:
    """Read one dataset."""
    return DatasetRead.model_validate(dataset)


def _file_chunks(stream: BinaryIO) -> Iterator[bytes]:
    with stream:
        while chunk := stream.read(BATCH_BYTES):
            yield chunk


def _content_disposition(filename: str) -> str:
    fallback = "".join(
        ch if ch.isascii() and ch.isprintable() and ch not in '"\\' else "_" for ch in filename
    )
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"


@router.get(
    "/{dataset_id}/content",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {media_type.split(";")[0]: {} for media_type in _MEDIA_TYPES.values()},
            "description": "The file as uploaded.",
        }
    },
)
def dataset_content(dataset: DatasetSnapshotDep) -> StreamingResponse:
    """Download the file as uploaded."""
    try:
        stream = storage.open_read(dataset_key(dataset.id))
    except FileNotFoundError:
        logger.error("dataset %s has a row but no file", dataset.id)
        raise not_found("dataset", dataset.id) from None
    # The size of the file we hold open, not a second lookup that a delete could race.
    size = stream.seek(0, io.SEEK_END)
    stream.seek(0)
    media_type = _MEDIA_TYPES.get(dataset.format, _MEDIA_TYPES["text"])
    headers: dict[str, Any] = {
        "Content-Length": str(size),
        "Content-Disposition": _content_disposition(dataset.filename),
        "ETag": f'"{dataset.sha256}"',
    }
    return StreamingResponse(_file_chunks(stream), media_type=media_type, headers=headers)


@router.delete("/{dataset_id}", status_code=204, responses={409: {"model": ErrorRead}})
def delete_dataset(dataset: DatasetDep, session: SessionDep) -> Response:
    """Delete a dataset and its file; 409 while a queued or running job uses it. Workers drop
    their tokenized copies of it at their next sweep."""
    user = session.execute(
        select(Job.id, Job.status)
        .where(or_(Job.dataset_id == dataset.id, Job.validation_dataset_id == dataset.id))
        .where(Job.status.in_(UNFINISHED))
        .limit(1)
    ).first()
    if user is not None:
        raise _in_use(dataset.id, user.id, user.status)
    # The row stays, marked deleted, because finished jobs and their model cards name it.
    dataset.deleted_at = utcnow()
    session.commit()
    # The row changes first: a failure between the two leaves an unreferenced file, never a
    # live row whose content is missing.
    storage.delete(dataset_key(dataset.id))
    return Response(status_code=204)


def _in_use(dataset_id: str, job_id: str, status: str) -> APIError:
    return APIError(
        409,
        "dataset_in_use",
        f"dataset {dataset_id} is used by {status} job {job_id}; cancel it or wait",
        param="id",
        details={"job_id": job_id, "status": status},
    )
