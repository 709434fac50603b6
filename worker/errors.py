"""Why a job stopped, turned into the `{code, message, user_error}` the job object shows.

`user_error` says whether the caller can fix it by changing the request (data, hyperparameters,
base model); everything else is ours. Messages are one line and never carry a traceback: the
traceback goes to the worker log.
"""

import errno
import os
import shutil
from pathlib import Path
from typing import Any

import torch

_MAX_MESSAGE = 500
# A write fails once less than a block is left; a megabyte allows for filesystems that count
# space in larger units, and is still far less than any checkpoint.
_FULL_BELOW_BYTES = 1 << 20


class JobFailure(Exception):
    """A failure we recognised, with the code and message the caller will read."""

    def __init__(self, code: str, message: str, *, user_error: bool) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.user_error = user_error


class JobCancelled(Exception):
    """The caller asked to cancel; the pipeline unwinds and marks the job cancelled."""


class LeaseLost(Exception):
    """This attempt no longer owns the job (re-queued, or claimed by another worker): stop and
    write nothing more, the owner's writes are the truth now."""


class HandBack(Exception):
    """The worker is shutting down: the job goes back to the queue and resumes elsewhere."""


def _first_line(text: str) -> str:
    line = next((part.strip() for part in text.splitlines() if part.strip()), "")
    return line if len(line) <= _MAX_MESSAGE else line[: _MAX_MESSAGE - 3] + "..."


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError | torch.cuda.OutOfMemoryError):
        return True
    # Some backends (MPS, older CUDA paths, the CPU allocator) raise a plain RuntimeError.
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def is_disk_full(exc: BaseException) -> bool:
    # torch.save and safetensors wrap the OSError in a RuntimeError; look down the chain.
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def name_a_full_disk(error: Exception, folder: Path) -> Exception:
    """torch.save (Trainer's optimizer, scheduler and RNG files) reports a short write without
    its errno: "unexpected pos 576 vs 534". While the partial files in `folder` still fill the
    disk, name the cause the error lost, so that it reads as disk full."""
    if isinstance(error, RuntimeError) and shutil.disk_usage(folder).free < _FULL_BELOW_BYTES:
        named = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder))
        named.__cause__ = error
        return named
    return error


def classify(exc: BaseException) -> dict[str, Any]:
    """The job's `error` for an exception that ended the pipeline."""
    if isinstance(exc, JobFailure):
        return {"code": exc.code, "message": _first_line(exc.message), "user_error": exc.user_error}
    if is_disk_full(exc):
        # Ours, not the caller's: the worker's disk or the storage volume needs room.
        return {
            "code": "disk_full",
            "message": "no space left on the device while writing the job's files "
            "(a checkpoint or the model); the operator must free space or grow the volume",
            "user_error": False,
        }
    if _is_out_of_memory(exc):
        # The caller can fix this one: smaller batches or blocks need less memory.
        return {
            "code": "out_of_memory",
            "message": "training ran out of memory; lower batch_size or block_size "
            "(raise gradient_accumulation_steps to keep the effective batch)",
            "user_error": True,
        }
    detail = _first_line(str(exc))
    summary = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
    return {
        "code": "internal_error",
        "message": _first_line(f"internal error ({summary}); see the worker log"),
        "user_error": False,
    }
