"""Shared helpers of the benchmark scripts: the machine, throwaway databases, real processes,
medians and result tables.

Every benchmark runs as `python benchmarks/<name>.py` from the repository root; importing this
module puts the repository root on `sys.path`, so `tests.processes` (how the end-to-end tests start
real `tunery api` / `tunery worker` processes) and `tests.servers` (a private PostgreSQL and Redis,
started on first use: a benchmark touches none of the machine's own) are reused rather than
copied.
"""

import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sqlalchemy import create_engine, text  # noqa: E402

from tests import servers  # noqa: E402
from tests.processes import (  # noqa: E402
    free_port,
    running_api,
    running_worker,
    start,
    stop,
    tunery_environment,
    wait_for,
)

__all__ = [
    "ROOT",
    "Stack",
    "free_port",
    "fresh_postgres",
    "fresh_redis",
    "machine",
    "make_key",
    "median",
    "percentile",
    "print_table",
    "rss_bytes",
    "running_bare_app",
    "hwm_bytes",
    "children_minor_faults",
    "running_api",
    "running_worker",
    "service_stack",
    "start",
    "stop",
    "tunery_environment",
    "wait_for",
]


def machine() -> dict[str, str]:
    """What the figures were measured on."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = "unknown"
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f"{kib / 1024**2:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": f"{os.cpu_count()} x {model}",
        "memory": memory,
        "python": platform.python_version(),
    }


def print_header(title: str) -> None:
    info = machine()
    print(f"== {title}")
    print("   " + "; ".join(f"{key}: {value}" for key, value in info.items()))


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (fraction in 0..1)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * len(ordered) + 0.5) - 1))
    return ordered[index]


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A GitHub-flavoured Markdown table, so it pastes into BENCHMARKS.md as it is."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:,.3f}" if abs(value) < 100 else f"{value:,.1f}"
        return str(value)

    cells = [[cell(value) for value in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def rss_bytes(pid: int) -> int:
    """Resident set size of a process now."""
    return _status_kib(pid, "VmRSS")


def hwm_bytes(pid: int) -> int:
    """Peak resident set size of a process so far."""
    return _status_kib(pid, "VmHWM")


def children_minor_faults(pid: int) -> int:
    """Minor page faults so far of a process's children (a worker's pool process)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    # /proc/PID/stat: the fields after the command's closing parenthesis start at the state
    # (field 3); minflt is field 10.
    return sum(
        int(Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[7])
        for child in children
    )


@contextmanager
def fresh_postgres() -> Iterator[str]:
    """A new database (CREATE DATABASE) on the run's own PostgreSQL, migrated, dropped at the
    end."""
    from shared.migrate import upgrade

    admin_url = servers.postgres().admin_url
    name = f"tunery_bench_{uuid.uuid4().hex[:12]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = admin_url.rsplit("/", 1)[0] + f"/{name}"
    try:
        upgrade(url)
        yield url
    finally:
        from shared.db import engine_for

        engine_for(url).dispose()
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@contextmanager
def fresh_redis() -> Iterator[str]:
    """A database number of the run's own Redis, emptied before and after."""
    import redis

    url = servers.redis_server().database_url(random.randint(1, 15))
    client = redis.Redis.from_url(url)
    client.flushdb()
    try:
        yield url
    finally:
        client.flushdb()
        client.close()


def make_key(environment: dict[str, str]) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "shared.cli", "keys", "create", "bench"],
        env=environment,
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    return result.stdout.strip().splitlines()[-1]


@dataclass
class Stack:
    """A running service: its URL, an API key, the database URL and the temporary folder."""

    base_url: str
    token: str
    database_url: str
    environment: dict[str, str]
    folder: Path
    api_pid: int
    worker_pid: int | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def upload(self, name: str, content: bytes) -> str:
        """Upload a dataset file; returns the dataset's id."""
        import httpx

        with httpx.Client(base_url=self.base_url, headers=self.headers, timeout=120) as client:
            response = client.post("/datasets", files={"file": (name, content)})
            return response.raise_for_status().json()["id"]


@contextmanager
def service_stack(
    *,
    worker: bool = False,
    models_dir: Path | None = None,
    extra: dict[str, str] | None = None,
    api_args: Sequence[str] = (),
) -> Iterator[Stack]:
    """`tunery api` (and optionally a `tunery worker`) on a fresh PostgreSQL database and Redis,
    with their home and storage in a temporary folder; everything is stopped and dropped after."""
    with (
        tempfile.TemporaryDirectory(prefix="tunery-bench-") as folder_name,
        fresh_postgres() as database_url,
        fresh_redis() as redis_url,
    ):
        folder = Path(folder_name)
        environment = tunery_environment(
            home=str(folder / "home"),
            database_url=database_url,
            broker_url=redis_url,
            models_dir=str(models_dir or folder / "models"),
            storage_url=f"file://{folder / 'storage'}",
            **(extra or {}),
        )
        token = make_key(environment)
        port = free_port()
        log = folder / "api.log"
        api = start(["api", "--port", str(port), *api_args], environment, log)
        base_url = f"http://127.0.0.1:{port}"
        try:
            from tests.processes import wait_until_ready

            wait_until_ready(base_url, api, log)
            stack = Stack(base_url, token, database_url, environment, folder, api.pid)
            if worker:
                worker_log = folder / "worker.log"
                with running_worker(environment, worker_log) as worker_process:
                    # Measurements are of an idle worker, not of one still starting.
                    wait_for(
                        lambda: (
                            worker_process.poll() is None
                            and " ready." in worker_log.read_text(errors="replace")
                        ),
                        timeout=120,
                        what="the worker to be ready",
                    )
                    stack.worker_pid = worker_process.pid
                    yield stack
            else:
                yield stack
        finally:
            stop(api)


def wait_http(url: str, timeout: float = 60) -> None:
    import httpx

    def up() -> bool:
        try:
            return httpx.get(url, timeout=2).status_code < 500
        except httpx.HTTPError:
            return False

    wait_for(up, timeout=timeout, what=url)


@contextmanager
def running_bare_app(folder: Path, *args: str) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """`benchmarks/bare_app.py` (the reference server) on a free port, answering: (process,
    base URL). Stopped when the block ends; its log is `folder/bare.log`."""
    port = free_port()
    command = [sys.executable, str(ROOT / "benchmarks" / "bare_app.py"), "--port", str(port)]
    with open(folder / "bare.log", "wb") as log:
        bare = subprocess.Popen(
            [*command, *args], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base_url}/constant")
        yield bare, base_url
    finally:
        stop(bare)


def seconds_since(started: float) -> float:
    return time.perf_counter() - started
