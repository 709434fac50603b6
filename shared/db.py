"""The database engine and sessions, for SQLite (embedded) and PostgreSQL (production)."""

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from shared.settings import get_settings


def _enable_sqlite_concurrency(dbapi_connection, _record) -> None:  # noqa: ANN001
    # The API and the worker write from separate processes: WAL lets readers go on during a
    # write, and busy_timeout makes a writer wait for the lock instead of failing at once.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


@lru_cache
def engine_for(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _enable_sqlite_concurrency)
        return engine
    # A short connect timeout keeps /readyz and requests from hanging while PostgreSQL is away.
    # No pre-ping (a round trip per checkout, a third of a GET's database time): a connection
    # that died with a server restart fails once, and SQLAlchemy then discards the whole pool.
    return create_engine(
        url,
        # As many as the API's thread pool runs at once (anyio's default: 40); connections
        # past pool_size are closed on return, and opening one costs PostgreSQL a process.
        pool_size=40,
        max_overflow=10,
        pool_recycle=1800,
        connect_args={"connect_timeout": 3, "options": _idle_in_transaction_timeout()},
    )


def _idle_in_transaction_timeout() -> str:
    # Our transactions wait on their client for milliseconds. One that waits for as long as a
    # silent worker is given belongs to a process that froze or lost its network mid-write;
    # its row locks would hold off the sweeper's re-queue, and every write for that job, until
    # the process came back (hours, for a cut network). The server ends it and rolls it back.
    milliseconds = round(get_settings().heartbeat_timeout_s * 1000)
    return f"-c idle_in_transaction_session_timeout={milliseconds}"


def get_engine() -> Engine:
    return engine_for(get_settings().resolved_database_url)


@lru_cache
def _session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False)


def new_session() -> Session:
    return _session_factory(get_engine())()


@lru_cache
def autocommit(engine: Engine) -> Engine:
    """The engine's pool with each statement standing alone: a lone SELECT then needs no BEGIN
    before it and no ROLLBACK when its connection goes back to the pool, one round trip to the
    database instead of three. For reads only."""
    return engine.execution_options(isolation_level="AUTOCOMMIT")


@lru_cache
def _read_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=autocommit(engine), expire_on_commit=False)


def read_session() -> Session:
    """A session for reads that need no transaction (each statement stands alone); it must not
    write. Objects loaded in it keep their attributes after it closes."""
    return _read_session_factory(get_engine())()


@contextmanager
def session_scope() -> Iterator[Session]:
    """A session that commits when the block ends cleanly and rolls back otherwise."""
    with new_session() as session, session.begin():
        yield session
