"""Real `tunery` processes for tests: an API server and workers, started and stopped cleanly."""

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def tunery_environment(**settings: str) -> dict[str, str]:
    """The current environment without TUNERY_ settings, plus the given ones."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("TUNERY_")}
    environment.update({f"TUNERY_{key.upper()}": value for key, value in settings.items()})
    environment["PYTHONUNBUFFERED"] = "1"
    return environment


def start(args: list[str], environment: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """Start `tunery ARGS` in its own process group, so the whole tree can be signalled."""
    with open(log, "ab") as output:
        return subprocess.Popen(
            [sys.executable, "-m", "shared.cli", *args],
            env=environment,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def make_key(environment: dict[str, str], name: str = "tests") -> str:
    """A new API key from `tunery keys create`, which prints it alone on its last line."""
    result = subprocess.run(
        [sys.executable, "-m", "shared.cli", "keys", "create", name],
        env=environment,
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.strip().splitlines()[-1]


def stop(process: subprocess.Popen[bytes], timeout: float = 30) -> int:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return process.returncode


def wait_until_ready(base_url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the API exited early:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"the API did not become ready:\n{log.read_text()[-4000:]}")


@contextmanager
def running_api(environment: dict[str, str], log: Path) -> Iterator[str]:
    """`tunery api` on a free port; yields its base URL."""
    port = free_port()
    process = start(["api", "--port", str(port)], environment, log)
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(base_url, process, log)
        yield base_url
    finally:
        stop(process)


@contextmanager
def running_worker(environment: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    process = start(["worker"], environment, log)
    try:
        yield process
    finally:
        stop(process)


def wait_for(predicate, timeout: float, interval: float = 0.2, what: str = "condition"):  # noqa: ANN001, ANN201
    """Poll `predicate` until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
