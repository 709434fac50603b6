"""What a worker's pool process does when it starts, before its first job."""

import json
import subprocess
import sys

from tests.conftest import REPOSITORY


def test_a_pool_process_freezes_what_it_inherited_out_of_the_collectors_reach() -> None:
    # In a process of its own: freezing is for the life of the process.
    code = (
        "import gc, json, worker.app as app; inherited = len(gc.get_objects()); "
        "app._freeze_startup_objects(); "
        "print(json.dumps([inherited, gc.get_freeze_count(), len(gc.get_objects())]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPOSITORY, capture_output=True, text=True, check=True
    )
    inherited, frozen, still_tracked = json.loads(result.stdout.strip().splitlines()[-1])

    assert inherited > 100_000  # torch, transformers, celery: what the collector would walk
    assert frozen >= 0.9 * inherited
    assert still_tracked < 0.01 * inherited
