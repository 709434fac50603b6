"""What a worker's pool process does when it starts, before its first job."""

import json
import subprocess
import sys

from shared.memory import MiB
from tests.allocator import big_blocks
from tests.conftest import REPOSITORY

# Celery sends `worker_process_init` in each pool process it forks; here it is sent by hand in a
# process of its own, since freezing and allocator settings last for the life of the process.
POOL_PROCESS_START = """
from celery.signals import worker_process_init
import worker.app
worker_process_init.send(sender=None)
"""


def test_a_pool_process_freezes_what_it_inherited_out_of_the_collectors_reach() -> None:
    code = (
        "import gc, json, worker.app; inherited = len(gc.get_objects())\n"
        + POOL_PROCESS_START
        + "print(json.dumps([inherited, gc.get_freeze_count(), len(gc.get_objects())]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPOSITORY, capture_output=True, text=True, check=True
    )
    inherited, frozen, still_tracked = json.loads(result.stdout.strip().splitlines()[-1])

    assert inherited > 100_000  # torch, transformers, celery: what the collector would walk
    assert frozen >= 0.9 * inherited
    assert still_tracked < 0.01 * inherited


def test_a_pool_process_keeps_the_memory_a_training_step_frees_for_the_next() -> None:
    # Activations and gradients of a CPU step are blocks of up to tens of MiB, freed and
    # allocated again each step; glibc's defaults map most of them afresh every time.
    blocks = big_blocks(POOL_PROCESS_START, [24, 48])

    assert blocks[24]["mapped"] == 0
    assert blocks[24]["free_in_heap_after"] >= 24 * MiB
    assert blocks[48]["mapped"] >= 48 * MiB  # past the 32 MiB bound
