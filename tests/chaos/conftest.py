"""Fault tests on the production stack: real `tunery api` and `tunery worker` processes on
PostgreSQL and Redis, with short timeouts so that a lost worker is noticed in seconds.

Each test prints one `CHAOS` line with its figures (step killed at, step resumed from, seconds
to recover); `pytest -s tests/chaos` shows them.
"""

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Row, select, text

from shared.db import engine_for
from shared.models import Job, JobEvent
from tests.e2e.client import TuneryClient
from tests.e2e.conftest import home, postgres_url, pytest_runtest_makereport, redis_url  # noqa: F401
from tests.e2e.test_training import learnable_text
from tests.processes import make_key, running_api, start, stop, tunery_environment, wait_for
from tests.tiny_model import build_tiny_model

TINY = "tiny-gpt2"
WIDE = "wide-gpt2"  # ~3.5M parameters: a checkpoint takes long enough to kill in the middle
# Long enough to interrupt in the middle on two slow cores, short enough for the suite.
TRAINING = {
    "max_steps": 300,
    "block_size": 32,
    "batch_size": 4,
    "learning_rate": 3e-3,
    "seed": 5,
}
FAST_RECOVERY = {
    "heartbeat_timeout_s": "3",
    "sweep_interval_s": "0.5",
    "requeue_unclaimed_after_s": "3",
    "checkpoint_interval_s": "1",
    "max_attempts": "5",
}

BACKENDS = text(
    "SELECT pid, state, wait_event_type, query FROM pg_stat_activity "
    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
)


def figures(test: str, **values: Any) -> None:
    print(f"\nCHAOS {test} {json.dumps(values, sort_keys=True)}")


class Stack:
    """The API, any number of workers, and direct reads of the job row."""

    def __init__(self, environment: dict[str, str], tmp_path: Path, client: TuneryClient) -> None:
        self.environment = environment
        self.tmp_path = tmp_path
        self.client = client
        self.engine = engine_for(environment["TUNERY_DATABASE_URL"])
        self.workers: list[subprocess.Popen[bytes]] = []
        self.storage = Path(environment["TUNERY_STORAGE_URL"].removeprefix("file://"))

    def log(self, name: str) -> Path:
        return self.tmp_path / f"{name}.log"

    def start_worker(self, name: str, **settings: str) -> subprocess.Popen[bytes]:
        environment = {**self.environment}
        environment.update({f"TUNERY_{k.upper()}": v for k, v in settings.items()})
        worker = start(["worker"], environment, self.log(name))
        self.workers.append(worker)
        return worker

    def wait_ready(self, name: str, worker: subprocess.Popen[bytes]) -> None:
        def ready() -> bool:
            if worker.poll() is not None:
                raise RuntimeError(f"worker {name} exited:\n{self.log(name).read_text()[-3000:]}")
            return self.log(name).exists() and " ready." in self.log(name).read_text()

        wait_for(ready, timeout=90, what=f"worker {name}")

    def job_with_a_standby(
        self,
    ) -> tuple[subprocess.Popen[bytes], subprocess.Popen[bytes], str]:
        """Worker "first" training a new job past its first step, and worker "second" ready to
        take it over: (first, second, job id)."""
        first = self.start_worker("first")
        self.wait_ready("first", first)
        job_id = self.create_job()
        self.wait_step(job_id, 1)
        second = self.start_worker("second")
        self.wait_ready("second", second)
        return first, second, job_id

    def create_job(self, base_model: str = TINY, **hyperparameters: Any) -> str:
        dataset = self.client.upload(learnable_text())
        job = self.client.create_job(
            base_model=base_model,
            dataset_id=dataset["id"],
            validation_split=0.0,
            hyperparameters={**TRAINING, **hyperparameters},
        )
        return job["id"]

    def row(self, job_id: str) -> Job:
        with self.engine.connect() as connection:
            return connection.execute(select(Job).where(Job.id == job_id)).one()

    def messages(self, job_id: str) -> list[str]:
        with self.engine.connect() as connection:
            return list(
                connection.scalars(
                    select(JobEvent.message).where(JobEvent.job_id == job_id).order_by(JobEvent.seq)
                )
            )

    def backends(self) -> list[Row[Any]]:
        """The database's other server processes: pid, state ("active", "idle in
        transaction"...), wait_event_type ("Lock"...) and their latest query."""
        # A connection of its own each time: within a transaction the view does not change.
        with self.engine.connect() as connection:
            return list(connection.execute(BACKENDS))

    def step(self, job_id: str) -> int:
        return int((self.row(job_id).progress or {}).get("step") or 0)

    def wait_step(self, job_id: str, at_least: int, timeout: float = 120) -> int:
        return wait_for(
            lambda: self.row(job_id).status == "running" and self.step(job_id) >= at_least,
            timeout=timeout,
            interval=0.05,
            what=f"job {job_id} at step {at_least}",
        ) and self.step(job_id)

    def checkpoint_steps(self, job_id: str) -> list[int]:
        listed = self.client.http.get(f"/jobs/{job_id}/checkpoints").json()["data"]
        return [checkpoint["step"] for checkpoint in listed]

    def wait_resumed(self, job_id: str, attempt: int, timeout: float = 120) -> Job:
        """The job running again as `attempt`, past its resume point."""

        def resumed() -> Job | None:
            row = self.row(job_id)
            if row.status in ("succeeded", "failed", "cancelled") or (
                row.attempt >= attempt and row.resumed_from_step is not None
            ):
                return row
            return None

        return wait_for(resumed, timeout=timeout, interval=0.1, what=f"{job_id} resumed")

    def kill_group(self, worker: subprocess.Popen[bytes], signum: int = signal.SIGKILL) -> None:
        os.killpg(worker.pid, signum)
        if signum == signal.SIGKILL:
            worker.wait(timeout=30)


@pytest.fixture(scope="session")
def chaos_models(models_dir: Path) -> Path:
    """The shared models directory, plus a wider GPT-2 with the tiny one's tokenizer."""
    target = models_dir / WIDE
    if not (target / "config.json").is_file():
        build_tiny_model(models_dir, WIDE, layers=4, width=256, heads=4, positions=128, seed=0)
    return models_dir


def mount_small_filesystem(folder: Path, megabytes: int) -> None:
    """A size-limited tmpfs at `folder` (needs root); the test is skipped where mount fails."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here: {mounted.stderr.strip()}")


@pytest.fixture
def stack(
    request: pytest.FixtureRequest,
    postgres_url,  # noqa: F811
    redis_url,  # noqa: F811
    chaos_models,
    home,  # noqa: F811
    tmp_path,
) -> Iterator[Stack]:
    small = request.node.get_closest_marker("small_filesystem")
    if small is not None:
        folder, megabytes = tmp_path / small.args[0], small.args[1]
        mount_small_filesystem(folder, megabytes)
        request.addfinalizer(lambda: subprocess.run(["umount", "-l", str(folder)], check=False))
    extra = request.node.get_closest_marker("tunery_settings")
    environment = tunery_environment(
        home=str(home),
        database_url=postgres_url,
        broker_url=redis_url,
        models_dir=str(chaos_models),
        storage_url=f"file://{tmp_path / 'storage'}",
        **FAST_RECOVERY,
        **(extra.kwargs if extra is not None else {}),
    )
    token = make_key(environment)
    with running_api(environment, tmp_path / "api.log") as base_url:
        built = Stack(environment, tmp_path, TuneryClient(base_url, token))
        try:
            yield built
        finally:
            for worker in built.workers:
                if worker.poll() is None:
                    os.killpg(worker.pid, signal.SIGCONT)
                stop(worker, timeout=20)
            built.engine.dispose()


def now() -> float:
    return time.monotonic()
