"""Process-wide memory settings of the API process."""

import ctypes

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_freed_buffers() -> bool:
    """Let glibc reuse freed blocks of up to a few MiB instead of handing them back.

    By default a block of 128 KiB or more is mmapped and unmapped on free, and free space at
    the top of the heap is trimmed past 128 KiB, so every 1 MiB buffer of an upload (a body
    batch, its file piece, its decoded text) is new memory that page-faults on each of its 4 KiB
    pages: most of the validator's and the file write's time on a GiB (BENCHMARKS.md section 4).
    Blocks under 4 MiB now come from the heap, and up to 16 MiB of free heap is kept per arena.
    A no-op where the C library has no `mallopt` (not glibc)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(
        mallopt(_M_MMAP_THRESHOLD, 4 * 1024 * 1024) and mallopt(_M_TRIM_THRESHOLD, 16 * 1024 * 1024)
    )
