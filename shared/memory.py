"""Process-wide settings of glibc's allocator, for processes that free and reuse big blocks."""

import ctypes

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MiB = 1024 * 1024


def keep_freed_memory(*, mmap_threshold: int, trim_threshold: int) -> bool:
    """Let glibc reuse freed blocks instead of handing them back to the kernel.

    By default a block of 128 KiB or more is mmapped and unmapped on free (the bound rises
    only with the largest block freed so far), and free space at the top of a heap is trimmed
    past twice that bound. A process that allocates and frees the same big buffers over and
    over then page-faults on every 4 KiB page of them each time. Blocks under `mmap_threshold`
    now come from the heap, and up to `trim_threshold` of free heap is kept per arena.
    A no-op where the C library has no `mallopt` (not glibc)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(
        mallopt(_M_MMAP_THRESHOLD, mmap_threshold) and mallopt(_M_TRIM_THRESHOLD, trim_threshold)
    )
