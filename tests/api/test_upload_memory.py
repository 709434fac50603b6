"""Uploads against a real API process: a 200 MB dataset streams through without the server's
memory growing with it, and a chunked body over the limit is stopped with 413 and leaves nothing.

The API runs as its own uvicorn process so that its RSS can be measured and the bytes really
cross a socket. One backend (SQLite) is enough here.
"""

import hashlib
import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
from sqlalchemy import create_engine, func
from sqlalchemy import select as sql_select

from shared.db import session_scope
from shared.keys import create_key
from shared.migrate import upgrade
from shared.models import Dataset
from shared.settings import get_settings
from tests.conftest import REPOSITORY
from tests.processes import free_port, stop, tunery_environment

MIB = 1024 * 1024
BOUNDARY = b"tunery-memory-test-3bY8fQ"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY.decode()}"
HEAD = (
    b"--" + BOUNDARY + b"\r\n"
    b'Content-Disposition: form-data; name="format"\r\n\r\ntext\r\n'
    b"--" + BOUNDARY + b"\r\n"
    b'Content-Disposition: form-data; name="file"; filename="big.txt"\r\n'
    b"Content-Type: text/plain\r\n\r\n"
)
TAIL = b"\r\n--" + BOUNDARY + b"--\r\n"


@dataclass
class Server:
    url: str
    port: int
    process: subprocess.Popen[bytes]
    home: Path
    database_url: str
    token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    @property
    def stored(self) -> list[str]:
        folder = self.home / "storage" / "datasets"
        return sorted(path.name for path in folder.iterdir()) if folder.exists() else []

    def dataset_rows(self) -> int:
        engine = create_engine(self.database_url)
        try:
            with engine.connect() as connection:
                return connection.scalar(sql_select(func.count()).select_from(Dataset.__table__))
        finally:
            engine.dispose()


def _prepare_home(home: Path) -> tuple[str, str]:
    """A migrated SQLite database under `home` and an API key in it."""
    database_url = f"sqlite:///{home / 'tunery.db'}"
    with pytest.MonkeyPatch.context() as patch:
        for key in [key for key in os.environ if key.startswith("TUNERY_")]:
            patch.delenv(key)
        patch.setenv("TUNERY_HOME", str(home))
        patch.setenv("TUNERY_DATABASE_URL", database_url)
        get_settings.cache_clear()
        try:
            upgrade(database_url)
            with session_scope() as session:
                token = create_key(session, "memory-test", "memory")
        finally:
            get_settings.cache_clear()
    return database_url, token


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator:
    started: list[Server] = []

    def start(**settings: str) -> Server:
        home = tmp_path / f"home{len(started)}"
        home.mkdir()
        database_url, token = _prepare_home(home)
        port = free_port()
        environment = tunery_environment(
            home=str(home),
            database_url=database_url,
            models_dir=str(tmp_path / "models"),
            **settings,
        )
        log = open(tmp_path / f"api{len(started)}.log", "ab")  # noqa: SIM115 - closed below
        process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "api.main:create_app"]
            + ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
            cwd=REPOSITORY,
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        server = Server(f"http://127.0.0.1:{port}", port, process, home, database_url, token)
        started.append(server)
        _wait_until_up(server, tmp_path / f"api{len(started) - 1}.log")
        return server

    yield start
    for server in started:
        stop(server.process)


def _wait_until_up(server: Server, log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"the API exited early:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{server.url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"the API did not start:\n{log.read_text()[-4000:]}")


class PeakRSS:
    """Samples a process's resident memory in a thread; `peak` is the largest value seen."""

    def __init__(self, pid: int, interval: float = 0.01) -> None:
        self._process = psutil.Process(pid)
        self._interval = interval
        self._stop = threading.Event()
        self.peak = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            time.sleep(self._interval)

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


class BigDataset:
    """A text dataset of `lines` lines made on the fly, hashed as it goes out."""

    def __init__(self, lines: int) -> None:
        self.lines = lines
        self.sha256 = hashlib.sha256()
        self.sent = 0

    @staticmethod
    def line(number: int) -> bytes:
        # Fixed width, so the size is known up front; CRLF and non-ASCII keep it honest.
        return (
            f"{number:09d} Apple Inc. released its new iPhone model yesterday, featuring a longer "
            f"battery life — and Tesla's café got rave reviews. ☕\r\n"
        ).encode()

    @property
    def size(self) -> int:
        return self.lines * len(self.line(0))

    def chunks(self, lines_per_chunk: int = 8192) -> Iterator[bytes]:
        for start in range(0, self.lines, lines_per_chunk):
            end = min(start + lines_per_chunk, self.lines)
            chunk = b"".join(self.line(number) for number in range(start, end))
            self.sha256.update(chunk)
            self.sent += len(chunk)
            yield chunk

    def body(self) -> Iterator[bytes]:
        yield HEAD
        yield from self.chunks()
        yield TAIL


class TestLargeUpload:
    def test_200_mb_streams_through_in_bounded_memory(self, start_server):
        server = start_server()
        with httpx.Client(base_url=server.url, headers=server.headers, timeout=300) as client:
            # Warm up first: imports and caches of the first upload are not the file's memory.
            small = HEAD + b"warm-up line\n" + TAIL
            warm = client.post("/datasets", content=small, headers={"Content-Type": CONTENT_TYPE})
            assert warm.status_code == 201, warm.text

            dataset = BigDataset(lines=1_700_000)
            assert dataset.size > 200 * 1000 * 1000
            length = len(HEAD) + dataset.size + len(TAIL)
            baseline = psutil.Process(server.process.pid).memory_info().rss
            started = time.monotonic()
            with PeakRSS(server.process.pid) as rss:
                response = client.post(
                    "/datasets",
                    content=dataset.body(),
                    headers={"Content-Type": CONTENT_TYPE, "Content-Length": str(length)},
                )
            seconds = time.monotonic() - started

        growth = (rss.peak - baseline) / MIB
        print(
            f"\n200 MB upload: {dataset.size / MIB:.0f} MiB in {seconds:.1f} s "
            f"({dataset.size / MIB / seconds:.0f} MiB/s); API RSS {baseline / MIB:.0f} MiB "
            f"-> peak {rss.peak / MIB:.0f} MiB (+{growth:.1f} MiB)"
        )
        assert response.status_code == 201, response.text
        body = response.json()
        assert dataset.sent == dataset.size
        assert (body["format"], body["shape"]) == ("text", "text")
        assert body["bytes"] == dataset.size
        assert body["examples"] == dataset.lines
        assert body["sha256"] == dataset.sha256.hexdigest()
        assert body["filename"] == "big.txt"
        assert growth < 100, f"the API grew by {growth:.1f} MiB while receiving the upload"
        assert seconds < 60, f"the upload took {seconds:.1f} s"

        stored = server.home / "storage" / "datasets" / body["id"]
        digest = hashlib.sha256()
        with open(stored, "rb") as stream:
            while chunk := stream.read(8 * MIB):
                digest.update(chunk)
        assert digest.hexdigest() == body["sha256"]
        assert server.stored == sorted([warm.json()["id"], body["id"]])


def _send_chunked(port: int, headers: dict[str, str], pieces: Iterator[bytes]) -> tuple[int, int]:
    """POST /datasets with Transfer-Encoding: chunked over a raw socket, a piece at a time.

    Stops sending as soon as the server answers (or closes), as a careful client does, and
    returns (how many body bytes went out, the response's status).
    """
    head = [
        "POST /datasets HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        f"Content-Type: {CONTENT_TYPE}",
        "Transfer-Encoding: chunked",
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=60) as connection:
        connection.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        try:
            for piece in pieces:
                # A short wait per piece paces the client, so "answered early" is measurable.
                if select.select([connection], [], [], 0.005)[0]:
                    break  # the server has answered: no point sending the rest
                connection.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
                sent += len(piece)
            else:
                connection.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed while we were writing: read its answer
        response = b""
        while b"\r\n" not in response:
            data = connection.recv(65536)
            if not data:
                break
            response += data
    status_line = response.split(b"\r\n", 1)[0]
    assert status_line.startswith(b"HTTP/1.1 "), response[:200]
    return sent, int(status_line.split()[1])


class TestChunkedOverLimit:
    LIMIT = 1_000_000

    def test_stopped_with_413_and_nothing_kept(self, start_server):
        server = start_server(max_dataset_bytes=str(self.LIMIT))
        dataset = BigDataset(lines=40_000)  # about 5 MB
        assert dataset.size > 5 * self.LIMIT

        def pieces() -> Iterator[bytes]:
            for chunk in dataset.body():
                for start in range(0, len(chunk), 64 * 1024):
                    yield chunk[start : start + 64 * 1024]

        sent, status = _send_chunked(server.port, server.headers, pieces())
        print(f"\n413 after {sent / MIB:.2f} MiB of a {dataset.size / MIB:.2f} MiB chunked body")
        assert status == 413
        # Answered while the body was still coming, well before its end.
        assert sent < dataset.size
        assert server.stored == []
        assert server.dataset_rows() == 0
        # The server is fine afterwards.
        assert httpx.get(f"{server.url}/healthz").status_code == 200

    def test_a_plain_httpx_client_gets_the_413(self, start_server):
        server = start_server(max_dataset_bytes=str(self.LIMIT))
        dataset = BigDataset(lines=40_000)
        with httpx.Client(base_url=server.url, headers=server.headers, timeout=60) as client:
            # A generator body has no length: httpx sends it chunked.
            response = client.post(
                "/datasets", content=dataset.body(), headers={"Content-Type": CONTENT_TYPE}
            )
        assert "Content-Length" not in response.request.headers
        assert response.request.headers["Transfer-Encoding"] == "chunked"
        assert response.status_code == 413, response.text
        error = response.json()["error"]
        assert (error["code"], error["param"]) == ("dataset_too_large", "file")
        assert server.stored == []
        assert server.dataset_rows() == 0


class TestClientGone:
    def test_a_client_that_disconnects_mid_upload_leaves_nothing(self, start_server):
        server = start_server()
        dataset = BigDataset(lines=40_000)
        head = (
            f"POST /datasets HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
            f"Content-Type: {CONTENT_TYPE}\r\nTransfer-Encoding: chunked\r\n"
            f"Authorization: Bearer {server.token}\r\n\r\n"
        ).encode()
        with socket.create_connection(("127.0.0.1", server.port), timeout=60) as connection:
            connection.sendall(head)
            sent = 0
            for chunk in dataset.body():
                connection.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
                if sent > 3 * MIB:
                    break
            # Make sure the server has begun storing before the client vanishes.
            deadline = time.monotonic() + 10
            while not server.stored and time.monotonic() < deadline:
                time.sleep(0.01)
            assert server.stored, "the upload never reached storage"
        deadline = time.monotonic() + 10
        while server.stored and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.stored == []
        assert server.dataset_rows() == 0
        assert httpx.get(f"{server.url}/healthz").status_code == 200
