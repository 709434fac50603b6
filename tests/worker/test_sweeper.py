"""The sweeper re-sends lost doorbells, re-queues jobs of dead workers, caps attempts, clears
deleted datasets from the token cache, and removes the files dead processes left in storage."""

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from transformers import AutoTokenizer

from shared import jobs, storage
from shared.db import session_scope
from shared.models import Dataset, Job, JobEvent, utcnow
from tests.api.conftest import upload
from tests.conftest import TINY_MODEL
from tests.rows import queued_job
from tests.seed_data import TECH_NEWS
from worker import token_cache, work_folders
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
        assert job.lost_attempts == 1
        assert (
            "no heartbeat from its worker for 60 s (1 of 2 attempts lost)" in messages(job_id)[-1]
        )
        with session_scope() as session:
            assert jobs.claim(session, job_id) == 2

    def test_a_silent_workers_job_whose_cancel_was_requested_ends_cancelled(self, sweeper_settings):
        job_id = new_job()
        with session_scope() as session:
            jobs.claim(session, job_id)
            jobs.cancel(session, job_id)
        checkpoint = store_checkpoint(job_id)
        age(job_id, 61, "heartbeat_at", "started_at")
        before = queued_messages(sweeper_settings)

        report = sweep()

        # Re-queued, it would load its model on the next worker only to stop there.
        assert (report.cancelled, report.requeued) == ([job_id], [])
        job = row(job_id)
        assert job.status == "cancelled" and job.finished_at is not None
        assert "job cancelled while running" in messages(job_id)
        assert queued_messages(sweeper_settings) == before
        assert not storage.exists(checkpoint)

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
            "message": "the worker stopped answering; 2 of 2 attempts were lost",
            "user_error": False,
        }

    def test_a_handed_back_attempt_costs_the_job_nothing(self, sweeper_settings):
        # Three clean hand-backs (a worker stopped three times, as by Ctrl-C), then one lost
        # attempt: with two allowed, the job is re-queued, not failed as "attempt 4 of 2".
        job_id = new_job()
        for _ in range(3):
            with session_scope() as session:
                attempt = jobs.claim(session, job_id)
                assert jobs.hand_back(session, job_id, attempt, "the worker is shutting down")
        with session_scope() as session:
            assert jobs.claim(session, job_id) == 4
        age(job_id, 61, "heartbeat_at")

        assert sweep().requeued == [job_id]
        job = row(job_id)
        assert (job.status, job.attempt, job.lost_attempts) == ("queued", 4, 1)

    def test_work_folders_go_once_their_attempt_no_longer_runs(self, sweeper_settings):
        running, ended = new_job(), new_job()
        with session_scope() as session:
            jobs.claim(session, running)
            jobs.requeue(session, running, 1, "its worker stopped answering", lost=True)
            assert jobs.claim(session, running) == 2  # attempt 1 was lost, attempt 2 runs
            jobs.mark_failed(session, ended, {"code": "x", "message": "x"}, source=jobs.QUEUED)
        work = sweeper_settings.home / "work"
        names = [
            f"{running}-1-a1b2",  # the lost attempt's
            f"{running}-2-c3d4",  # the running attempt's
            f"{ended}-legacy",  # made before folders were named after their attempt
            "job_nobody-1-e5f6",  # a job the database does not have
            "notes",  # not ours
        ]
        for name in names:
            (work / name).mkdir(parents=True)
            (work / name / "weights.bin").write_bytes(b"0" * 1024)

        assert sorted(sweep().work_folders) == sorted([names[0], names[2], names[3]])
        assert sorted(p.name for p in work.iterdir()) == sorted([names[1], names[4]])

    def test_a_lost_attempt_that_lives_on_keeps_its_work_folder(self, sweeper_settings):
        # Paused past its lease and continued, a worker trains on until it notices: its folder
        # must not go from under it. Its lock goes with the process; the folder with the sweep.
        job_id = new_job()
        with session_scope() as session:
            jobs.claim(session, job_id)
            jobs.requeue(session, job_id, 1, "its worker stopped answering", lost=True)
            jobs.claim(session, job_id)
        with work_folders.for_attempt(job_id, 1) as folder:
            assert sweep().work_folders == [] and folder.is_dir()
        code = (
            "import os, sys; from worker import work_folders\n"
            f"with work_folders.for_attempt({job_id!r}, 1) as folder:\n"
            "    print(folder, flush=True); os.kill(os.getpid(), 9)"
        )
        killed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        left = Path(killed.stdout.strip())
        assert killed.returncode == -signal.SIGKILL and left.is_dir()
        assert sweep().work_folders == [left.name] and not left.exists()


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


def killed_while_writing(key: str) -> str:
    """Write `key` in a process of its own, through storage's own writer, and SIGKILL it
    halfway; returns the key of the temporary file it leaves."""
    code = (
        "import os, signal\n"
        "from shared import storage\n"
        f"with storage.open_write({key!r}) as stream:\n"
        "    stream.write(b'half of a file')\n"
        "    stream.flush()\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == -signal.SIGKILL
    folder, name = key.split("/")
    (left,) = [entry for entry in storage.list_dir(folder) if entry.startswith(f".{name}.")]
    return f"{folder}/{left}"


def make_old(key: str, days: float = 2) -> None:
    then = time.time() - days * 86400
    os.utime(storage.path(key), (then, then))


def store(key: str) -> str:
    with storage.open_write(key) as stream:
        stream.write(b"content")
    return key


def store_checkpoint(job_id: str) -> str:
    with storage.open_dir_write(storage.checkpoint_key(job_id, 5)) as folder:
        (folder / "model.safetensors").write_bytes(b"weights")
    return storage.checkpoints_key(job_id)


def ended(job_id: str, status: str) -> str:
    with session_scope() as session:
        attempt = jobs.claim(session, job_id)
        if status == "succeeded":
            assert jobs.mark_succeeded(session, job_id, attempt)
        elif status == "failed":
            assert jobs.mark_failed(session, job_id, {"code": "x", "message": "x"}, attempt=attempt)
        elif status == "cancelled":
            jobs.cancel(session, job_id)
            assert jobs.mark_cancelled(session, job_id, attempt)
    return job_id


class TestStorageLeftovers:
    def test_a_killed_writers_temporary_file_goes_once_it_is_a_day_old(self, sweeper_settings):
        dataset_left = killed_while_writing(storage.dataset_key("ds_killed"))
        tarball_left = killed_while_writing(storage.artifact_key(new_job()))
        recent_left = killed_while_writing(storage.dataset_key("ds_killed_recently"))

        assert sweep(storage_leftovers=True).removed == []  # a writer may still be at work
        make_old(dataset_left)
        make_old(tarball_left)
        make_old(recent_left, days=0.5)
        assert sweep().removed == []  # only the hourly round looks at storage

        assert sorted(sweep(storage_leftovers=True).removed) == sorted([dataset_left, tarball_left])
        assert not storage.exists(dataset_left) and not storage.exists(tarball_left)
        assert storage.exists(recent_left)

    def test_files_their_rows_say_are_gone_are_removed_and_no_others(self, sweeper_settings):
        running = new_job()
        with session_scope() as session:
            jobs.claim(session, running)
            live_dataset = session.get(Job, running).dataset_id
        succeeded, failed, cancelled = (
            ended(new_job(), status) for status in ("succeeded", "failed", "cancelled")
        )
        with session_scope() as session:
            deleted_dataset = session.get(Job, failed).dataset_id
            session.execute(
                update(Dataset).where(Dataset.id == deleted_dataset).values(deleted_at=utcnow())
            )
        # What a process killed between a row's change and the removal of the files leaves.
        gone = [
            store(storage.dataset_key(deleted_dataset)),
            store(storage.artifact_key(failed)),
            store_checkpoint(failed),
            store(storage.artifact_key(cancelled)),
            store_checkpoint(succeeded),
        ]
        kept = [
            store(storage.dataset_key(live_dataset)),
            store_checkpoint(running),
            store(storage.artifact_key(succeeded)),
            # No row names these: they may be another deployment's on a shared volume.
            store(storage.dataset_key("ds_of_another_deployment")),
            store(storage.artifact_key("job_of_another_deployment")),
            store_checkpoint("job_of_another_deployment"),
        ]

        assert sorted(sweep(storage_leftovers=True).removed) == sorted(gone)
        assert [key for key in gone if storage.exists(key)] == []
        assert [key for key in kept if not storage.exists(key)] == []
        assert storage.list_dir(storage.checkpoints_key(running)) == ["step-000000005"]
        assert sweep(storage_leftovers=True).removed == []
