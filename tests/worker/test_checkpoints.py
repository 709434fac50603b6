"""Checkpoints in the pipeline: written on time and on shutdown, the last two kept, a handed-back
job resumed exactly (same final train loss as an uninterrupted run), damaged ones skipped, all
deleted when the job ends."""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from transformers import TrainerCallback

from shared import checkpoints, jobs, storage
from shared.db import session_scope
from shared.settings import Settings, get_settings
from tests.worker.conftest import MakeDataset, MakeJob
from tests.worker.helpers import events_of, learnable_text, load_job
from tests.worker.test_pipeline import (
    AtStep,
    assert_cancelled_with_nothing_kept,
    cancel_before,
    hook_trainer,
)
from worker import pipeline, shutdown

RUN = {"max_steps": 40, "block_size": 32, "batch_size": 4, "learning_rate": 3e-3, "seed": 11}


@pytest.fixture
def interval(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Checkpoints every 50 ms: several per run of the tiny model."""
    monkeypatch.setenv("TUNERY_CHECKPOINT_INTERVAL_S", "0.05")
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.fixture(autouse=True)
def no_shutdown() -> Iterator[None]:
    shutdown.clear()
    yield
    shutdown.clear()


class StorageWatch(TrainerCallback):
    """After each save (ours runs after the pipeline's own), what storage holds for the job."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self.seen: list[list[str]] = []

    def on_save(self, args: Any, state: Any, control: Any, **_: Any) -> None:
        self.seen.append(storage.list_dir(storage.checkpoints_key(self.job_id)))


def hand_back_at(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """SIGTERM's effect in the training process, at `step`: the flag its handler sets."""
    hook_trainer(monkeypatch, AtStep(step, shutdown.request))


def claim_again(job_id: str) -> int:
    with session_scope() as session:
        attempt = jobs.claim(session, job_id)
    assert attempt is not None
    return attempt


class TestWritingCheckpoints:
    def test_on_time_the_last_two_kept_and_all_deleted_at_the_end(
        self, interval: None, make_dataset: MakeDataset, make_job: MakeJob, monkeypatch
    ) -> None:
        job_id, attempt = make_job(make_dataset(learnable_text()), **RUN)
        watch = StorageWatch(job_id)
        hook_trainer(monkeypatch, watch)
        pipeline.run(job_id, attempt)

        assert load_job(job_id).status == "succeeded"
        assert len(watch.seen) >= 3, watch.seen
        for names in watch.seen:
            assert 1 <= len(names) <= checkpoints.KEEP, names
            assert all(name.startswith("step-") for name in names), names  # no temporary left
        assert storage.list_dir(storage.checkpoints_key(job_id)) == []


class TestHandBackAndResume:
    def test_shutdown_checkpoints_requeues_and_the_resume_matches_an_uninterrupted_run(
        self, make_dataset: MakeDataset, make_job: MakeJob, monkeypatch
    ) -> None:
        dataset_id = make_dataset(learnable_text())
        straight_id, attempt = make_job(dataset_id, **RUN)
        pipeline.run(straight_id, attempt)
        straight = load_job(straight_id)
        assert straight.status == "succeeded"

        job_id, attempt = make_job(dataset_id, **RUN)
        hand_back_at(monkeypatch, 15)
        pipeline.run(job_id, attempt)
        handed_back = load_job(job_id)
        assert handed_back.status == "queued"
        assert [c.step for c in checkpoints.list_complete(job_id)] == [15]
        assert "job re-queued: the worker is shutting down" in events_of(job_id)[-1].message

        shutdown.clear()
        pipeline.run(job_id, claim_again(job_id))
        resumed = load_job(job_id)
        assert resumed.status == "succeeded", resumed.error
        assert resumed.attempt == 2 and resumed.resumed_from_step == 15
        assert "resumed from checkpoint at step 15" in [e.message for e in events_of(job_id)]
        assert resumed.progress["step"] == RUN["max_steps"]
        # The full-run mean train loss; exact resume makes it (nearly) bit-identical.
        ours, theirs = resumed.metrics["train_loss"], straight.metrics["train_loss"]
        assert ours == pytest.approx(theirs, rel=0.02)
        assert ours == pytest.approx(theirs, rel=1e-4), (ours, theirs)
        assert storage.list_dir(storage.checkpoints_key(job_id)) == []

    def test_a_damaged_newest_checkpoint_and_a_partial_one_are_skipped(
        self, interval: None, make_dataset: MakeDataset, make_job: MakeJob, monkeypatch
    ) -> None:
        job_id, attempt = make_job(make_dataset(learnable_text()), **RUN)
        hand_back_at(monkeypatch, 12)
        pipeline.run(job_id, attempt)
        kept = checkpoints.list_complete(job_id)
        assert len(kept) == 2 and kept[0].step == 12
        older = kept[1].step

        # Flip a byte of the newest optimizer state (same size: only the sha256 tells).
        optimizer = storage.path(storage.checkpoint_key(job_id, 12)) / "optimizer.pt"
        data = bytearray(optimizer.read_bytes())
        data[len(data) // 2] ^= 0xFF
        optimizer.write_bytes(bytes(data))
        # And a newer checkpoint that a killed writer left half-written, under its temp name.
        partial = storage.path(storage.checkpoints_key(job_id)) / ".step-000000030.dead.partial"
        partial.mkdir()
        (partial / "optimizer.pt").write_bytes(b"half")

        shutdown.clear()
        pipeline.run(job_id, claim_again(job_id))
        job = load_job(job_id)
        assert job.status == "succeeded", job.error
        assert job.resumed_from_step == older
        messages = [e.message for e in events_of(job_id)]
        assert any("checkpoint skipped, it is damaged: step 12" in m for m in messages), messages
        assert not Path(partial).exists()

    def test_a_cancel_after_the_last_check_ends_the_handed_back_job_cancelled(
        self, settings: Settings, make_dataset: MakeDataset, make_job: MakeJob, monkeypatch
    ) -> None:
        job_id, attempt = make_job(make_dataset(learnable_text()), **RUN)
        hand_back_at(monkeypatch, 15)
        cancel_before(monkeypatch, "_hand_back", job_id)
        pipeline.run(job_id, attempt)

        assert_cancelled_with_nothing_kept(job_id, settings)
        assert load_job(job_id).attempt == attempt
        assert not any("re-queued" in event.message for event in events_of(job_id))


class TestCancel:
    def test_a_cancelled_job_leaves_no_checkpoints(
        self, interval: None, make_dataset: MakeDataset, make_job: MakeJob, monkeypatch
    ) -> None:
        job_id, attempt = make_job(make_dataset(learnable_text()), **RUN)

        def cancel() -> None:
            with session_scope() as session:
                jobs.cancel(session, job_id)

        hook_trainer(monkeypatch, AtStep(20, cancel))
        monkeypatch.setattr("worker.lease.Lease.poll_interval_s", 0.0)
        pipeline.run(job_id, attempt)
        assert load_job(job_id).status == "cancelled"
        assert storage.list_dir(storage.checkpoints_key(job_id)) == []
