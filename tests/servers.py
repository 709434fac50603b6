"""Private PostgreSQL and Redis servers: each test session (and each benchmark run) starts its
own, in a temporary folder on free ports, on first use, and stops them at the end.

The machine's own servers belong to whoever else uses them: no test connects to them, let alone
flushes, stops or restarts them. These ones belong to the session, so a test may empty them or,
as the chaos tests do, stop and start them again.
"""

import atexit
import os
import shutil
import subprocess
import tempfile
import time
from functools import lru_cache
from pathlib import Path

import redis

from tests.processes import free_port

# PostgreSQL refuses to run as root: as root, its commands run as this system user.
POSTGRES_USER = "postgres"


class _Server:
    """A server process of ours, with its folder; subclasses start and stop it."""

    name = "server"

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix=f"tunery-test-{self.name}-"))
        self.port = free_port()

    def up(self) -> bool:
        raise NotImplementedError

    def wait(self, up: bool, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.up() != up:
            if time.monotonic() > deadline:
                state = "start" if up else "stop"
                raise TimeoutError(f"the test {self.name} did not {state}:\n{self.log_tail()}")
            time.sleep(0.05)

    def log_tail(self) -> str:
        log = self.folder / f"{self.name}.log"
        return log.read_text(errors="replace")[-3000:] if log.exists() else "(no log)"

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


class PostgresServer(_Server):
    name = "postgres"

    def __init__(self) -> None:
        super().__init__()
        self.data = self.folder / "data"
        as_root = os.geteuid() == 0
        self._as_owner = ["runuser", "-u", POSTGRES_USER, "--"] if as_root else []
        if as_root:
            shutil.chown(self.folder, POSTGRES_USER)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync")

    def _run(self, *command: str) -> None:
        done = subprocess.run([*self._as_owner, *command], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout}{done.stderr}")

    @property
    def admin_url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        # Test data: durability settings off, for speed; connections for many API processes.
        options = (
            f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=300"
        )
        log = str(self.folder / "postgres.log")
        self._run("pg_ctl", "-D", str(self.data), "-l", log, "-o", options, "-w", "start")
        self.wait(up=True)

    def stop(self) -> None:
        if self.data.exists() and (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def up(self) -> bool:
        ready = subprocess.run(
            ["pg_isready", "-q", "-h", "127.0.0.1", "-p", str(self.port)], capture_output=True
        )
        return ready.returncode == 0


class RedisServer(_Server):
    name = "redis"

    def __init__(self) -> None:
        super().__init__()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def database_url(self, number: int) -> str:
        return f"redis://127.0.0.1:{self.port}/{number}"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.folder),
                "--logfile",
                str(self.folder / "redis.log"),
            ],
            start_new_session=True,
        )
        self.wait(up=True)

    def stop(self) -> None:
        """As a crash does: nothing saved (it saves nothing anyway)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)
        self.process = None

    def up(self) -> bool:
        try:
            client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1)
            with client:
                return bool(client.ping())
        except redis.RedisError:
            return False


@lru_cache
def postgres() -> PostgresServer:
    """This session's PostgreSQL, started on first use."""
    server = PostgresServer()
    atexit.register(_stop_and_remove, server)
    server.start()
    return server


@lru_cache
def redis_server() -> RedisServer:
    """This session's Redis, started on first use."""
    server = RedisServer()
    atexit.register(_stop_and_remove, server)
    server.start()
    return server


def _stop_and_remove(server: PostgresServer | RedisServer) -> None:
    try:
        server.stop()
    finally:
        server.remove()
