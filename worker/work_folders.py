"""Each attempt trains in a folder of its own under `TUNERY_HOME/work`, rather than /tmp: a
model's files can be larger than a tmpfs. A worker killed mid-job leaves its folder behind (the
model, the tokenized data, checkpoints on their way to storage: tens of GB for a large model);
the sweeper removes every folder whose attempt no longer runs and whose process is gone.

The process that trains in a folder holds a lock on a file in it for as long as it lives: the
kernel drops the lock when the process dies, however it dies. A process that lost its job but
lives on (paused past its lease, then continued) keeps its folder until it notices and leaves.
"""

import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import select

from shared import jobs
from shared.db import read_session
from shared.models import Job
from shared.settings import get_settings

_LOCK = ".in-use"


def _parent() -> Path:
    return get_settings().home.resolve() / "work"


@contextmanager
def for_attempt(job_id: str, attempt: int) -> Iterator[Path]:
    """A new folder named after the job and the attempt, removed when the block ends."""
    parent = _parent()
    parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(
        prefix=f"{job_id}-{attempt}-", dir=parent, ignore_cleanup_errors=True
    ) as folder:
        lock = os.open(Path(folder) / _LOCK, os.O_CREAT | os.O_WRONLY, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield Path(folder)
        finally:
            os.close(lock)


def _in_use(folder: Path) -> bool:
    """Whether a live process holds the folder's lock."""
    try:
        lock = os.open(folder / _LOCK, os.O_WRONLY)
    except OSError:  # no lock file: a folder made before there was one, or being removed
        return False
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(lock)
    return False


def _owner(name: str) -> tuple[str, int | None] | None:
    """(job id, attempt) of a folder `for_attempt` made; the attempt is None in folders made
    before it was part of the name. None for anything else, which is left alone."""
    job_id, _, rest = name.partition("-")
    if not job_id.startswith("job_") or not rest:
        return None
    attempt, _, suffix = rest.partition("-")
    return (job_id, int(attempt)) if attempt.isdigit() and suffix else (job_id, None)


def remove_abandoned() -> list[str]:
    """Remove the folders of attempts that are not running; returns their names."""
    parent = _parent()
    if not parent.is_dir():
        return []
    owners = {f.name: owner for f in parent.iterdir() if (owner := _owner(f.name))}
    if not owners:
        return []
    with read_session() as session:
        rows = session.execute(
            select(Job.id, Job.attempt).where(
                Job.id.in_({job_id for job_id, _ in owners.values()}), Job.status == jobs.RUNNING
            )
        )
        running = {job_id: attempt for job_id, attempt in rows}
    removed = []
    for name, (job_id, attempt) in owners.items():
        if job_id in running and attempt in (None, running[job_id]) or _in_use(parent / name):
            continue
        shutil.rmtree(parent / name, ignore_errors=True)
        removed.append(name)
    return removed
