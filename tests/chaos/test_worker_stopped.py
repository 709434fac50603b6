"""A worker asked to stop (SIGTERM) hands its job back; a worker frozen past its lease
(SIGSTOP) loses the job to another and, once continued, writes nothing more for it."""

import signal

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
        paused = now()
        try:
            resumed = stack.wait_resumed(job_id, attempt=2)
            recovered_s = now() - paused
            stack.wait_step(job_id, resumed.resumed_from_step + 2)
        finally:
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
        figures(
            "h.sigstop_past_lease",
            step_paused_at=paused_at,
            step_resumed_from=resumed.resumed_from_step,
            seconds_to_recover=round(recovered_s, 2),
        )
