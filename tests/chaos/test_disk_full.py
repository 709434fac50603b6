"""A full disk while a checkpoint is written, in storage or in the worker's work folder where
Trainer writes it first: the job fails as disk_full (our error, not the caller's), and an event
says that the checkpoint before it is intact."""

import hashlib
import json
import os
import time

import pytest

from tests.chaos.conftest import Stack, figures
from tests.processes import wait_for
from worker.checkpoints import REQUIRED_FILES


def fill(folder: os.PathLike[str], leave_bytes: int) -> None:
    """Take all but `leave_bytes` of the filesystem's free space."""
    free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
    with open(os.path.join(folder, "filler"), "wb") as stream:
        stream.truncate(0)
        remaining = max(0, free - leave_bytes)
        block = b"\0" * (1 << 20)
        while remaining > 0:
            remaining -= stream.write(block[: min(len(block), remaining)])


def disk_full_report(stack: Stack, job_id: str) -> tuple[int, int]:
    """The steps of the checkpoint that was not written and of the intact one before it, as
    the job's "the disk is full" event names them."""
    report = next(m for m in stack.messages(job_id) if m.startswith("the disk is full"))
    assert "is intact (every file verified)" in report, report
    failed_step = int(report.split("checkpoint at step ")[1].split(" ")[0])
    intact_step = int(report.split("; the checkpoint at step ")[1].split(" ")[0])
    assert failed_step > intact_step, report
    return failed_step, intact_step


class TestDiskFull:
    @pytest.mark.small_filesystem("storage", 24)
    def test_a_full_disk_fails_the_job_as_disk_full_and_keeps_the_checkpoint_before(
        self, stack: Stack
    ) -> None:
        worker = stack.start_worker("worker")
        stack.wait_ready("worker", worker)
        # Long enough to reach the next checkpoint: 300 steps can end before it on a fast machine,
        # and the full disk then fails the packaging instead.
        job_id = stack.create_job(max_steps=3000)
        steps = wait_for(lambda: stack.checkpoint_steps(job_id), timeout=90, what="a checkpoint")
        folder = stack.storage / "checkpoints" / job_id / f"step-{steps[0]:09d}"
        manifest = json.loads((folder / "checkpoint.json").read_text())
        # Every file of that checkpoint as it is now, read by the test itself.
        before = {
            name: hashlib.sha256((folder / name).read_bytes()).hexdigest()
            for name in manifest["files"]
        }
        assert before == {name: facts["sha256"] for name, facts in manifest["files"].items()}
        fill(stack.storage, leave_bytes=256 * 1024)  # less than one checkpoint

        failed = stack.client.wait(job_id, timeout=120)
        assert failed["status"] == "failed", stack.messages(job_id)
        assert failed["error"]["code"] == "disk_full"
        assert failed["error"]["user_error"] is False
        failed_step, intact_step = disk_full_report(stack, job_id)
        assert intact_step >= steps[0]
        # Nothing is left behind on the full volume: the partial write and, the job having
        # ended, its checkpoints.
        assert not (stack.storage / "checkpoints" / job_id).exists()
        assert worker.poll() is None
        figures(
            "g.disk_full",
            step_failed_at=failed_step,
            previous_checkpoint_intact_at=intact_step,
            step_resumed_from=None,
        )

    @pytest.mark.small_filesystem("home/work", 24)
    def test_a_full_work_folder_fails_the_job_as_disk_full_though_torch_save_hides_why(
        self, stack: Stack
    ) -> None:
        # The work folder lies under TUNERY_HOME. Trainer's own optimizer file goes through
        # torch.save, whose error on a short write carries no errno: "unexpected pos 576 vs 534".
        worker = stack.start_worker("worker", checkpoint_interval_s="2")
        stack.wait_ready("worker", worker)
        job_id = stack.create_job(max_steps=3000)  # long enough to reach the next checkpoint
        steps = wait_for(lambda: stack.checkpoint_steps(job_id), timeout=90, what="a checkpoint")
        folder = stack.storage / "checkpoints" / job_id / f"step-{steps[0]:09d}"
        manifest = json.loads((folder / "checkpoint.json").read_text())
        sizes = {name: facts["bytes"] for name, facts in manifest["files"].items()}
        # Room for what Trainer writes before the optimizer (the model, the tokenizer, with a page
        # per file to spare) and for half the optimizer, so that torch.save is what runs out.
        before_optimizer = sum(size for name, size in sizes.items() if name not in REQUIRED_FILES)
        time.sleep(0.5)  # the stored checkpoint's local copy is deleted just after it is stored
        fill(
            stack.tmp_path / "home" / "work",
            leave_bytes=before_optimizer + 4096 * len(sizes) + sizes["optimizer.pt"] // 2,
        )

        failed = stack.client.wait(job_id, timeout=120)
        assert failed["status"] == "failed", stack.messages(job_id)
        assert failed["error"]["code"] == "disk_full", failed["error"]
        assert failed["error"]["user_error"] is False
        assert "unexpected pos" in stack.log("worker").read_text()  # torch.save's failure
        # The checkpoint before, in storage, is untouched by the full work folder.
        assert disk_full_report(stack, job_id)[1] >= steps[0]
        assert worker.poll() is None
