"""Real processes on real services: `tunery api` and `tunery worker` on PostgreSQL and Redis,
or `tunery up` on the embedded defaults."""

import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from shared.db import engine_for
from shared.migrate import upgrade
from tests import servers
from tests.conftest import _drop_postgres_database, _fresh_postgres_database


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A new, migrated PostgreSQL database for one test."""
    name, url = _fresh_postgres_database()
    upgrade(url)
    yield url
    engine_for(url).dispose()
    _drop_postgres_database(name)


@pytest.fixture
def redis_url() -> Iterator[str]:
    """An empty database of the session's own Redis, so that no earlier test's queue is left."""
    url = servers.redis_server().database_url(random.randint(1, 15))
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    """When an end-to-end test fails, show the tail of its processes' logs."""
    report = yield
    tmp_path = getattr(item, "funcargs", {}).get("tmp_path")
    if report.failed and tmp_path is not None:
        for log in sorted(Path(tmp_path).glob("*.log")):
            report.sections.append((f"log {log.name}", log.read_text()[-6000:]))
    return report
