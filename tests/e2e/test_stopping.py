"""Stopping Tunery as people stop it, on the embedded defaults (SQLite, the local queue): Ctrl-C
of `tunery up` (SIGINT to its process group, as a terminal sends it) and SIGTERM to a bare
`tunery worker`. A stop in the middle of training writes a checkpoint, hands the job back
without spending an attempt, and exits promptly; the next start resumes the job from that
checkpoint, and it ends with the loss of a run that was never stopped."""

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import TINY_MODEL
from tests.e2e.client import TuneryClient
from tests.e2e.test_training import learnable_text
from tests.processes import free_port, make_key, start, tunery_environment, wait_for

# Long enough to be stopped three times on a fast machine, short on a slow one.
HYPERPARAMETERS = {"max_steps": 800, "block_size": 32, "batch_size": 4, "seed": 11}
# "the job resumes from its checkpoint at step N"
HANDED_BACK = re.compile(r"job re-queued: the worker is shutting down; .* at step (\d+)$")
# Ctrl-C, then one step boundary and one checkpoint of the tiny model (0.01 s), then exit.
STOP_S = 15


class Up:
    """`tunery up` on one home, in a process group of its own as in a terminal."""

    def __init__(self, environment: dict[str, str], port: int, log: Path) -> None:
        self.port = port
        self.log = log
        with open(log, "ab") as output:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "shared.cli", "up", "--port", str(port)],
                env=environment,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.started = log.read_text().count(" ready.")
        wait_for(self.ready, timeout=120, what="tunery up's API and worker")

    def ready(self) -> bool:
        assert self.process.poll() is None, "tunery up exited"
        if self.log.read_text().count(" ready.") <= self.started:  # this start's worker
            return False
        try:
            return httpx.get(f"http://127.0.0.1:{self.port}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def ctrl_c(self) -> float:
        """SIGINT to the group, as a terminal's Ctrl-C; seconds until `tunery up` exited."""
        started = time.monotonic()
        os.killpg(self.process.pid, signal.SIGINT)
        assert self.process.wait(timeout=STOP_S * 4) == 0
        return time.monotonic() - started

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


@pytest.fixture
def environment(home: Path, models_dir: Path) -> dict[str, str]:
    return tunery_environment(home=str(home), models_dir=str(models_dir))


def create_job(client: TuneryClient, dataset_id: str) -> str:
    return client.create_job(
        base_model=TINY_MODEL, dataset_id=dataset_id, hyperparameters=HYPERPARAMETERS
    )["id"]


def wait_training(client: TuneryClient, job_id: str, past_step: int) -> None:
    def training() -> bool:
        job = client.job(job_id)
        assert job["status"] in ("queued", "running"), job
        return job["status"] == "running" and job["progress"]["step"] > past_step

    wait_for(training, timeout=120, interval=0.05, what=f"job {job_id} past step {past_step}")


def handed_back_at(client: TuneryClient, job_id: str) -> int:
    """The step of the job's last hand-back, which its checkpoints must hold."""
    steps = [int(m[1]) for e in client.events(job_id) if (m := HANDED_BACK.search(e["message"]))]
    assert steps, [event["message"] for event in client.events(job_id)]
    return steps[-1]


def uninterrupted(client: TuneryClient, dataset_id: str) -> dict[str, Any]:
    job = client.wait(create_job(client, dataset_id), timeout=300)
    assert job["status"] == "succeeded" and job["attempt"] == 1, job
    return job["metrics"]


@pytest.fixture
def up_on(environment: dict[str, str], tmp_path: Path) -> Iterator[Any]:
    """Starts `tunery up` on the test's home, on the same port each time; all are killed at
    the end if a test leaves one running."""
    port, started = free_port(), []

    def up() -> Up:
        started.append(Up(environment, port, tmp_path / "up.log"))
        return started[-1]

    yield up
    for each in started:
        each.kill()


def test_ctrl_c_three_times_the_job_resumes_each_time_and_ends_as_if_never_stopped(
    up_on: Any, tmp_path: Path
) -> None:
    up = up_on()
    token = next(line for line in up.log.read_text().splitlines() if line.startswith("tny_"))
    client = TuneryClient(f"http://127.0.0.1:{up.port}", token)
    dataset_id = client.upload(learnable_text())["id"]
    expected = uninterrupted(client, dataset_id)
    job_id = create_job(client, dataset_id)

    resumed_from = 0
    for _ in range(3):
        wait_training(client, job_id, past_step=resumed_from + 20)
        stopped_in = up.ctrl_c()
        assert stopped_in < STOP_S

        up = up_on()
        job = client.job(job_id)
        checkpoint = handed_back_at(client, job_id)
        assert checkpoint > resumed_from
        held = [c["step"] for c in client.http.get(f"/jobs/{job_id}/checkpoints").json()["data"]]
        assert checkpoint in held  # still there, unless the new start already finished the job
        wait_for(
            lambda: client.job(job_id)["resumed_from_step"] == checkpoint,  # noqa: B023
            timeout=120,
            what=f"the job to resume from step {checkpoint}",
        )
        resumed_from = checkpoint
        assert job["status"] in ("queued", "running")

    finished = client.wait(job_id, timeout=300)
    up.ctrl_c()
    assert finished["status"] == "succeeded", client.events(job_id)
    # Four claims, three clean hand-backs: no attempt was lost, so none counts.
    assert finished["attempt"] == 4 and finished["error"] is None
    assert finished["resumed_from_step"] == resumed_from
    assert finished["metrics"]["train_loss"] == pytest.approx(expected["train_loss"], rel=1e-5)
    assert finished["metrics"]["eval_loss"] == pytest.approx(expected["eval_loss"], rel=1e-5)


def _answers(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_sigterm_to_a_bare_worker_hands_its_job_to_the_next_one(
    environment: dict[str, str], tmp_path: Path
) -> None:
    port = free_port()
    api = start(["api", "--port", str(port)], environment, tmp_path / "api.log")
    workers: list[subprocess.Popen[bytes]] = []

    def worker() -> subprocess.Popen[bytes]:
        log = tmp_path / "worker.log"
        before = log.read_text().count(" ready.") if log.exists() else 0
        workers.append(start(["worker"], environment, log))
        wait_for(lambda: log.read_text().count(" ready.") > before, timeout=120, what="the worker")
        return workers[-1]

    def workers_alive() -> int:
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).json()["workers"]

    try:
        client = TuneryClient(f"http://127.0.0.1:{port}", make_key(environment))
        wait_for(lambda: api.poll() is None and _answers(port), timeout=60, what="the API")
        assert workers_alive() == 0
        first = worker()
        wait_for(lambda: workers_alive() == 1, timeout=30, what="the worker's first beat")
        dataset_id = client.upload(learnable_text())["id"]
        expected = uninterrupted(client, dataset_id)
        job_id = create_job(client, dataset_id)
        wait_training(client, job_id, past_step=20)

        first.send_signal(signal.SIGTERM)  # the main process alone, as `docker stop` does
        signalled = time.monotonic()
        assert first.wait(timeout=STOP_S * 4) == 0
        assert time.monotonic() - signalled < STOP_S
        assert workers_alive() == 0  # it said goodbye; no heartbeat timeout to wait for
        assert client.job(job_id)["status"] == "queued"
        checkpoint = handed_back_at(client, job_id)

        worker()
        finished = client.wait(job_id, timeout=300)
        assert finished["status"] == "succeeded", client.events(job_id)
        assert (finished["attempt"], finished["resumed_from_step"]) == (2, checkpoint)
        assert finished["metrics"]["eval_loss"] == pytest.approx(expected["eval_loss"], rel=1e-5)
    finally:
        for process in [*workers, api]:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
