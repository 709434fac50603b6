"""The worker process: its Celery app, its tasks, and the sweeper beside them.

`tunery worker` (and `celery -A worker.app worker`) load this module in the main process.
"""

import gc
import logging
import threading

from celery.signals import (
    worker_process_init,
    worker_ready,
    worker_shutdown,
    worker_shutting_down,
)

from shared import workers
from shared.db import get_engine, session_scope
from shared.queue import celery_app
from worker import shutdown, tasks  # noqa: F401  (tasks registers jobs.train)
from worker.sweeper import start_in_background
from worker.trainer import keep_freed_training_memory

logger = logging.getLogger(__name__)
app = celery_app()
_sweeper_stop: threading.Event | None = None


@worker_ready.connect
def _start_sweeper(**_: object) -> None:
    global _sweeper_stop
    _sweeper_stop = start_in_background(workers.this_worker())


@worker_shutting_down.connect
def _hand_back_running_job(**_: object) -> None:
    # A warm shutdown waits for the running task; tell it to checkpoint and hand the job back
    # rather than train to the end (or be killed when the grace period runs out). Marked here
    # too, a pool process forked from now on (billiard replaces one that exits) claims nothing.
    # Once is enough: Ctrl-C reaches the worker twice under `tunery up` (the terminal's SIGINT,
    # then `tunery up`'s SIGTERM), and a second signal would kill the now idle pool process.
    if shutdown.requested():
        return
    shutdown.request()
    shutdown.forward_to_pool_children()


@worker_shutdown.connect
def _stop_sweeper(**_: object) -> None:
    if _sweeper_stop is not None:
        _sweeper_stop.set()
    try:  # one worker fewer for /readyz at once, not a heartbeat timeout later
        with session_scope() as session:
            workers.forget(session, workers.this_worker())
    except Exception:
        logger.warning("could not remove this worker from the workers table", exc_info=True)


@worker_process_init.connect
def _own_database_connections(**_: object) -> None:
    # A forked pool process must not share the parent's pooled sockets (the sweeper's, say).
    get_engine().dispose(close=False)


@worker_process_init.connect
def _keep_freed_training_memory(**_: object) -> None:
    keep_freed_training_memory()


@worker_process_init.connect
def _freeze_startup_objects(**_: object) -> None:
    # What the pool process inherited (torch, transformers, celery: about 500k objects) lives as
    # long as it does. Frozen, it is left out of every full collection, which transformers and
    # the pipeline start at each job (about 0.3 s each, walking all of it); the garbage of the
    # fork is collected first, so that none of it is frozen for good.
    gc.collect()
    gc.freeze()
