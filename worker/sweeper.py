"""The sweeper: the database is the truth, so it repairs what the queue and dead workers lose,
clears from this worker's token cache what deleted datasets left behind, removes the work
folders of attempts that no longer run, and, once an hour, removes the files in storage and in
the Hub cache that dead processes left. Each round is also the worker's heartbeat
(`shared.workers`), which tells the API whether any worker is alive.

It runs in every `tunery worker` (and so in `tunery up`). Several sweepers at once are fine:
each action is a conditional update that only one of them wins, or a deletion that may be
done twice.
"""

import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import func, select, update

from shared import jobs, workers
from shared.db import read_session, session_scope
from shared.models import Dataset, Job, utcnow
from shared.queue import send_train
from shared.settings import get_settings
from worker import hub, leftovers, token_cache, work_folders

logger = logging.getLogger(__name__)

# Listing storage costs a scan of its folders; leftovers may wait an hour.
_LEFTOVERS_INTERVAL_S = 3600.0


@dataclass
class SweepReport:
    resent: list[str] = field(default_factory=list)
    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    uncached: list[str] = field(default_factory=list)  # token cache entries removed
    work_folders: list[str] = field(default_factory=list)  # of attempts that no longer run
    removed: list[str] = field(default_factory=list)  # storage keys of leftovers
    abandoned_downloads: list[str] = field(default_factory=list)  # in the Hub cache


def _resend_unclaimed(report: SweepReport) -> None:
    """Ring again for jobs queued longer than the setting: their message may have been lost."""
    settings = get_settings()
    now = utcnow()
    cutoff = now - timedelta(seconds=settings.requeue_unclaimed_after_s)
    with session_scope() as session:
        waiting = session.scalars(
            select(Job.id).where(
                Job.status == jobs.QUEUED, func.coalesce(Job.enqueued_at, Job.created_at) < cutoff
            )
        ).all()
        for job_id in waiting:
            touched = session.execute(
                update(Job)
                .where(Job.id == job_id, Job.status == jobs.QUEUED)
                .values(enqueued_at=now)
                .execution_options(synchronize_session=False)
            )
            if touched.rowcount == 1:
                jobs.add_event(
                    session,
                    job_id,
                    f"no worker claimed the job for {settings.requeue_unclaimed_after_s:g} s; "
                    "its message was sent again",
                    level="warning",
                )
                report.resent.append(job_id)
    for job_id in report.resent:  # after the commit, as everywhere
        send_train(job_id)


def _recover_stale(report: SweepReport) -> None:
    """Re-queue running jobs whose worker went silent, fail them after the last attempt, or
    end them cancelled if that was asked for."""
    settings = get_settings()
    timeout = settings.heartbeat_timeout_s
    cutoff = utcnow() - timedelta(seconds=timeout)
    with session_scope() as session:
        # A job claimed but never heartbeated counts from its start.
        stale = session.execute(
            select(Job.id, Job.attempt, Job.lost_attempts, Job.cancel_requested).where(
                Job.status == jobs.RUNNING, func.coalesce(Job.heartbeat_at, Job.started_at) < cutoff
            )
        ).all()
    for job_id, attempt, lost_before, cancel_requested in stale:
        lost = lost_before + 1  # this attempt too
        with session_scope() as session:
            if cancel_requested:
                if jobs.mark_cancelled(session, job_id, attempt):
                    report.cancelled.append(job_id)
            elif lost >= settings.max_attempts:
                error = {
                    "code": "worker_lost",
                    "message": f"the worker stopped answering; {lost} of "
                    f"{settings.max_attempts} attempts were lost",
                    "user_error": False,
                }
                if jobs.mark_failed(session, job_id, error, attempt=attempt):
                    report.failed.append(job_id)
            elif jobs.requeue(
                session,
                job_id,
                attempt,
                f"no heartbeat from its worker for {timeout:g} s ({lost} of "
                f"{settings.max_attempts} attempts lost)",
                lost=True,
            ):
                report.requeued.append(job_id)
    for job_id in report.failed + report.cancelled:  # after the commit: nothing resumes them
        leftovers.remove_unsucceeded(job_id)
    for job_id in report.requeued:
        send_train(job_id)


def _live_datasets(sha256s: set[str]) -> set[str]:
    with read_session() as session:
        return set(
            session.scalars(
                select(Dataset.sha256).where(
                    Dataset.sha256.in_(sha256s), Dataset.deleted_at.is_(None)
                )
            )
        )


def _trim_token_cache(report: SweepReport) -> None:
    """A deleted dataset's tokens decode back to its text: they go with it."""
    report.uncached = token_cache.trim(_live_datasets, get_settings().token_cache_max_bytes)


def sweep(*, storage_leftovers: bool = False) -> SweepReport:
    report = SweepReport()
    _resend_unclaimed(report)
    _recover_stale(report)
    _trim_token_cache(report)
    report.work_folders = work_folders.remove_abandoned()
    if storage_leftovers:
        report.removed = leftovers.remove()
        report.abandoned_downloads = hub.remove_abandoned_downloads()
    if any(vars(report).values()):
        logger.info("sweep: %s", report)
    return report


def _beat(worker: str) -> None:
    try:
        with session_scope() as session:
            workers.beat(session, worker)
            workers.remove_long_gone(session)
    except Exception:
        logger.warning("could not record this worker's heartbeat", exc_info=True)


def run_forever(stop: threading.Event, worker: str) -> None:
    interval = get_settings().sweep_interval_s
    leftovers_due = time.monotonic()  # at the first round too: a worker restarts after a crash
    _beat(worker)
    while not stop.wait(interval):
        _beat(worker)
        try:
            storage_leftovers = time.monotonic() >= leftovers_due
            sweep(storage_leftovers=storage_leftovers)
            if storage_leftovers:
                leftovers_due = time.monotonic() + _LEFTOVERS_INTERVAL_S
        except Exception:
            # A database or broker outage must not kill the sweeper; the next round retries.
            logger.warning("sweep failed; retrying in %g s", interval, exc_info=True)


def start_in_background(worker: str) -> threading.Event:
    stop = threading.Event()
    threading.Thread(
        target=run_forever, args=(stop, worker), name="tunery-sweeper", daemon=True
    ).start()
    return stop
