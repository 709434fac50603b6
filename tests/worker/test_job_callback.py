"""What the training loop's callback sends to the database, step by step."""

from pathlib import Path

from transformers import TrainerControl, TrainerState, TrainingArguments

from shared import jobs
from shared.db import session_scope
from tests.worker.conftest import MakeDataset, MakeJob
from tests.worker.helpers import learnable_text, metrics_of, statements_sent
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
