"""Checkpoints inside a training run: when to write one, how it reaches storage, how a re-claimed
job resumes from the newest complete one.

Trainer writes the checkpoint itself (`Trainer._save_checkpoint`: weights, optimizer,
scheduler, RNG states, `trainer_state.json` with the step) into the local work folder when
`CheckpointCallback` sets `control.should_save`; `on_save` then moves it into storage whole
(`shared.checkpoints.write`, a rename where both share a filesystem) and deletes what is left.
`Trainer.train(resume_from_checkpoint=)` restores all of it and skips the batches already seen:
the data order is a function of the seed and the epoch (accelerate's seedable sampler), so the
resumed run sees exactly the batches the lost one would have.
"""

import logging
import shutil
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from shared import checkpoints, storage
from shared.checkpoints import Checkpoint, CorruptCheckpoint
from worker import shutdown
from worker.errors import LeaseLost
from worker.lease import Lease
from worker.trainer import finite

logger = logging.getLogger(__name__)

# What Trainer needs to resume exactly; a checkpoint without one of them is not used.
REQUIRED_FILES = ("trainer_state.json", "optimizer.pt", "scheduler.pt", "rng_state.pth")


def restore_newest(lease: Lease, folder: Path) -> tuple[Checkpoint, Path] | None:
    """Copy the newest complete, verified checkpoint of the job to `folder`; None if none.

    A damaged checkpoint is reported and skipped for the one before it. Temporary folders of a
    writer that died (or lost its claim) are removed first: they are never resumed from.
    """
    job_id = lease.job_id
    storage.delete_partials(storage.checkpoints_key(job_id))
    for candidate in checkpoints.list_complete(job_id):
        target = folder / f"checkpoint-{candidate.step}"
        try:
            missing = [name for name in REQUIRED_FILES if name not in candidate.manifest["files"]]
            if missing:
                raise CorruptCheckpoint(f"step {candidate.step}: no {', '.join(missing)}")
            return checkpoints.copy_out(job_id, candidate.step, target), target
        except CorruptCheckpoint as error:
            lease.event(
                f"checkpoint skipped, it is damaged: {error}",
                level="warning",
                data={"step": candidate.step},
            )
    return None


class CheckpointCallback(TrainerCallback):
    """Sets `should_save` every `interval_s` seconds and when the worker is shutting down, and
    moves each saved checkpoint into storage.

    It also keeps the sum of the training loss over every step since step 0 (restored from the
    checkpoint on resume), so that the job's `train_loss` is the mean over the whole run
    whether or not the run was interrupted: Trainer's own `training_loss` only averages the
    steps of the latest `train()` call. A checkpoint step is always a logging step, so the sum
    at a checkpoint covers exactly the steps before it.
    """

    def __init__(self, lease: Lease, interval_s: float, resumed: Checkpoint | None) -> None:
        self.lease = lease
        self.interval_s = interval_s
        self.resumed_step = resumed.step if resumed else 0
        self.resumed_loss_sum = float(resumed.manifest.get("loss_sum", 0.0)) if resumed else 0.0
        self.loss_sum = self.resumed_loss_sum
        self.handing_back = False
        self.last_saved_step: int | None = None
        self._logged_step = self.resumed_step
        self._last_logs: dict[str, float] = {}
        self._last_save = time.monotonic()

    def run_train_loss(self, session_loss: float, state: TrainerState) -> float | None:
        """Mean training loss over all steps of the job, across attempts."""
        steps = state.global_step
        if steps <= 0:
            return None
        session_steps = steps - self.resumed_step
        return finite((self.resumed_loss_sum + session_loss * session_steps) / steps)

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        self._logged_step = state.global_step
        self._last_save = time.monotonic()

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> TrainerControl:
        if self.lease.should_stop or state.global_step >= state.max_steps:
            return control  # stopping for good, or the last step: nothing left to resume
        stopping = shutdown.requested()
        if stopping or time.monotonic() - self._last_save >= self.interval_s:
            control.should_save = True
            # Log on the same step: the loss window is drained into `loss_sum` first.
            control.should_log = True
        if stopping:
            control.should_training_stop = True
            self.handing_back = True
        return control

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **_: Any,
    ) -> None:
        if logs and "loss" in logs:
            self.loss_sum += float(logs["loss"]) * (state.global_step - self._logged_step)
            self._logged_step = state.global_step
            self._last_logs = logs

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        local = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        try:
            self._store(local, state)
        finally:
            shutil.rmtree(local, ignore_errors=True)
        self._last_save = time.monotonic()

    def _store(self, local: Path, state: TrainerState) -> None:
        step = state.global_step
        info = {
            "attempt": self.lease.attempt,
            "loss_sum": self.loss_sum,
            "metrics": {
                "train_loss": finite(self._last_logs.get("loss")),
                "learning_rate": finite(self._last_logs.get("learning_rate")),
                "epoch": finite(state.epoch),
            },
        }

        def still_ours() -> None:
            # The fence before the rename: a worker that lost its claim (paused past its
            # lease, say) must not publish a checkpoint for the job's new owner.
            self.lease.poll(force=True)
            if self.lease.lost:
                raise LeaseLost(f"job {self.lease.job_id} attempt {self.lease.attempt}")

        started = time.monotonic()
        checkpoints.write(self.lease.job_id, step, local, info, before_commit=still_ours)
        checkpoints.prune(self.lease.job_id)
        self.last_saved_step = step
        logger.info(
            "job %s: checkpoint at step %s stored in %.2f s",
            self.lease.job_id,
            step,
            time.monotonic() - started,
        )

    def report_disk_full(self, step: int) -> None:
        """Say, before the job fails, whether the checkpoint before the failed one survived."""
        previous = None
        for candidate in checkpoints.list_complete(self.lease.job_id):
            try:
                previous = checkpoints.verify(self.lease.job_id, candidate.step)
                break
            except CorruptCheckpoint:
                continue
        detail = (
            f"the checkpoint at step {previous.step} is intact (every file verified)"
            if previous
            else "no earlier checkpoint exists"
        )
        self.lease.event(
            f"the disk is full: the checkpoint at step {step} was not written; {detail}",
            level="error",
            data={"step": step, "previous_step": previous.step if previous else None},
        )
