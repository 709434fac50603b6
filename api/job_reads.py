"""Reading one job by id: the path of every client that polls a job, so it does the least work.

On PostgreSQL the read runs on the event loop through psycopg's async pool, in autocommit,
as one prepared statement: no thread hop, no BEGIN or ROLLBACK, no ORM or SQLAlchemy result
machinery (together about 0.25 ms of CPU per request, a third of the whole request). SQLite is
a file, not a server: there the read runs in a worker thread on the shared engine, as the
other routes' reads do. The app opens a reader at startup and closes it at shutdown, because an
async pool belongs to the event loop that opened it.
"""

from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

import psycopg
from fastapi.concurrency import run_in_threadpool
from psycopg.rows import namedtuple_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from sqlalchemy import bindparam, make_url, select
from sqlalchemy.dialects import postgresql

from shared.db import autocommit, engine_for
from shared.models import Job

# Every column of a job, each under its attribute's name (`metadata_`), so that a row reads
# like a `Job` (`JobRead.from_row` takes either).
_JOB_TABLE = Job.__table__
JOB_BY_ID = select(
    *(_JOB_TABLE.c[prop.columns[0].name].label(prop.key) for prop in Job.__mapper__.column_attrs)
).where(_JOB_TABLE.c.id == bindparam("job_id"))


# How these connections show in `pg_stat_activity`.
APPLICATION_NAME = "tunery-api-job-reads"


class JobReader(Protocol):
    async def open(self) -> None: ...
    async def get(self, job_id: str) -> Any | None:
        """The job's row with `Job`'s attribute names, or None."""
        ...

    async def close(self) -> None: ...


class PostgresJobReader:
    def __init__(self, database_url: str) -> None:
        self._conninfo = (
            make_url(database_url)
            .set(drivername="postgresql")
            .render_as_string(hide_password=False)
        )
        self._options = {
            "autocommit": True,
            "row_factory": namedtuple_row,
            "connect_timeout": 3,
            "application_name": APPLICATION_NAME,
        }
        self._sql = str(JOB_BY_ID.compile(dialect=postgresql.psycopg.dialect()))
        self._pool = AsyncConnectionPool(
            self._conninfo,
            min_size=2,
            max_size=16,
            # How long a read waits for a pooled connection before it opens its own.
            timeout=1,
            open=False,
            kwargs=self._options,
            name="job-reads",
        )

    async def open(self) -> None:
        # Not waiting: the API starts while PostgreSQL is still coming up, as the rest does.
        await self._pool.open(wait=False)

    async def get(self, job_id: str) -> Any | None:
        try:
            return await self._select(self._pool.connection(), job_id)
        except PoolTimeout:
            # After an outage the pool retries its connections 1, 2, 4, 8... s apart, so it can
            # stay empty for seconds after the server is back; a connection of our own is
            # answered at once (or refused at once while the server is away: a 503).
            own = await psycopg.AsyncConnection.connect(self._conninfo, **self._options)
            return await self._select(own, job_id)
        except psycopg.OperationalError:
            # A server restart breaks every pooled connection at once, and the pool finds out
            # one failed request at a time. Test them all, then read once more: a read can be
            # repeated, and the caller gets the job rather than a 503 for a server that is back.
            await self._pool.check()
            return await self._select(self._pool.connection(), job_id)

    async def _select(self, connecting: AbstractAsyncContextManager[Any], job_id: str) -> Any:
        async with connecting as connection:
            cursor = await connection.execute(self._sql, {"job_id": job_id})
            return await cursor.fetchone()

    async def close(self) -> None:
        await self._pool.close()


class ThreadedJobReader:
    def __init__(self, database_url: str) -> None:
        self._engine = autocommit(engine_for(database_url))

    async def open(self) -> None:
        return None

    async def get(self, job_id: str) -> Any | None:
        return await run_in_threadpool(self._select, job_id)

    def _select(self, job_id: str) -> Any | None:
        with self._engine.connect() as connection:
            return connection.execute(JOB_BY_ID, {"job_id": job_id}).first()

    async def close(self) -> None:
        return None


def job_reader_for(database_url: str) -> JobReader:
    if make_url(database_url).get_backend_name() == "postgresql":
        return PostgresJobReader(database_url)
    return ThreadedJobReader(database_url)
