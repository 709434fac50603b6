"""Where files live: datasets, artifacts and checkpoints, under one storage root.

Keys are built here from ids the database made, never from request data, and every key is
checked to stay inside the root. Writes land in a temporary file that is renamed into place, so
a reader never sees half a file.
"""

import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from shared.settings import get_settings

_KEY_PATTERN = re.compile(r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_.-]+)*$")


def dataset_key(dataset_id: str) -> str:
    return f"datasets/{dataset_id}"


def artifact_key(job_id: str) -> str:
    return f"artifacts/{job_id}.tar.gz"


def checkpoints_key(job_id: str) -> str:
    return f"checkpoints/{job_id}"


def root() -> Path:
    return get_settings().storage_root


def path(key: str) -> Path:
    if not _KEY_PATTERN.match(key) or ".." in key.split("/"):
        raise ValueError(f"not a storage key: {key!r}")
    return root() / key


@contextmanager
def open_write(key: str) -> Iterator[BinaryIO]:
    """Write a file whole: it appears under `key` only if the block ends without an error."""
    final = path(key)
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = final.with_name(f".{final.name}.{uuid.uuid4().hex}.partial")
    try:
        with open(partial, "wb") as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(partial, final)
    finally:
        partial.unlink(missing_ok=True)


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
