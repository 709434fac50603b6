"""The `tunery` command: keys, migrate, and `tunery up` started and stopped like a person would."""

import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
from sqlalchemy import inspect

from shared.db import engine_for
from tests.processes import free_port, start, stop, tunery_environment, wait_for


def tunery(*args: str, environment: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shared.cli", *args],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )


class TestKeysCreate:
    def test_prints_the_key_alone_on_its_last_line(self, home: Path, tmp_path: Path):
        environment = tunery_environment(home=str(home))
        result = tunery("keys", "create", "ci", "--project", "search", environment=environment)
        assert result.returncode == 0, result.stderr
        token = result.stdout.rstrip("\n").splitlines()[-1]
        assert token.startswith("tny_") and " " not in token
        # The key is stored only as a hash.
        database = (home / "tunery.db").read_bytes()
        assert token.split("_", 2)[2].encode() not in database


class TestMigrate:
    def test_upgrades_an_empty_postgresql_database(self, home, tmp_path):
        from tests.conftest import _drop_postgres_database, _fresh_postgres_database

        name, url = _fresh_postgres_database()
        try:
            result = tunery(
                "migrate", environment=tunery_environment(home=str(home), database_url=url)
            )
            assert result.returncode == 0, result.stderr
            assert inspect(engine_for(url)).has_table("jobs")
        finally:
            engine_for(url).dispose()
            _drop_postgres_database(name)


class TestWorker:
    def test_a_worker_that_dies_of_an_error_exits_non_zero(self, home, tmp_path):
        # A supervisor restarts on failure only if the exit code says so. (A stopped worker
        # exits 0: tests/e2e/test_queue.py.)
        log = tmp_path / "worker.log"
        worker = start(["worker"], tunery_environment(home=str(home)), log)
        try:
            wait_for(lambda: " ready." in log.read_text(), timeout=90, what="the worker")
            messages = home / "queue" / "messages"
            shutil.rmtree(messages)
            messages.write_text("the local queue's folder, replaced by a file")
            exit_code = worker.wait(timeout=60)
        finally:
            stop(worker)
        assert "Unrecoverable error" in log.read_text()
        assert exit_code != 0


class TestUp:
    def test_serves_prints_a_key_and_stops_cleanly_on_ctrl_c(self, home, tmp_path, models_dir):
        port = free_port()
        log = tmp_path / "up.log"
        environment = tunery_environment(home=str(home), models_dir=str(models_dir))
        with open(log, "wb") as output:
            up = subprocess.Popen(
                [sys.executable, "-m", "shared.cli", "up", "--port", str(port)],
                env=environment,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        try:
            base_url = f"http://127.0.0.1:{port}"

            def ready() -> bool:
                try:
                    return httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200
                except httpx.HTTPError:
                    return False

            wait_for(ready, timeout=90, what="tunery up to be ready")
            token = next(line for line in log.read_text().splitlines() if line.startswith("tny_"))
            listed = httpx.get(f"{base_url}/jobs", headers={"Authorization": f"Bearer {token}"})
            assert listed.status_code == 200 and listed.json()["data"] == []
            children = psutil.Process(up.pid).children(recursive=True)
            assert len(children) >= 2  # the API and the worker (and its pool)

            up.send_signal(signal.SIGINT)  # what Ctrl-C sends
            started = time.monotonic()
            assert up.wait(timeout=60) == 0, log.read_text()
            stopped_in = time.monotonic() - started
            assert not [
                child
                for child in children
                if child.is_running() and child.status() != psutil.STATUS_ZOMBIE
            ]
            assert stopped_in < 30
        finally:
            if up.poll() is None:
                up.kill()

    def test_a_port_in_use_is_said_in_one_line_before_anything_starts(self, home):
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            done = subprocess.run(
                [sys.executable, "-m", "shared.cli", "up", "--port", str(port)],
                env=tunery_environment(home=str(home)),
                capture_output=True,
                text=True,
                timeout=60,
            )
        assert done.returncode == 1
        assert "Tunery is up" not in done.stdout
        [line] = done.stderr.splitlines()
        assert f"port {port} on 127.0.0.1 is in use" in line
        assert not home.exists()  # no database, no key, nothing

    def test_up_is_said_once_the_api_answers_and_readyz_counts_its_worker(
        self, home, tmp_path, models_dir
    ):
        port = free_port()
        log = tmp_path / "up.log"
        environment = tunery_environment(home=str(home), models_dir=str(models_dir))
        with open(log, "wb") as output:
            up = subprocess.Popen(
                [sys.executable, "-m", "shared.cli", "up", "--port", str(port)],
                env=environment,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_for(lambda: "Tunery is up" in log.read_text(), timeout=90, what="tunery up")
            # Said only once the API answers, not before.
            assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
            wait_for(
                lambda: httpx.get(f"http://127.0.0.1:{port}/readyz").json()["workers"] == 1,
                timeout=60,
                what="the worker's first heartbeat",
            )
        finally:
            up.send_signal(signal.SIGINT)
            up.wait(timeout=60)

    def test_a_second_start_on_the_same_home_prints_no_new_key(self, home, tmp_path):
        environment = tunery_environment(home=str(home))
        assert tunery("keys", "create", "first", environment=environment).returncode == 0
        port = free_port()
        up = subprocess.Popen(
            [sys.executable, "-m", "shared.cli", "up", "--port", str(port)],
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            wait_for(lambda: _answers(port), timeout=90, what="tunery up")
        finally:
            up.send_signal(signal.SIGINT)
            output, _ = up.communicate(timeout=60)
        assert "tny_" not in output


def _answers(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
