"""What the training loop's callback sends to the database, step by step."""

from pathlib import Path
from types import SimpleNamespace

import pytest
from transformers import TrainerControl, TrainerState, TrainingArguments

from shared import jobs
from shared.db import session_scope
from tests.worker.conftest import MakeDataset, MakeJob
from tests.worker.helpers import learnable_text, metrics_of, statements_sent
from worker import trainer
from worker.lease import Lease
from worker.trainer import JobCallback


def test_a_logging_step_reads_the_cancel_flag_in_its_metric_write_and_stops(
    make_dataset: MakeDataset, make_job: MakeJob, tmp_path: Path
) -> None:
    job_id, attempt = make_job(make_dataset(learnable_text(10)), block_size=32)
    callback = JobCallback(Lease(job_id, attempt), tokens_per_step=256)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    state = TrainerState(max_steps=10, global_step=0)
    callback.on_train_begin(args, state, TrainerControl())

    def step(logs: bool, saves: bool = False) -> tuple[TrainerControl, list[str]]:
        # As Trainer does: its flow callback has decided whether this step logs and saves.
        state.global_step += 1
        control = TrainerControl(should_log=logs, should_save=saves)
        with statements_sent() as sent:
            control = callback.on_step_end(args, state, control)
            if control.should_log:
                control = callback.on_log(args, state, control, logs={"loss": 2.0})
        return control, sent

    control, sent = step(logs=False)
    assert sent == ["SELECT"] and not control.should_training_stop  # the cancel poll

    control, sent = step(logs=True)
    assert sent == ["UPDATE", "INSERT"] and not control.should_training_stop

    with session_scope() as session:
        jobs.cancel(session, job_id)
    control, sent = step(logs=True, saves=True)
    # The metric row's heartbeat saw the cancel: this step is the last one.
    assert sent == ["UPDATE", "INSERT"]
    assert control.should_training_stop and not control.should_save
    assert [row.step for row in metrics_of(job_id)] == [2, 3]


def test_the_rate_is_measured_between_logged_steps_where_the_device_has_caught_up(
    make_dataset: MakeDataset,
    make_job: MakeJob,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A GPU's pattern: the host ends steps 1 to 3 at once, ahead of the device, and the logged
    # step 4 returns once the loss is read, when the device has done all four steps (0.1 s each).
    job_id, attempt = make_job(make_dataset(learnable_text(10)), block_size=32)
    callback = JobCallback(Lease(job_id, attempt), tokens_per_step=256)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    state = TrainerState(max_steps=8, global_step=0)
    now = [0.0]
    monkeypatch.setattr(trainer, "time", SimpleNamespace(monotonic=lambda: now[0]))
    step_ends = [0.01, 0.02, 0.03, 0.4, 0.41, 0.42, 0.43, 0.8]  # seconds, on the host's clock

    callback.on_train_begin(args, state, TrainerControl())
    reported = []
    for step, ended_at in enumerate(step_ends, start=1):
        now[0], state.global_step = ended_at, step
        control = TrainerControl(should_log=step % 4 == 0)
        callback.on_step_end(args, state, control)
        if control.should_log:
            callback.on_log(args, state, control, logs={"loss": 2.0})
        reported.append(callback.last_progress["tokens_per_second"])

    # 4 x 256 tokens in 0.4 s, at both logged steps; timed a step at a time, the same host clock
    # read 256 tokens in 0.37 s (692 tokens/s), and 25,600 tokens/s between.
    assert [row.tokens_per_second for row in metrics_of(job_id)] == [
        pytest.approx(2560),
        pytest.approx(2560),
    ]
    assert reported == [None] * 3 + [pytest.approx(2560)] * 5
    assert callback.last_progress["eta_seconds"] == 0.0
