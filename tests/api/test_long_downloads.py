"""Downloads stream with no database transaction open. PostgreSQL ends a session that idles in a
transaction (it would hold its locks while a process is frozen), and a client may take minutes
to read a model: the request's session must not wait on the client meanwhile."""

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from shared import jobs, storage
from shared.db import engine_for, session_scope
from shared.settings import get_settings
from tests.e2e.client import TuneryClient
from tests.e2e.conftest import home, postgres_url  # noqa: F401
from tests.processes import make_key, running_api, tunery_environment
from tests.rows import queued_job

# Past every socket buffer between the two processes: the server waits for the reader.
CONTENT = b"".join(b"line %08d of a long download\n" % i for i in range(1_200_000))
IDLE_IN_A_TRANSACTION = text(
    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
    "AND state LIKE 'idle in transaction%'"
)


@pytest.fixture
def api(
    postgres_url: str,  # noqa: F811
    home: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[TuneryClient]:
    """`tunery api` on PostgreSQL, sharing its database and storage with this process."""
    environment = tunery_environment(
        home=str(home), database_url=postgres_url, storage_url=f"file://{tmp_path / 'storage'}"
    )
    for key, value in environment.items():
        if key.startswith("TUNERY_"):
            monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    with running_api(environment, tmp_path / "api.log") as base_url:
        yield TuneryClient(base_url, make_key(environment))
    get_settings.cache_clear()


def _succeeded_job_with_artifact(content: bytes) -> str:
    job_id = queued_job(project="default")  # the project of `make_key`'s key
    with storage.open_write(storage.artifact_key(job_id)) as stream:
        stream.write(content)
    with session_scope() as session:
        attempt = jobs.claim(session, job_id)
        assert attempt is not None
        sha256 = hashlib.sha256(content).hexdigest()
        values = {"artifact_bytes": len(content), "artifact_sha256": sha256}
        assert jobs.mark_succeeded(session, job_id, attempt, values=values)
    return job_id


def _read_slowly(client: TuneryClient, url: str) -> tuple[bytes, int]:
    """The body, read with a pause after its first chunk, and how many sessions of the
    database idled in a transaction during the pause."""
    with client.http.stream("GET", url) as response:
        assert response.status_code == 200, response.read()
        chunks = response.iter_bytes()
        first = next(chunks)
        time.sleep(1.0)  # the server has filled the socket buffers and waits for us
        with engine_for(get_settings().resolved_database_url).connect() as connection:
            idle_in_a_transaction = connection.execute(IDLE_IN_A_TRANSACTION).scalar_one()
        return first + b"".join(chunks), idle_in_a_transaction


def test_a_paused_dataset_download_holds_no_transaction(api: TuneryClient) -> None:
    dataset = api.upload(CONTENT)
    body, idle_in_a_transaction = _read_slowly(api, f"/datasets/{dataset['id']}/content")
    assert body == CONTENT
    assert idle_in_a_transaction == 0


def test_a_paused_artifact_download_holds_no_transaction(api: TuneryClient) -> None:
    job_id = _succeeded_job_with_artifact(CONTENT)
    body, idle_in_a_transaction = _read_slowly(api, f"/jobs/{job_id}/artifact")
    assert body == CONTENT
    assert idle_in_a_transaction == 0
