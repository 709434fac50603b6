"""The sweeper re-sends lost doorbells, re-queues jobs of dead workers, caps attempts, and clears
deleted datasets from the token cache."""

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from transformers import AutoTokenizer

from shared import jobs
from shared.db import session_scope
from shared.models import Dataset, Job, JobEvent, utcnow
from tests.api.conftest import upload
from tests.conftest import TINY_MODEL
from tests.rows import queued_job
from tests.seed_data import TECH_NEWS
from worker import token_cache
from worker.data import prepare_data
from worker.sweeper import sweep


def new_job() -> str:
    return queued_job()


def age(job_id: str, seconds: float, *columns: str) -> None:
    with session_scope() as session:
        past = utcnow() - timedelta(seconds=seconds)
        session.execute(update(Job).where(Job.id == job_id).values(**dict.fromkeys(columns, past)))


def row(job_id: str) -> Job:
    with session_scope() as session:
        return session.get(Job, job_id)


def messages(job_id: str) -> list[str]:
    with session_scope() as session:
        return list(
            session.scalars(
                select(JobEvent.message).where(JobEvent.job_id == job_id).order_by(JobEvent.seq)
            )
        )


def queued_messages(settings) -> int:
    return len(list((settings.queue_dir / "messages").glob("*.msg")))


@pytest.fixture
def sweeper_settings(settings, monkeypatch):
    from shared.settings import get_settings

    monkeypatch.setenv("TUNERY_HEARTBEAT_TIMEOUT_S", "60")
    monkeypatch.setenv("TUNERY_REQUEUE_UNCLAIMED_AFTER_S", "300")
    monkeypatch.setenv("TUNERY_MAX_ATTEMPTS", "2")
    get_settings.cache_clear()
    return get_settings()


class TestSweep:
    def test_fresh_jobs_are_left_alone(self, sweeper_settings):
        queued = new_job()
        running = new_job()
        with session_scope() as session:
            jobs.claim(session, running)
        report = sweep()
        assert (report.resent, report.requeued, report.failed) == ([], [], [])
        assert row(queued).status == "queued" and row(running).status == "running"

    def test_an_unclaimed_job_is_sent_again(self, sweeper_settings):
        job_id = new_job()
        age(job_id, 301, "enqueued_at")
        before = queued_messages(sweeper_settings)
        assert sweep().resent == [job_id]
        assert queued_messages(sweeper_settings) == before + 1
        assert "its message was sent again" in messages(job_id)[-1]
        assert sweep().resent == []  # not again until the setting passes once more

    def test_a_silent_worker_loses_its_job(self, sweeper_settings):
        job_id = new_job()
        with session_scope() as session:
            jobs.claim(session, job_id)
        age(job_id, 61, "heartbeat_at", "started_at")
        assert sweep().requeued == [job_id]
        job = row(job_id)
        assert job.status == "queued" and job.heartbeat_at is None and job.attempt == 1
        assert "no heartbeat from its worker for 60 s" in messages(job_id)[-1]
        with session_scope() as session:
            assert jobs.claim(session, job_id) == 2

    def test_a_claim_that_never_heartbeated_counts_from_its_start(self, sweeper_settings):
        job_id = new_job()
        with session_scope() as session:
            jobs.claim(session, job_id)
            session.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=None))
        assert sweep().requeued == []
        age(job_id, 61, "started_at")
        assert sweep().requeued == [job_id]

    def test_the_last_attempt_fails_as_worker_lost(self, sweeper_settings):
        job_id = new_job()
        for _ in range(2):
            with session_scope() as session:
                jobs.claim(session, job_id)
            age(job_id, 61, "heartbeat_at")
            sweep()
        job = row(job_id)
        assert job.status == "failed" and job.attempt == 2
        assert job.error == {
            "code": "worker_lost",
            "message": "the worker stopped answering on attempt 2 of 2",
            "user_error": False,
        }


def uploaded(client: TestClient, headers: dict[str, str], text: str) -> Dataset:
    with session_scope() as session:
        return session.get(Dataset, upload(client, headers, text))


def delete(client: TestClient, headers: dict[str, str], dataset: Dataset) -> None:
    assert client.delete(f"/datasets/{dataset.id}", headers=headers).status_code == 204


class TestTokenCache:
    """Token ids decode back to the text: a deleted dataset must not live on in a worker's cache."""

    @pytest.fixture
    def prepare(self, models_dir: Path) -> Callable[..., bool]:
        tokenizer = AutoTokenizer.from_pretrained(models_dir / TINY_MODEL)

        def cache_hit(train: Dataset, validation: Dataset | None = None) -> bool:
            prepared = prepare_data(
                tokenizer, train, validation, 0.1, block_size=16, seed=0, use_cache=True
            )
            return prepared.cache_hit

        return cache_hit

    def test_a_deleted_datasets_tokens_leave_with_the_next_sweep(
        self, client: TestClient, auth_headers: dict[str, str], prepare: Callable[..., bool]
    ) -> None:
        train = uploaded(client, auth_headers, TECH_NEWS)
        validation = uploaded(client, auth_headers, TECH_NEWS[: len(TECH_NEWS) // 4])
        assert (prepare(train), prepare(train, validation)) == (False, False)
        entries = {entry.key: entry.datasets for entry in token_cache.entries()}
        assert len(entries) == 4  # the train and eval splits of both preparations
        assert sweep().uncached == []
        assert (prepare(train), prepare(train, validation)) == (True, True)

        delete(client, auth_headers, validation)
        naming_it = {key for key, datasets in entries.items() if validation.sha256 in datasets}
        assert len(naming_it) == 2
        assert sorted(sweep().uncached) == sorted(naming_it)
        assert {entry.key for entry in token_cache.entries()} == entries.keys() - naming_it
        assert prepare(train) is True

        delete(client, auth_headers, train)
        assert len(sweep().uncached) == 2
        assert token_cache.entries() == []

    def test_entries_stay_while_another_upload_of_the_same_bytes_lives(
        self,
        client: TestClient,
        auth_headers: dict[str, str],
        other_auth_headers: dict[str, str],
        prepare: Callable[..., bool],
    ) -> None:
        mine = uploaded(client, auth_headers, TECH_NEWS)
        theirs = uploaded(client, other_auth_headers, TECH_NEWS)
        assert prepare(mine) is False
        delete(client, auth_headers, mine)
        assert sweep().uncached == []
        assert prepare(theirs) is True
        delete(client, other_auth_headers, theirs)
        assert len(sweep().uncached) == 2
