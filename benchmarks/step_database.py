"""Database time per training step: what `JobCallback` spends on PostgreSQL inside the loop.

A job is queued and claimed on a fresh PostgreSQL database; a real `Lease` and `JobCallback`
then go through steps as Trainer calls them: `on_step_end` at every step and, at a logging
step, `on_log` (the step's metric row). Nothing trains, so the time is the callback's own
work, almost all of it database round trips. Logging and other steps alternate.

    python benchmarks/step_database.py [--steps 400] [--runs 3]
"""

import argparse
import os
import tempfile
import time

from _common import fresh_postgres, median, percentile, print_header, print_table
from transformers import TrainerControl, TrainerState, TrainingArguments

from shared import jobs
from shared.db import session_scope
from shared.settings import get_settings
from tests.rows import queued_job
from worker.lease import Lease
from worker.trainer import JobCallback


def claimed_job() -> tuple[str, int]:
    """A running job, as a worker holds it once it has claimed it."""
    job_id = queued_job("bench")
    with session_scope() as session:
        attempt = jobs.claim(session, job_id)
    assert attempt is not None
    return job_id, attempt


def step_seconds(steps: int, output_dir: str) -> dict[str, list[float]]:
    job_id, attempt = claimed_job()
    callback = JobCallback(Lease(job_id, attempt), tokens_per_step=512)
    args = TrainingArguments(output_dir=output_dir, use_cpu=True, report_to="none")
    state = TrainerState(max_steps=steps, global_step=0)
    callback.on_train_begin(args, state, TrainerControl())
    seconds: dict[str, list[float]] = {"logging": [], "other": []}
    logs = {"loss": 2.0, "learning_rate": 1e-4, "grad_norm": 1.0}
    for index in range(steps):
        logging = index % 2 == 0
        state.global_step += 1
        started = time.perf_counter()
        control = callback.on_step_end(args, state, TrainerControl(should_log=logging))
        if control.should_log:
            callback.on_log(args, state, control, logs=logs)
        seconds["logging" if logging else "other"].append(time.perf_counter() - started)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    print_header("database time per training step (JobCallback, PostgreSQL)")

    runs = []
    with tempfile.TemporaryDirectory() as home, fresh_postgres() as database_url:
        os.environ["TUNERY_DATABASE_URL"] = database_url
        os.environ["TUNERY_HOME"] = home
        get_settings.cache_clear()
        for index in range(args.runs):
            runs.append(step_seconds(args.steps, home))
            print(
                f"   run {index + 1}: logging step {median(runs[-1]['logging']) * 1e3:.2f} ms,"
                f" other step {median(runs[-1]['other']) * 1e3:.2f} ms",
                flush=True,
            )

    print(f"\n{args.steps} steps per run, half of them logging steps; median of {args.runs} runs\n")
    rows = []
    for kind in ("logging", "other"):
        rows.append(
            [
                f"{kind} step",
                median([median(run[kind]) * 1e3 for run in runs]),
                median([percentile(run[kind], 0.9) * 1e3 for run in runs]),
            ]
        )
    print_table(["step", "median ms", "p90 ms"], rows)


if __name__ == "__main__":
    main()
