"""Fixtures shared by every test: a fresh database per backend (PostgreSQL's on the session's
own server, `tests.servers`), settings under a temporary home, an in-process API client and API
keys of two projects."""

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from shared.db import engine_for, session_scope
from shared.keys import create_key
from shared.migrate import upgrade
from shared.models import Base
from shared.queue import celery_app
from shared.settings import Settings, get_settings
from tests import servers
from tests.tiny_model import build_tiny_model

TINY_MODEL = "tiny-gpt2"
REPOSITORY = Path(__file__).resolve().parents[1]


def _fresh_postgres_database() -> tuple[str, str]:
    """A new database on the session's own PostgreSQL: (name, URL)."""
    admin_url = servers.postgres().admin_url
    name = f"tunery_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return name, admin_url.rsplit("/", 1)[0] + f"/{name}"


def _drop_postgres_database(name: str) -> None:
    admin = create_engine(servers.postgres().admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models directory holding the tiny GPT-2 that every training test fine-tunes."""
    directory = tmp_path_factory.mktemp("models")
    build_tiny_model(directory, TINY_MODEL)
    return directory


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """A database made for this run and migrated to the newest schema, on each backend."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'tunery.db'}"
        upgrade(url)
        yield url
        return
    name, url = _fresh_postgres_database()
    upgrade(url)
    yield url
    engine_for(url).dispose()
    _drop_postgres_database(name)


def _empty_tables(url: str) -> None:
    with engine_for(url).begin() as connection:
        for table in reversed(Base.metadata.sorted_tables):
            connection.execute(table.delete())


@pytest.fixture
def settings(
    database_url: str, models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Settings]:
    """Settings for one test: its own home and storage, the run's database emptied first."""
    _empty_tables(database_url)
    environment = {
        "TUNERY_HOME": str(tmp_path / "home"),
        "TUNERY_DATABASE_URL": database_url,
        "TUNERY_MODELS_DIR": str(models_dir),
    }
    for key in [key for key in os.environ if key.startswith("TUNERY_")]:
        monkeypatch.delenv(key)
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    celery_app.cache_clear()
    yield get_settings()
    get_settings.cache_clear()
    celery_app.cache_clear()


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    from api.main import create_app

    with TestClient(create_app(), raise_server_exceptions=False) as test_client:
        yield test_client


def _key_headers(project: str) -> dict[str, str]:
    with session_scope() as session:
        token = create_key(session, f"{project}-key", project)
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def auth_headers(settings: Settings) -> dict[str, str]:
    return _key_headers("alpha")


@pytest.fixture
def other_auth_headers(settings: Settings) -> dict[str, str]:
    """A key of another project, which must see none of `alpha`'s resources."""
    return _key_headers("beta")
