"""What glibc's allocator does with one big block in a process: where it came from (the heap
or a mapping of its own) and how much free memory the heap holds once the block is freed."""

import json
import subprocess
import sys

from tests.conftest import REPOSITORY

# Printed as the process's last line: {"MiB": {"mapped": bytes, "free_in_heap_after": bytes}}.
PROBE = """
import ctypes, json

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd",
        "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]

def block(mib):
    before = libc.mallinfo2()
    pointer = libc.malloc(mib << 20)
    during = libc.mallinfo2()
    libc.free(pointer)
    after = libc.mallinfo2()
    return {"mapped": during.hblkhd - before.hblkhd, "free_in_heap_after": after.fordblks}

print(json.dumps({mib: block(mib) for mib in SIZES_MIB}))
"""


def big_blocks(setup: str, sizes_mib: list[int]) -> dict[int, dict[str, int]]:
    """Run `setup` in a fresh Python process, then allocate and free each block in turn."""
    code = setup + "\nSIZES_MIB = " + repr(sizes_mib) + "\n" + PROBE
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPOSITORY, capture_output=True, text=True, check=True
    )
    found = json.loads(result.stdout.strip().splitlines()[-1])
    return {int(mib): outcome for mib, outcome in found.items()}
