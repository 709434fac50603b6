"""A worker asked to stop (SIGTERM) hands its job back; a worker frozen past its lease
(SIGSTOP) loses the job to another and, once continued, writes nothing more for it, also when
it froze in the middle of a write, holding the job's row lock."""

import signal
import subprocess

from sqlalchemy import text

from shared.models import Job
from tests.chaos.conftest import Stack, figures, now
from tests.processes import wait_for


class TestStoppedWorker:
    def test_sigterm_checkpoints_requeues_and_the_job_resumes(self, stack: Stack) -> None:
        first, _, job_id = stack.job_with_a_standby()
        stack.wait_step(job_id, 5)
        step_before = stack.step(job_id)

        # As `docker stop` does: the main process only; it forwards the stop to its child.
        first.send_signal(signal.SIGTERM)
        signalled = now()
        first.wait(timeout=60)
        stopped_s = now() - signalled
        handed_back = [m for m in stack.messages(job_id) if m.startswith("job re-queued")]
        assert handed_back and "worker is shutting down" in handed_back[0], stack.messages(job_id)
        checkpoint_step = int(handed_back[0].rsplit(" ", 1)[1])
        assert checkpoint_step >= step_before

        resumed = stack.wait_resumed(job_id, attempt=2)
        recovered_s = now() - signalled
        assert resumed.resumed_from_step == checkpoint_step
        finished = stack.client.wait(job_id, timeout=180)
        assert finished["status"] == "succeeded" and finished["attempt"] == 2
        figures(
            "f.sigterm",
            step_killed_at=checkpoint_step,
            step_resumed_from=resumed.resumed_from_step,
            seconds_to_stop=round(stopped_s, 2),
            seconds_to_recover=round(recovered_s, 2),
        )

    def test_a_worker_paused_past_its_lease_stops_writing_and_the_job_finishes_once(
        self, stack: Stack
    ) -> None:
        first, _, job_id = stack.job_with_a_standby()
        wait_for(lambda: stack.checkpoint_steps(job_id), timeout=60, what="a checkpoint")
        paused_at = stack.step(job_id)

        stack.kill_group(first, signal.SIGSTOP)
        resumed, recovered_s = _taken_over_then_continued(stack, first, job_id, paused=now())
        figures(
            "h.sigstop_past_lease",
            step_paused_at=paused_at,
            step_resumed_from=resumed.resumed_from_step,
            seconds_to_recover=round(recovered_s, 2),
        )

    def test_a_worker_frozen_inside_a_write_loses_the_job_all_the_same(self, stack: Stack) -> None:
        # A frozen worker's open transaction holds the job's row lock, which the sweeper's
        # re-queue waits for: PostgreSQL must end the session for the job to move on.
        first, _, job_id = stack.job_with_a_standby()
        wait_for(lambda: stack.checkpoint_steps(job_id), timeout=60, what="a checkpoint")
        with stack.engine.connect() as blocker:
            # Hold the worker's next metric row back: its write has refreshed the heartbeat,
            # taking the row lock, and waits for the insert inside the same transaction.
            blocker.execute(text("LOCK TABLE job_metrics IN EXCLUSIVE MODE"))
            waiting = wait_for(
                lambda: _waiting_metric_insert(stack),
                timeout=60,
                what="the worker's metric insert to wait",
            )
            stack.kill_group(first, signal.SIGSTOP)
            paused = now()
        # The lock went with the blocker's connection: the insert goes through, and the frozen
        # worker never sends its COMMIT.
        frozen_state = wait_for(
            lambda: (state := _state(stack, waiting)) != "active" and state,
            timeout=10,
            what="the insert to finish",
        )
        assert frozen_state == "idle in transaction"
        resumed, recovered_s = _taken_over_then_continued(stack, first, job_id, paused)
        figures(
            "i.frozen_inside_a_write",
            step_resumed_from=resumed.resumed_from_step,
            seconds_to_recover=round(recovered_s, 2),
        )


def _taken_over_then_continued(
    stack: Stack, first: subprocess.Popen[bytes], job_id: str, paused: float
) -> tuple[Job, float]:
    """The job resumed on the standby and trained on while `first` stayed paused; continued,
    `first` noticed it lost the job, and the job succeeded once, on attempt 2. Returns the
    resumed row and the seconds from the pause to the resume. (A failure leaves `first` paused:
    the stack continues it before stopping it.)"""
    resumed = stack.wait_resumed(job_id, attempt=2, timeout=60)
    recovered_s = now() - paused
    stack.wait_step(job_id, resumed.resumed_from_step + 2)
    stack.kill_group(first, signal.SIGCONT)
    try:
        wait_for(
            lambda: "lost its claim; stopped without writing" in stack.log("first").read_text(),
            timeout=60,
            what="the paused worker to notice",
        )
    except TimeoutError as error:  # say what the paused worker did instead
        tail = stack.log("first").read_text()[-4000:]
        raise AssertionError(f"{error}; the paused worker's log ends with:\n{tail}") from error
    finished = stack.client.wait(job_id, timeout=180)
    assert finished["status"] == "succeeded" and finished["attempt"] == 2
    messages = stack.messages(job_id)
    assert messages.count("job claimed by a worker") == 2
    assert messages.count("job succeeded") == 1
    assert first.poll() is None  # alive, and free for the next job
    return resumed, recovered_s


def _waiting_metric_insert(stack: Stack) -> int | None:
    """The server process of a metric row's insert that waits for a lock."""
    for backend in stack.backends():
        inserting = backend.query.startswith("INSERT INTO job_metrics")
        if inserting and backend.wait_event_type == "Lock":
            return backend.pid
    return None


def _state(stack: Stack, pid: int) -> str | None:
    return next((backend.state for backend in stack.backends() if backend.pid == pid), None)
