"""The job state machine in shared/jobs.py: every allowed move, and every forbidden one."""

import itertools

import pytest
from sqlalchemy import select

from shared import jobs
from shared.db import session_scope
from shared.models import Job, JobEvent
from tests.rows import queued_job


@pytest.fixture
def job_id(settings) -> str:
    return queued_job()


def status_of(job_id: str) -> str:
    with session_scope() as session:
        return session.get(Job, job_id).status


def status_events(job_id: str) -> list[str]:
    with session_scope() as session:
        events = session.scalars(
            select(JobEvent)
            .where(JobEvent.job_id == job_id, JobEvent.type == "status")
            .order_by(JobEvent.seq)
        )
        return [event.data["status"] for event in events]


def run(action, *args, **kwargs):
    with session_scope() as session:
        return action(session, *args, **kwargs)


ERROR = {"code": "boom", "message": "it broke", "user_error": False}


class TestTransitions:
    def test_claim_takes_a_queued_job_once(self, job_id):
        assert run(jobs.claim, job_id) == 1
        assert run(jobs.claim, job_id) is None
        assert status_of(job_id) == "running"

    def test_succeed(self, job_id):
        attempt = run(jobs.claim, job_id)
        assert run(jobs.mark_succeeded, job_id, attempt, {"artifact_bytes": 3})
        assert status_events(job_id) == ["queued", "running", "succeeded"]

    def test_fail_running_and_queued(self, job_id):
        attempt = run(jobs.claim, job_id)
        assert run(jobs.mark_failed, job_id, ERROR, attempt=attempt)
        with session_scope() as session:
            assert session.get(Job, job_id).error == ERROR

    def test_fail_a_queued_job(self, job_id):
        assert run(jobs.mark_failed, job_id, ERROR, source="queued")
        assert status_of(job_id) == "failed"

    def test_requeue_then_claim_again_counts_attempts(self, job_id):
        attempt = run(jobs.claim, job_id)
        assert run(jobs.requeue, job_id, attempt, "worker lost")
        assert run(jobs.claim, job_id) == 2
        assert status_events(job_id) == ["queued", "running", "queued", "running"]

    def test_cancel_queued_and_running(self, job_id):
        attempt = run(jobs.claim, job_id)
        run(jobs.cancel, job_id)
        with session_scope() as session:
            assert session.get(Job, job_id).cancel_requested is True
        assert run(jobs.mark_cancelled, job_id, attempt)
        with pytest.raises(jobs.JobFinished):
            run(jobs.cancel, job_id)

    def test_a_cancel_requested_before_success_wins(self, job_id):
        attempt = run(jobs.claim, job_id)
        run(jobs.cancel, job_id)
        assert not run(jobs.mark_succeeded, job_id, attempt, {"artifact_bytes": 3})
        assert status_of(job_id) == "running"
        assert run(jobs.mark_cancelled, job_id, attempt)
        assert status_events(job_id) == ["queued", "running", "cancelled"]
        with session_scope() as session:
            assert session.get(Job, job_id).artifact_bytes is None

    def test_a_job_whose_cancel_was_requested_is_not_requeued(self, job_id):
        attempt = run(jobs.claim, job_id)
        run(jobs.cancel, job_id)
        assert not run(jobs.requeue, job_id, attempt, "worker stopping")
        assert status_of(job_id) == "running"
        assert status_events(job_id) == ["queued", "running"]

    def test_a_running_job_is_cancelled_only_once_a_cancel_was_requested(self, job_id):
        attempt = run(jobs.claim, job_id)
        assert not run(jobs.mark_cancelled, job_id, attempt)
        assert status_events(job_id) == ["queued", "running"]
        run(jobs.cancel, job_id)
        assert run(jobs.mark_cancelled, job_id, attempt)

    def test_a_hand_back_requeues_or_cancels_as_asked(self, job_id):
        attempt = run(jobs.claim, job_id)
        assert run(jobs.hand_back, job_id, attempt, "worker stopping") == "queued"
        attempt = run(jobs.claim, job_id)
        run(jobs.cancel, job_id)
        assert run(jobs.hand_back, job_id, attempt, "worker stopping") == "cancelled"
        assert status_events(job_id) == ["queued", "running", "queued", "running", "cancelled"]

    def test_a_hand_back_by_a_stale_attempt_changes_nothing(self, job_id):
        first = run(jobs.claim, job_id)
        run(jobs.requeue, job_id, first, "lease lost")
        run(jobs.claim, job_id)
        run(jobs.cancel, job_id)
        assert run(jobs.hand_back, job_id, first, "worker stopping") is None
        assert status_of(job_id) == "running"

    def test_a_stale_attempt_cannot_finish_the_job(self, job_id):
        first = run(jobs.claim, job_id)
        run(jobs.requeue, job_id, first, "lease lost")
        second = run(jobs.claim, job_id)
        assert not run(jobs.mark_succeeded, job_id, first)
        assert not run(jobs.heartbeat, job_id, first)
        assert not run(jobs.still_owned, job_id, first)
        assert run(jobs.still_owned, job_id, second)
        assert status_of(job_id) == "running"


class TestForbiddenTransitions:
    @pytest.mark.parametrize(
        ("source", "target"),
        [
            (source, target)
            for source, target in itertools.product(jobs.STATUSES, repeat=2)
            if target not in jobs.ALLOWED_TRANSITIONS[source]
        ],
    )
    def test_is_refused(self, job_id, source, target):
        with session_scope() as session, pytest.raises(jobs.InvalidTransition):
            jobs._transition(session, job_id, source, target, "never")

    @pytest.mark.parametrize("finished", ["succeeded", "failed", "cancelled"])
    def test_finished_states_never_change(self, finished):
        assert jobs.ALLOWED_TRANSITIONS[finished] == frozenset()

    def test_a_move_from_the_wrong_current_state_does_nothing(self, job_id):
        assert not run(jobs.mark_succeeded, job_id, 0)  # still queued, not running
        assert not run(jobs.requeue, job_id, 0, "no")
        assert status_of(job_id) == "queued"
        assert status_events(job_id) == ["queued"]
