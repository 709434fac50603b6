"""Reading back what a pipeline run wrote, and data that a tiny model can learn."""

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import event, select

from shared.db import get_engine, session_scope
from shared.models import Job, JobEvent, JobMetric

COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
THINGS = ["car", "house", "bird", "apple", "boat", "kite", "lamp", "door"]


def learnable_text(lines: int = 240) -> str:
    """Short sentences from a tiny grammar: easy to learn, so eval loss must fall."""
    return "".join(
        f"the {COLORS[i % 8]} {THINGS[(i * 3) % 8]} is next to the {COLORS[(i + 1) % 8]} "
        f"{THINGS[(i * 5 + 1) % 8]}.\n"
        for i in range(lines)
    )


def load_job(job_id: str) -> Job:
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def events_of(job_id: str) -> list[JobEvent]:
    with session_scope() as session:
        return list(
            session.scalars(
                select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.seq)
            )
        )


def metrics_of(job_id: str) -> list[JobMetric]:
    with session_scope() as session:
        return list(
            session.scalars(
                select(JobMetric).where(JobMetric.job_id == job_id).order_by(JobMetric.seq)
            )
        )


@contextmanager
def statements_sent() -> Iterator[list[str]]:
    """The first word (SELECT, UPDATE, ...) of each statement sent to the database meanwhile."""
    sent: list[str] = []

    def record(_connection: Any, _cursor: Any, statement: str, *_: Any) -> None:
        sent.append(statement.split(None, 1)[0].upper())

    engine = get_engine()
    event.listen(engine, "before_cursor_execute", record)
    try:
        yield sent
    finally:
        event.remove(engine, "before_cursor_execute", record)
