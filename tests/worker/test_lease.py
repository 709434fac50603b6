"""The lease keeps database traffic bounded and stops writing the moment it is lost."""

import time
from typing import Any

import pytest
from sqlalchemy import update
from sqlalchemy.exc import OperationalError

from shared import jobs
from shared.db import session_scope
from shared.models import Job
from shared.settings import Settings, get_settings
from tests.worker.conftest import MakeDataset, MakeJob
from tests.worker.helpers import events_of, learnable_text, load_job, statements_sent
from worker import lease as lease_module
from worker.errors import JobCancelled, LeaseLost
from worker.lease import Lease


@pytest.fixture
def claimed(settings: Settings, make_dataset: MakeDataset, make_job: MakeJob) -> tuple[str, int]:
    return make_job(make_dataset(learnable_text(10)), block_size=32)


def test_heartbeats_are_throttled_and_the_cancel_flag_is_read_every_step(
    claimed: tuple[str, int],
) -> None:
    job_id, attempt = claimed
    lease = Lease(job_id, attempt)

    with statements_sent() as sent:
        for step in range(200):  # a fast training loop
            lease.poll()
            lease.beat({"step": step})

    # One heartbeat, not one per step; a poll per step, so a cancel stops within one step.
    assert sent.count("UPDATE") == 1
    assert sent.count("SELECT") == 200
    assert len(sent) == 201
    assert load_job(job_id).progress == {"step": 0}


def test_the_heartbeat_interval_follows_a_shortened_timeout(
    claimed: tuple[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    lease = Lease(*claimed)
    assert lease.heartbeat_interval_s == 2.0  # against the default 60 s
    monkeypatch.setenv("TUNERY_HEARTBEAT_TIMEOUT_S", "3")
    get_settings.cache_clear()
    # A beat waits for the first step end after the interval: a 2 s interval and a 1.5 s step
    # would let the row age past 3 s, and the sweeper would requeue a live attempt.
    assert lease.heartbeat_interval_s == pytest.approx(0.6)
    lease.beat({"step": 1})
    time.sleep(0.7)
    with statements_sent() as sent:
        lease.beat({"step": 2})
    assert sent.count("UPDATE") == 1


@pytest.mark.parametrize("poll", [True, False])
def test_a_write_reads_the_cancel_flag_in_its_heartbeat(
    claimed: tuple[str, int], poll: bool
) -> None:
    job_id, attempt = claimed
    lease = Lease(job_id, attempt)
    assert lease.write(values={"progress": {"step": 1}}, poll=poll)
    assert not lease.should_stop
    with session_scope() as session:
        jobs.cancel(session, job_id)

    # A plain write (the keep-alive's beat during a save or an upload) notices it as well.
    with statements_sent() as sent:
        assert lease.write(values={"progress": {"step": 2}}, poll=poll)
    assert sent == ["UPDATE"]  # no SELECT: the heartbeat's own statement read the flag
    assert lease.cancel_requested and not lease.lost
    assert load_job(job_id).progress == {"step": 2}
    with pytest.raises(JobCancelled):
        lease.raise_if_stopped()


def test_a_cancel_request_is_seen_by_the_next_poll(claimed: tuple[str, int]) -> None:
    job_id, attempt = claimed
    lease = Lease(job_id, attempt)
    with session_scope() as session:
        session.execute(update(Job).where(Job.id == job_id).values(cancel_requested=True))

    with pytest.raises(JobCancelled):
        lease.check()
    assert not lease.lost


def test_a_lost_lease_writes_nothing(claimed: tuple[str, int]) -> None:
    job_id, attempt = claimed
    lease = Lease(job_id, attempt)
    with session_scope() as session:
        session.execute(update(Job).where(Job.id == job_id).values(attempt=attempt + 1))
    before = [event.seq for event in events_of(job_id)]

    with pytest.raises(LeaseLost):
        lease.event("should not be written")

    assert lease.lost and not lease.beat(force=True)
    assert [event.seq for event in events_of(job_id)] == before


def test_a_database_outage_skips_heartbeats_instead_of_failing_training(
    claimed: tuple[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id, attempt = claimed
    lease = Lease(job_id, attempt)

    def unreachable() -> Any:
        raise OperationalError("SELECT 1", {}, Exception("connection refused"))

    monkeypatch.setattr(lease_module, "session_scope", unreachable)
    monkeypatch.setattr(lease_module, "read_session", unreachable)
    # Stage events are retried through an outage, for TUNERY_DATABASE_RETRY_S at most.
    monkeypatch.setenv("TUNERY_DATABASE_RETRY_S", "1")
    get_settings.cache_clear()

    assert lease.beat({"step": 1}, force=True)  # skipped, still ours as far as we know
    lease.poll(force=True)
    assert not lease.should_stop
    started = time.monotonic()
    with pytest.raises(OperationalError):  # stage events are not optional: past the bound, fail
        lease.event("model loaded")
    assert 0.5 <= time.monotonic() - started < 5


def test_a_stage_event_is_retried_until_the_database_is_back(
    claimed: tuple[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id, attempt = claimed
    lease = Lease(job_id, attempt)
    real = lease_module.session_scope
    failures = [2]

    def flaky() -> Any:
        if failures[0] > 0:
            failures[0] -= 1
            raise OperationalError("SELECT 1", {}, Exception("connection refused"))
        return real()

    monkeypatch.setattr(lease_module, "session_scope", flaky)
    lease.event("model loaded")  # two refusals, then written
    assert failures == [0]
    assert [e.message for e in events_of(job_id)][-1] == "model loaded"
