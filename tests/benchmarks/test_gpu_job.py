"""The GPU session's real job, kept runnable here: device time is too scarce to find a broken
script there. Not a measurement: the smoke job is tiny and eager."""

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPOSITORY


def test_the_job_script_runs_tunery_up_and_checks_and_loads_the_tarball(tmp_path: Path) -> None:
    report = tmp_path / "job.json"
    result = subprocess.run(
        [sys.executable, "benchmarks/gpu_job.py", "--smoke", "--no-compile", "--json", report],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]

    job = json.loads(report.read_text())
    assert job["training"]["total_steps"] == 12
    assert job["tokens_per_second"] > 0 and job["job_reported_tokens_per_second"] > 0
    stages = job["stages_s"]
    assert 0 < stages["post_to_first_step"] < stages["post_to_succeeded"]
    # The tarball matched the job's sha256 and every manifest entry, and its model loaded.
    assert job["manifest_entries"] >= 6
    assert job["loaded"]["parameters"] > 0 and job["loaded"]["loss_on_training_text"] > 0
    assert job["stop_s"] < 30  # tunery up stopped on Ctrl-C's signal
