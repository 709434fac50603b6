"""shared/storage.py: the disk can be started on a long write before the fsync that ends it.

`open_write` calls it every 32 MiB; an upload through it is checked whole (bytes and SHA-256 of
what was stored) in tests/api/test_upload_memory.py.
"""

import os
import sys
from pathlib import Path

import pytest

from shared import storage

linux_only = pytest.mark.skipif(sys.platform != "linux", reason="sync_file_range(2) is Linux's")


@linux_only
def test_writeback_starts_on_a_file_and_keeps_its_bytes_as_written(tmp_path: Path) -> None:
    pieces = [os.urandom(1024 * 1024) for _ in range(3)]
    with open(tmp_path / "file", "wb") as stream:
        for piece in pieces:
            stream.write(piece)
            assert storage.start_writeback(stream)  # the kernel took the call: no EINVAL, EBADF
    assert (tmp_path / "file").read_bytes() == b"".join(pieces)


@linux_only
def test_writeback_of_a_pipe_is_refused_not_raised() -> None:
    read_end, write_end = os.pipe()
    with open(read_end, "rb"), open(write_end, "wb") as stream:
        stream.write(b"data")
        assert storage.start_writeback(stream) is False  # ESPIPE
