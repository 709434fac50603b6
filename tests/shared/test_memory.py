"""shared/memory.py: glibc keeps freed blocks under the bounds it is given."""

from shared.memory import MiB
from tests.allocator import big_blocks


def test_by_default_a_big_block_is_a_mapping_of_its_own_handed_back_on_free() -> None:
    blocks = big_blocks("", [4])

    assert blocks[4]["mapped"] >= 4 * MiB
    assert blocks[4]["free_in_heap_after"] < MiB


def test_blocks_under_the_bound_come_from_the_heap_which_keeps_them_once_freed() -> None:
    setup = (
        "from shared.memory import MiB, keep_freed_memory\n"
        "assert keep_freed_memory(mmap_threshold=8 * MiB, trim_threshold=16 * MiB)"
    )
    blocks = big_blocks(setup, [4, 12])

    assert blocks[4]["mapped"] == 0
    assert blocks[4]["free_in_heap_after"] >= 4 * MiB
    assert blocks[12]["mapped"] >= 12 * MiB  # over the bound: mapped and handed back as before
    assert blocks[12]["free_in_heap_after"] < 12 * MiB
