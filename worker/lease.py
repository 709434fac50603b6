"""This attempt's hold on a running job: heartbeats, the cancel flag, and guarded writes.

Every write the worker makes for a job goes through `Lease.write`, which first refreshes the
heartbeat with `... WHERE attempt = ours` in the same transaction. A worker whose job was
re-queued or claimed by someone else therefore writes nothing at all, and notices at once.
"""

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session

from shared import jobs
from shared.db import read_session, session_scope
from shared.models import Job
from shared.settings import get_settings
from worker.errors import JobCancelled, LeaseLost

logger = logging.getLogger(__name__)

Result = TypeVar("Result")
OUTAGE_ERRORS = (OperationalError, InterfaceError)


def retry_on_outage(fn: Callable[[], Result], what: str) -> Result:
    """Run `fn` (a whole transaction), again and again with backoff while the database is
    unreachable, for at most TUNERY_DATABASE_RETRY_S: a PostgreSQL restart must not fail a
    job that trained for hours. Each try is a new transaction, so a retry never half-applies.
    """
    deadline = time.monotonic() + get_settings().database_retry_s
    delay = 0.5
    while True:
        try:
            return fn()
        except OUTAGE_ERRORS:
            if time.monotonic() + delay > deadline:
                raise
            logger.warning("database unreachable while %s; retrying in %.1f s", what, delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


class Lease:
    """Throttled heartbeats and cancel polls for one job attempt.

    `heartbeat_interval_s` keeps the row fresh well inside the sweeper's timeout;
    `poll_interval_s` bounds how often a busy training loop reads `cancel_requested`. It is 0:
    a cancel stops training within one optimizer step, as the API promises, for one indexed
    read per step (a fraction of a millisecond, against steps of tens of milliseconds on a GPU).
    """

    poll_interval_s: float = 0.0

    @property
    def heartbeat_interval_s(self) -> float:
        # The training loop beats at the first step end after the interval, so the row ages by
        # up to the interval plus one step: a fifth of the timeout leaves the step the rest,
        # also when an operator (or a test) shortens the timeout.
        return min(2.0, get_settings().heartbeat_timeout_s / 5)

    def __init__(self, job_id: str, attempt: int) -> None:
        self.job_id = job_id
        self.attempt = attempt
        self.lost = False
        self.cancel_requested = False
        self._last_beat = float("-inf")
        self._last_poll = float("-inf")
        # The keep-alive thread and the main thread may both beat.
        self._lock = threading.Lock()

    def write(
        self,
        fn: Callable[[Session], None] | None = None,
        values: dict[str, Any] | None = None,
        *,
        skip_on_outage: bool = False,
        poll: bool = False,
    ) -> bool:
        """Refresh the heartbeat (setting `values` on the job) and run `fn` in the same
        transaction; nothing is written and False is returned once the lease is lost.

        The heartbeat's statement reads the cancel flag, so every write notices a cancel; with
        `poll`, the write also stands in for this interval's `poll`.

        With `skip_on_outage`, a database that cannot be reached skips this write instead of
        failing hours of training: if the outage lasts, the sweeper re-queues the job and the
        next write finds the lease lost. Without it, the write is retried through the outage.
        """
        if self.lost:
            return False

        def transaction() -> bool | None:
            with session_scope() as session:
                cancel_requested = jobs.heartbeat(session, self.job_id, self.attempt, values)
                if cancel_requested is not None and fn is not None:
                    fn(session)
            return cancel_requested

        try:
            if skip_on_outage:
                cancel_requested = transaction()
            else:
                cancel_requested = retry_on_outage(transaction, f"writing for job {self.job_id}")
            if cancel_requested is None:
                self.lost = True
                return False
            self.cancel_requested = self.cancel_requested or cancel_requested
            if poll:
                self._last_poll = time.monotonic()
        except OUTAGE_ERRORS:
            if not skip_on_outage:
                raise
            logger.warning("job %s: database unreachable, write skipped", self.job_id)
            with self._lock:  # retry at the heartbeat pace, not at every step
                self._last_beat = time.monotonic()
            return True
        with self._lock:
            self._last_beat = time.monotonic()
        return True

    def beat(self, progress: dict[str, Any] | None = None, *, force: bool = False) -> bool:
        """Heartbeat (with progress) unless one went out less than an interval ago."""
        with self._lock:
            if not force and time.monotonic() - self._last_beat < self.heartbeat_interval_s:
                return not self.lost
        values = {"progress": progress} if progress is not None else None
        return self.write(values=values, skip_on_outage=True)

    def keep_going(self) -> None:
        """Heartbeat (throttled) and raise if a beat read a cancel or found the claim lost: the
        progress callback of a long loop (tokenizing, generating samples) that may stop
        between its items."""
        self.beat()
        self.raise_if_stopped()

    def poll(self, *, force: bool = False) -> None:
        """Read the cancel flag and ownership, at most once per poll interval."""
        now = time.monotonic()
        if self.lost or (not force and now - self._last_poll < self.poll_interval_s):
            return
        self._last_poll = now
        try:
            with read_session() as session:  # one round trip: no BEGIN, no COMMIT
                row = session.execute(
                    select(Job.status, Job.attempt, Job.cancel_requested).where(
                        Job.id == self.job_id
                    )
                ).one_or_none()
        except OUTAGE_ERRORS:  # as in `write`: an outage is not a reason to stop training
            logger.warning("job %s: database unreachable, cancel poll skipped", self.job_id)
            return
        if row is None or row.status != jobs.RUNNING or row.attempt != self.attempt:
            self.lost = True
        elif row.cancel_requested:
            self.cancel_requested = True

    @property
    def should_stop(self) -> bool:
        return self.lost or self.cancel_requested

    def check(self) -> None:
        """Between stages: raise if the job was lost or cancelled meanwhile."""
        self.poll(force=True)
        self.raise_if_stopped()

    def raise_if_stopped(self) -> None:
        if self.lost:
            raise LeaseLost(f"job {self.job_id} attempt {self.attempt} lost its claim")
        if self.cancel_requested:
            raise JobCancelled(self.job_id)

    def event(
        self,
        message: str,
        *,
        data: dict[str, Any] | None = None,
        type: str = "message",
        level: str = "info",
        values: dict[str, Any] | None = None,
    ) -> None:
        """Write an event (and job `values`) while we own the job; raise LeaseLost if not."""
        logger.info("job %s: %s", self.job_id, message)

        def add(session: Session) -> None:
            jobs.add_event(session, self.job_id, message, type=type, level=level, data=data)

        if not self.write(add, values=values):
            raise LeaseLost(f"job {self.job_id} attempt {self.attempt} lost its claim")

    @contextmanager
    def keep_alive(self) -> Iterator[None]:
        """Heartbeat from a thread during one long blocking call (a model download, saving,
        packaging) that cannot beat by itself, and raise at its end if a beat read a cancel or
        found the claim lost; a call that can stop early checks `raise_if_stopped` itself.
        Training never runs under it: there the callback beats, so a hung training loop goes
        stale and gets re-queued."""
        stop = threading.Event()

        def run() -> None:
            while not stop.wait(self.heartbeat_interval_s):
                try:
                    if not self.beat():
                        return
                except Exception:  # the thread must outlive any error, and say so
                    logger.exception("job %s: heartbeat failed", self.job_id)

        thread = threading.Thread(target=run, name=f"heartbeat-{self.job_id}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
        self.raise_if_stopped()
