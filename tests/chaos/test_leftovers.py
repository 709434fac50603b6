"""kill -9 of the API in the middle of a dataset upload leaves the upload's temporary file in
storage: nothing else would ever remove it. A worker's sweep does, once the file is a day old
(a live upload writes to it continuously)."""

import os
import signal
import socket
import time
from pathlib import Path

from tests.chaos.conftest import Stack, figures
from tests.processes import free_port, start, wait_for, wait_until_ready

BOUNDARY = "tunery-chaos-boundary"


def start_an_endless_upload(port: int, authorization: str) -> socket.socket:
    """A dataset upload that announces 100 MB and sends the first 2.4 MB (the API processes
    its body in batches of 1 MB)."""
    part = (
        f"--{BOUNDARY}\r\n"
        'Content-Disposition: form-data; name="file"; filename="big.txt"\r\n'
        "Content-Type: text/plain\r\n\r\n"
    ).encode()
    head = (
        "POST /datasets HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: {authorization}\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
        f"Content-Length: {100 << 20}\r\n\r\n"
    ).encode()
    connection = socket.create_connection(("127.0.0.1", port))
    connection.sendall(head + part + b"one line of the dataset\n" * 100_000)
    return connection


def test_an_upload_cut_by_kill_9_leaves_a_temporary_file_that_a_sweep_removes(
    stack: Stack,
) -> None:
    port = free_port()
    api = start(["api", "--port", str(port)], stack.environment, stack.log("killed-api"))
    wait_until_ready(f"http://127.0.0.1:{port}", api, stack.log("killed-api"))
    datasets = stack.storage / "datasets"

    def temporary_files() -> list[Path]:
        return sorted(datasets.glob(".*.partial")) if datasets.is_dir() else []

    with start_an_endless_upload(port, stack.client.http.headers["Authorization"]):
        (left,) = wait_for(temporary_files, timeout=30, what="the upload's temporary file")
        wait_for(lambda: left.stat().st_size > 0, timeout=30, what="bytes in it")
        os.killpg(api.pid, signal.SIGKILL)
        api.wait(timeout=30)
    assert temporary_files() == [left]
    assert stack.client.http.get("/datasets").json()["data"] == []  # no row was committed

    day_and_more = time.time() - 25 * 3600
    os.utime(left, (day_and_more, day_and_more))
    started = time.monotonic()
    worker = stack.start_worker("worker")
    wait_for(lambda: not left.exists(), timeout=90, what="the sweep")
    seconds = time.monotonic() - started
    assert temporary_files() == []
    assert f"datasets/{left.name}" in stack.log("worker").read_text()  # the sweep's report
    assert worker.poll() is None
    figures("h.upload_cut", seconds_to_removal_from_worker_start=round(seconds, 1))
