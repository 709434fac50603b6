"""A worker asked to stop hands its job back instead of losing it.

SIGTERM reaches the training process in two ways: directly (a signal to the whole process group,
as `kill -TERM -PGID` and a terminal's Ctrl-C do) or through the Celery main process, which on a
warm shutdown only waits for the running task (Docker's `stop` signals PID 1 alone); so the main
process forwards it to its pool children. In the child the signal only sets a flag: the training
loop reads it at the next step boundary, writes a checkpoint and re-queues the job.
"""

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

logger = logging.getLogger(__name__)

_requested = threading.Event()


def requested() -> bool:
    return _requested.is_set()


def request() -> None:
    """What SIGTERM does; also for code that stops the worker itself."""
    _requested.set()


def clear() -> None:
    _requested.clear()


def _on_sigterm(_signum: int, _frame: FrameType | None) -> None:
    # Nothing but the flag: a signal handler interrupts arbitrary code, even a database write.
    _requested.set()


@contextmanager
def hand_back_on_sigterm() -> Iterator[None]:
    """Around one training task: SIGTERM asks the job to stop at a step boundary. The request
    outlives the task: a process asked to stop claims no other job.

    Installed per task, not at process start: billiard resets a pool child's signal handlers
    after Celery's init hooks, and an idle child should still just exit on SIGTERM.
    """
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def forward_to_pool_children() -> None:
    """In the Celery main process, on warm shutdown: pass the stop on to the training child.

    Only while a task is on its way or running (one pool process, one task at a time): an idle
    child would die of the signal, and billiard would start another in the middle of the
    shutdown; Celery stops an idle pool by itself."""
    from billiard.process import active_children
    from celery.worker import state

    if not state.reserved_requests:
        return
    for child in active_children():
        if child.pid is not None:
            logger.info("asking pool process %s to hand its job back", child.pid)
            with contextlib.suppress(ProcessLookupError):  # it has just exited
                os.kill(child.pid, signal.SIGTERM)
