"""Where files live: datasets, artifacts and checkpoints, under one storage root.

Keys are built here from ids the database made, never from request data, and every key is
checked to stay inside the root. Writes land in a temporary file that is renamed into place, so
a reader never sees half a file.
"""

import ctypes
import io
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import BinaryIO

from shared.settings import get_settings

_KEY_PATTERN = re.compile(r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_.-]+)*$")
_CHECKPOINT_NAME = re.compile(r"^step-(\d{9})$")
_PARTIAL_SUFFIX = ".partial"
_STALE_SUFFIX = ".stale"
_DATASETS, _ARTIFACTS, _CHECKPOINTS = "datasets", "artifacts", "checkpoints"
_ARTIFACT_SUFFIX = ".tar.gz"
# sync_file_range(2): start writing the range's dirty pages, do not wait for them (linux/fs.h).
_SYNC_FILE_RANGE_WRITE = 2
# Bytes written between two `start_writeback` calls of `open_write`: the disk works on a long
# file while it is written instead of in the fsync at its end (a third of a second per GiB).
WRITEBACK_BYTES = 32 * 1024 * 1024


def dataset_key(dataset_id: str) -> str:
    return f"{_DATASETS}/{dataset_id}"


def artifact_key(job_id: str) -> str:
    return f"{_ARTIFACTS}/{job_id}{_ARTIFACT_SUFFIX}"


def checkpoints_key(job_id: str) -> str:
    return f"{_CHECKPOINTS}/{job_id}"


def checkpoint_key(job_id: str, step: int) -> str:
    # Zero-padded so that names sort like steps.
    return f"{checkpoints_key(job_id)}/step-{step:09d}"


def checkpoint_step(name: str) -> int | None:
    """The step of a checkpoint folder's name, or None for anything else (temporary folders)."""
    match = _CHECKPOINT_NAME.match(name)
    return int(match.group(1)) if match else None


def root() -> Path:
    return get_settings().storage_root


def path(key: str) -> Path:
    if not _KEY_PATTERN.match(key) or ".." in key.split("/"):
        raise ValueError(f"not a storage key: {key!r}")
    return root() / key


@contextmanager
def open_write(key: str) -> Iterator[BinaryIO]:
    """Write a file whole: it appears under `key` only if the block ends without an error, and
    once the block has ended it is on disk, name included: a row committed after it never
    points to a file that a crash took back."""
    final = path(key)
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = final.with_name(f".{final.name}.{uuid.uuid4().hex}{_PARTIAL_SUFFIX}")
    try:
        with _WritebackFile(io.FileIO(partial, "wb")) as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(partial, final)
        fsync_path(final.parent)
    finally:
        partial.unlink(missing_ok=True)


class _WritebackFile(io.BufferedWriter):
    """A file written through `open_write`: every `WRITEBACK_BYTES`, the disk starts on it."""

    def __init__(self, raw: io.FileIO) -> None:
        super().__init__(raw)
        self._bytes_since_writeback = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        written = super().write(data)
        self._bytes_since_writeback += written
        if self._bytes_since_writeback >= WRITEBACK_BYTES:
            self._bytes_since_writeback = 0
            start_writeback(self)
        return written


@cache
def _sync_file_range() -> Callable[..., int] | None:
    try:
        function = ctypes.CDLL(None).sync_file_range
    except (AttributeError, OSError):  # not Linux
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return function


def start_writeback(stream: BinaryIO) -> bool:
    """Have the disk start on what is written to `stream` so far, without waiting for it.

    `open_write` calls it every `WRITEBACK_BYTES`: the disk stays busy while the data still
    arrives, so the fsync at the end has little left to flush. Only a hint: False where it
    could not be given (not Linux, not a file); the fsync still writes and checks all.
    """
    sync_file_range = _sync_file_range()
    if sync_file_range is None:
        return False
    stream.flush()
    # Offset 0 and length 0: the whole file; pages already written are skipped.
    return sync_file_range(stream.fileno(), 0, 0, _SYNC_FILE_RANGE_WRITE) == 0


def fsync_path(path: Path) -> None:
    """Flush a file, or a folder's entries, to disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextmanager
def open_dir_write(key: str) -> Iterator[Path]:
    """Write a folder whole: fill the yielded temporary folder (a hidden sibling of `key`, on the
    same filesystem); it is renamed to `key` only if the block ends without an error.

    Files written into it must be flushed and fsynced by the writer; the folder entries are
    synced here before and after the rename, so a crash leaves either the old state or the whole
    new folder, never a folder under `key` with missing pieces. A folder already at `key` is
    replaced.
    """
    final = path(key)
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = final.with_name(f".{final.name}.{uuid.uuid4().hex}{_PARTIAL_SUFFIX}")
    partial.mkdir()
    try:
        yield partial
        fsync_path(partial)
        if final.exists():
            # os.replace cannot replace a non-empty folder: move the old one aside first.
            stale = final.with_name(f".{final.name}.{uuid.uuid4().hex}{_STALE_SUFFIX}")
            os.replace(final, stale)
            shutil.rmtree(stale, ignore_errors=True)
        os.replace(partial, final)
        fsync_path(final.parent)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def list_dir(key: str) -> list[str]:
    """Names of the entries in the folder at `key` (none if it does not exist)."""
    try:
        return sorted(entry.name for entry in os.scandir(path(key)))
    except FileNotFoundError:
        return []


def _is_temporary(name: str) -> bool:
    return name.startswith(".") and name.endswith((_PARTIAL_SUFFIX, _STALE_SUFFIX))


def delete_partials(key: str) -> None:
    """Remove temporary folders that writers under `key` left behind when they died."""
    for name in list_dir(key):
        if _is_temporary(name):
            shutil.rmtree(path(key) / name, ignore_errors=True)


def temporary_files(older_than_s: float) -> list[str]:
    """Keys of the temporary files of dataset and tarball writes not written to for
    `older_than_s`: a live writer writes continuously, so these writers died."""
    now = time.time()
    keys = []
    for folder in (_DATASETS, _ARTIFACTS):
        for name in filter(_is_temporary, list_dir(folder)):
            try:
                if now - (path(folder) / name).stat().st_mtime > older_than_s:
                    keys.append(f"{folder}/{name}")
            except FileNotFoundError:
                continue  # its writer finished or removed it meanwhile
    return keys


def stored_dataset_ids() -> list[str]:
    return [name for name in list_dir(_DATASETS) if not _is_temporary(name)]


def jobs_with_an_artifact() -> list[str]:
    names = list_dir(_ARTIFACTS)
    suffix = len(_ARTIFACT_SUFFIX)
    return [n[:-suffix] for n in names if n.endswith(_ARTIFACT_SUFFIX) and not _is_temporary(n)]


def jobs_with_checkpoints() -> list[str]:
    return list_dir(_CHECKPOINTS)


def open_read(key: str) -> BinaryIO:
    return open(path(key), "rb")


def size(key: str) -> int:
    return path(key).stat().st_size


def exists(key: str) -> bool:
    return path(key).exists()


def delete(key: str) -> None:
    target = path(key)
    if target.is_dir():
        shutil.rmtree(target, ignore_errors=True)
    else:
        target.unlink(missing_ok=True)
