"""A worker killed outright (kill -9 of its whole process group), mid-training and in the middle
of writing a checkpoint: another worker resumes from the newest complete checkpoint."""

import signal
from pathlib import Path

from tests.chaos.conftest import WIDE, Stack, figures, now
from tests.processes import wait_for


def partial_checkpoint(stack: Stack, job_id: str) -> str | None:
    folder = stack.storage / "checkpoints" / job_id
    try:
        return next((p.name for p in folder.iterdir() if p.name.endswith(".partial")), None)
    except FileNotFoundError:
        return None


class TestKilledWorker:
    def test_kill_9_mid_training_resumes_on_another_worker_and_matches_a_clean_run(
        self, stack: Stack
    ) -> None:
        first, _, job_id = stack.job_with_a_standby()
        wait_for(lambda: stack.checkpoint_steps(job_id), timeout=60, what="a checkpoint")
        killed_at = stack.step(job_id)
        newest = stack.checkpoint_steps(job_id)[0]
        assert killed_at < 300, "the job finished before the kill; make it longer"

        work = Path(stack.environment["TUNERY_HOME"]) / "work"
        assert list(work.glob(f"{job_id}-1-*"))  # the first attempt's work folder

        stack.kill_group(first, signal.SIGKILL)
        killed = now()
        resumed = stack.wait_resumed(job_id, attempt=2)
        recovered_s = now() - killed
        # What the killed attempt left in the work folder goes with the next sweep; the
        # running attempt's folder stays.
        wait_for(
            lambda: not list(work.glob(f"{job_id}-1-*")),
            timeout=30,
            what="the sweep to remove the killed attempt's work folder",
        )
        assert list(work.glob(f"{job_id}-2-*")) or stack.row(job_id).status == "succeeded"
        finished = stack.client.wait(job_id, timeout=180)
        assert finished["status"] == "succeeded", stack.messages(job_id)
        assert finished["attempt"] == 2
        assert finished["resumed_from_step"] == resumed.resumed_from_step
        assert finished["resumed_from_step"] >= newest
        assert f"resumed from checkpoint at step {finished['resumed_from_step']}" in (
            stack.messages(job_id)
        )
        assert stack.checkpoint_steps(job_id) == []  # deleted when the job ended

        # The same job, never interrupted, on the surviving worker: the same final loss.
        clean_id = stack.create_job()
        clean = stack.client.wait(clean_id, timeout=180)
        assert clean["status"] == "succeeded" and clean["resumed_from_step"] is None
        ours, theirs = finished["metrics"]["train_loss"], clean["metrics"]["train_loss"]
        difference = abs(ours - theirs) / theirs
        assert difference <= 0.02, (ours, theirs)
        figures(
            "a.kill_9_mid_training",
            step_killed_at=killed_at,
            step_resumed_from=finished["resumed_from_step"],
            seconds_to_recover=round(recovered_s, 2),
            train_loss_resumed=ours,
            train_loss_uninterrupted=theirs,
            relative_difference=difference,
        )

    def test_kill_9_while_a_checkpoint_is_written_resumes_from_the_one_before(
        self, stack: Stack
    ) -> None:
        first = stack.start_worker("first")
        stack.wait_ready("first", first)
        job_id = stack.create_job(base_model=WIDE, max_steps=200)
        stack.wait_step(job_id, 1)
        second = stack.start_worker("second")
        stack.wait_ready("second", second)
        wait_for(lambda: stack.checkpoint_steps(job_id), timeout=60, what="a checkpoint")

        # Catch the next checkpoint while it is being copied into storage, and kill then.
        deadline = now() + 60
        partial = None
        while partial is None and now() < deadline:
            partial = partial_checkpoint(stack, job_id)
        assert partial is not None, "never saw a checkpoint being written"
        stack.kill_group(first, signal.SIGKILL)
        killed = now()
        complete = stack.checkpoint_steps(job_id)
        assert partial_checkpoint(stack, job_id) == partial, "the write finished before the kill"
        partial_step = int(partial.split(".")[1].removeprefix("step-"))
        assert complete and complete[0] < partial_step, (complete, partial)

        resumed = stack.wait_resumed(job_id, attempt=2)
        recovered_s = now() - killed
        assert resumed.resumed_from_step == complete[0]
        finished = stack.client.wait(job_id, timeout=180)
        assert finished["status"] == "succeeded" and finished["attempt"] == 2
        # Never resumed from, and gone with the job's other checkpoints once it ended. (A new
        # owner clears partial folders when it resumes; one left by a writer that had already
        # lost its lease under load, and was killed later, goes at the end.)
        assert not (stack.storage / "checkpoints" / job_id / partial).exists()
        figures(
            "b.kill_9_during_checkpoint_write",
            step_killed_at=partial_step,
            step_resumed_from=resumed.resumed_from_step,
            seconds_to_recover=round(recovered_s, 2),
        )

    def test_a_cancel_after_kill_9_ends_the_job_cancelled_without_running_it_again(
        self, stack: Stack
    ) -> None:
        first, second, job_id = stack.job_with_a_standby()
        wait_for(lambda: stack.checkpoint_steps(job_id), timeout=60, what="a checkpoint")
        stack.kill_group(first, signal.SIGKILL)
        # The worker is gone: the request waits for the sweeper, which notices the silence.
        response = stack.client.http.post(f"/jobs/{job_id}/cancel")
        assert response.json()["cancel_requested"] is True
        cancelled = now()

        finished = stack.client.wait(job_id, timeout=60)
        seconds = now() - cancelled
        assert finished["status"] == "cancelled", stack.messages(job_id)
        assert finished["attempt"] == 1  # never claimed again, so no model loaded for nothing
        assert not any("re-queued" in m for m in stack.messages(job_id))
        assert stack.checkpoint_steps(job_id) == []
        assert second.poll() is None
        figures("i.cancel_after_kill_9", seconds_to_cancelled=round(seconds, 2))
