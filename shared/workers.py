"""Which workers are alive: each worker's sweeper beats every round, under the worker's name,
and forgets it on a clean stop. The API reads the beats for `/readyz`, `/metrics` and a new
job's warning that nobody will train it."""

import os
import socket
from datetime import datetime, timedelta

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from shared.models import Worker, utcnow
from shared.settings import get_settings


def this_worker() -> str:
    """The name this process beats under (Celery's own hostname has the same parts)."""
    return f"{socket.gethostname()}-{os.getpid()}"


def beat(session: Session, name: str) -> None:
    now = utcnow()
    touched = session.execute(
        update(Worker)
        .where(Worker.name == name)
        .values(heartbeat_at=now)
        .execution_options(synchronize_session=False)
    )
    if touched.rowcount == 0:
        session.add(Worker(name=name, started_at=now, heartbeat_at=now))


def forget(session: Session, name: str) -> None:
    session.execute(delete(Worker).where(Worker.name == name))


def _alive_since() -> datetime:
    # A worker silent this long has lost its jobs too (the sweeper re-queues them).
    return utcnow() - timedelta(seconds=get_settings().heartbeat_timeout_s)


def alive(session: Session) -> int:
    return session.scalar(
        select(func.count()).select_from(Worker).where(Worker.heartbeat_at >= _alive_since())
    )


def last_heartbeats(session: Session) -> dict[str, datetime]:
    return {name: at for name, at in session.execute(select(Worker.name, Worker.heartbeat_at))}


def remove_long_gone(session: Session, after: timedelta = timedelta(days=1)) -> None:
    """Rows of workers killed without a word, once they are a day old."""
    session.execute(delete(Worker).where(Worker.heartbeat_at < utcnow() - after))
