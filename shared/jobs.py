"""Job states and the only code that changes `Job.status`.

Every change is a conditional UPDATE on the current status, so two processes racing on one job
(a duplicate message, a cancel during a claim) cannot both win, and every change writes a
`status` event in the same transaction.
"""

from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from shared.models import Job, JobEvent, utcnow

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = (
    "queued",
    "running",
    "succeeded",
    "failed",
    "cancelled",
)
STATUSES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
FINISHED = frozenset({SUCCEEDED, FAILED, CANCELLED})
UNFINISHED = frozenset({QUEUED, RUNNING})

ALLOWED_TRANSITIONS: dict[str, frozenset[str]] = {
    QUEUED: frozenset({RUNNING, CANCELLED, FAILED}),
    # running -> queued: a worker handed the job back or was lost, and another resumes it.
    RUNNING: frozenset({QUEUED, SUCCEEDED, FAILED, CANCELLED}),
    SUCCEEDED: frozenset(),
    FAILED: frozenset(),
    CANCELLED: frozenset(),
}


class InvalidTransition(ValueError):
    pass


class JobFinished(Exception):
    def __init__(self, status: str) -> None:
        super().__init__(f"the job has already {status}")
        self.status = status


def add_event(
    session: Session,
    job_id: str,
    message: str,
    *,
    type: str = "message",
    level: str = "info",
    data: dict[str, Any] | None = None,
) -> JobEvent:
    event = JobEvent(job_id=job_id, type=type, level=level, message=message, data=data or {})
    session.add(event)
    return event


def _transition(
    session: Session,
    job_id: str,
    source: str,
    target: str,
    message: str,
    *,
    level: str = "info",
    attempt: int | None = None,
    cancel_requested: bool | None = None,
    values: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
) -> bool:
    """Move `job_id` from `source` to `target` if it is still in `source` (and, when given, still
    in `attempt`, so a worker that lost its claim cannot finish someone else's run, and its cancel
    flag still reads `cancel_requested`, which is only ever set, never cleared)."""
    if target not in ALLOWED_TRANSITIONS[source]:
        raise InvalidTransition(f"a job cannot go from {source} to {target}")
    statement = update(Job).where(Job.id == job_id, Job.status == source)
    if attempt is not None:
        statement = statement.where(Job.attempt == attempt)
    if cancel_requested is not None:
        statement = statement.where(Job.cancel_requested.is_(cancel_requested))
    result = session.execute(
        statement.values(status=target, **(values or {})).execution_options(
            synchronize_session=False
        )
    )
    if result.rowcount != 1:
        return False
    add_event(
        session,
        job_id,
        message,
        type="status",
        level=level,
        data={"from": source, "status": target, **(data or {})},
    )
    return True


def claim(session: Session, job_id: str) -> int | None:
    """Take a queued job for this worker; returns the new attempt number, or None if another
    worker has it or it is no longer queued."""
    now = utcnow()
    claimed = _transition(
        session,
        job_id,
        QUEUED,
        RUNNING,
        "job claimed by a worker",
        values={"attempt": Job.attempt + 1, "started_at": now, "heartbeat_at": now},
    )
    if not claimed:
        return None
    return session.scalar(select(Job.attempt).where(Job.id == job_id))


def cancel(session: Session, job_id: str) -> None:
    """Cancel a queued job at once, or ask the worker of a running one to stop.

    Raises JobFinished for a job that has already ended.
    """
    while True:  # the job may move between our read and our conditional write; look again
        status = session.scalar(select(Job.status).where(Job.id == job_id))
        if status is None or status in FINISHED:
            raise JobFinished(status or "gone")
        if status == QUEUED and _transition(
            session,
            job_id,
            QUEUED,
            CANCELLED,
            "job cancelled before it started",
            values={"finished_at": utcnow(), "cancel_requested": True},
        ):
            return
        if status == RUNNING:
            result = session.execute(
                update(Job)
                .where(Job.id == job_id, Job.status == RUNNING)
                .values(cancel_requested=True)
                .execution_options(synchronize_session=False)
            )
            if result.rowcount == 1:
                add_event(session, job_id, "cancellation requested; the worker will stop")
                return


def mark_succeeded(
    session: Session, job_id: str, attempt: int, values: dict[str, Any] | None = None
) -> bool:
    """Refused once a cancel was requested, however late: a caller who asked for the job to
    stop finds it cancelled, never succeeded with `cancel_requested` set."""
    return _transition(
        session,
        job_id,
        RUNNING,
        SUCCEEDED,
        "job succeeded",
        attempt=attempt,
        cancel_requested=False,
        values={"finished_at": utcnow(), **(values or {})},
    )


def mark_failed(
    session: Session,
    job_id: str,
    error: dict[str, Any],
    *,
    attempt: int | None = None,
    source: str = RUNNING,
) -> bool:
    return _transition(
        session,
        job_id,
        source,
        FAILED,
        f"job failed: {error['message']}",
        level="error",
        attempt=attempt,
        values={"finished_at": utcnow(), "error": error},
        data={"error": error},
    )


def mark_cancelled(session: Session, job_id: str, attempt: int) -> bool:
    """Only once a cancel was requested: a running job ends cancelled because someone asked."""
    return _transition(
        session,
        job_id,
        RUNNING,
        CANCELLED,
        "job cancelled while running",
        attempt=attempt,
        cancel_requested=True,
        values={"finished_at": utcnow()},
    )


def requeue(
    session: Session, job_id: str, attempt: int, reason: str, *, lost: bool = False
) -> bool:
    """Hand a running job back to the queue so that another attempt resumes it; refused once a
    cancel was requested (the job is to end cancelled, not run again). A `lost` attempt (its
    worker stopped answering) counts against `max_attempts`; a handed-back one does not."""
    values: dict[str, Any] = {"heartbeat_at": None, "enqueued_at": utcnow()}
    if lost:
        values["lost_attempts"] = Job.lost_attempts + 1
    return _transition(
        session,
        job_id,
        RUNNING,
        QUEUED,
        f"job re-queued: {reason}",
        level="warning",
        attempt=attempt,
        cancel_requested=False,
        values=values,
    )


def hand_back(session: Session, job_id: str, attempt: int, reason: str) -> str | None:
    """A stopping worker's last word on its job: re-queued to resume elsewhere, or cancelled if
    a cancel came in after the worker last looked. The status it moved to, or None when this
    attempt no longer owns the job."""
    if requeue(session, job_id, attempt, reason):
        return QUEUED
    if mark_cancelled(session, job_id, attempt):
        return CANCELLED
    return None


def still_owned(session: Session, job_id: str, attempt: int) -> bool:
    """Whether this attempt still holds the job (a lost lease means stop writing)."""
    owner = session.execute(select(Job.status, Job.attempt).where(Job.id == job_id)).one_or_none()
    return owner is not None and owner.status == RUNNING and owner.attempt == attempt


def heartbeat(
    session: Session, job_id: str, attempt: int, values: dict[str, Any] | None = None
) -> bool | None:
    """Refresh the lease (and progress). Returns the job's cancel flag, read by the same
    statement, or None if this attempt no longer owns the job."""
    now: datetime = utcnow()
    return session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == RUNNING, Job.attempt == attempt)
        .values(heartbeat_at=now, **(values or {}))
        .returning(Job.cancel_requested)
        .execution_options(synchronize_session=False)
    ).scalar_one_or_none()


def add_queued(session: Session, job: Job) -> None:
    """Store a new job; it starts queued, and that too is a status event."""
    job.status = QUEUED
    job.enqueued_at = utcnow()
    session.add(job)
    session.flush()
    add_event(session, job.id, "job created and queued", type="status", data={"status": QUEUED})
