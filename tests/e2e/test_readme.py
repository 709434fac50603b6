"""The README's walkthrough, run as written against a real `tunery up`: its bash blocks are read
from README.md and run in order, and every field their commented outputs show is checked. A
change that breaks the documented path, or makes the README's example outputs wrong, fails here.

What stands in for what the README leaves to the reader: the key `tunery up` printed for
`tny_...`, the ids the commands returned for `ds_...` and `job_...`, the test's free port for
8000, and a tiny local model named `gpt2` for the Hub's (there is no network here; a local
folder of that name is what a job takes first).
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import REPOSITORY
from tests.processes import free_port, tunery_environment, wait_for
from tests.tiny_model import build_tiny_model

# A `"key":value` pair of a commented output; a value of `…` or `...` is the reader's.
FIELD = re.compile(r'"(\w+)":("(?:[^"\\]|\\.)*"|-?\d+(?:\.\d+)?|true|false|null)')


def walkthrough() -> list[str]:
    """The bash blocks of the README's Walkthrough section, in order."""
    text = (REPOSITORY / "README.md").read_text()
    section = text.split("\n## Walkthrough\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)```", section, re.DOTALL)


def shown_fields(block: str) -> dict[str, Any]:
    """The fields a block's commented output shows with a value (not `…`)."""
    comments = " ".join(line[1:] for line in block.splitlines() if line.startswith("#"))
    fields = {}
    for key, raw in FIELD.findall(comments):
        value = json.loads(raw)
        if not (isinstance(value, str) and ("…" in value or "..." in value)):
            fields[key] = value
    return fields


def found(document: Any, key: str) -> list[Any]:
    """Every value of `key` anywhere in a JSON document."""
    if isinstance(document, dict):
        here = [document[key]] if key in document else []
        return here + [value for child in document.values() for value in found(child, key)]
    if isinstance(document, list):
        return [value for child in document for value in found(child, key)]
    return []


def documents(output: str) -> list[Any]:
    """The JSON documents curl printed one after another (it adds no newline)."""
    decoder, position, printed = json.JSONDecoder(), 0, []
    while position < len(output.rstrip()):
        document, position = decoder.raw_decode(output, position)
        printed.append(document)
        while position < len(output) and output[position].isspace():
            position += 1
    return printed


def assert_shows(block: str, output: str) -> dict[str, Any]:
    [document] = documents(output)
    for key, value in shown_fields(block).items():
        assert value in found(document, key), (key, value, document)
    return document


@pytest.fixture
def readme_up(tmp_path: Path) -> Any:
    models = tmp_path / "models"
    build_tiny_model(models, "gpt2")
    port = free_port()
    log = tmp_path / "up.log"
    environment = tunery_environment(home=str(tmp_path / "home"), models_dir=str(models))
    with open(log, "wb") as output:
        up = subprocess.Popen(
            [sys.executable, "-m", "shared.cli", "up", "--port", str(port)],
            env=environment,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for(lambda: "Tunery is up" in log.read_text(), timeout=120, what="tunery up")
        wait_for(lambda: " ready." in log.read_text(), timeout=120, what="its worker")
        key = next(line for line in log.read_text().splitlines() if line.startswith("tny_"))
        yield port, key
    finally:
        os.killpg(up.pid, signal.SIGINT)
        up.wait(timeout=60)


def test_the_walkthrough_runs_as_written_and_shows_what_it_says(
    readme_up: tuple[int, str], tmp_path: Path
) -> None:
    port, key = readme_up
    work = tmp_path / "reader"
    work.mkdir()
    ids = {"tny_...": key}

    def run(block: str) -> str:
        script = block.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
        for placeholder, value in ids.items():
            script = script.replace(placeholder, value)
        environment = {**os.environ, "TUNERY_KEY": key}
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=work,
            env=environment,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, script + "\n" + done.stdout + done.stderr
        return done.stdout

    save, upload, create, refused, poll, cancel, download = walkthrough()

    run(save)
    assert len((work / "my_dataset.txt").read_text().splitlines()) == 5
    ids["ds_..."] = assert_shows(upload, run(upload))["id"]
    job = assert_shows(create, run(create))
    ids["job_..."] = job["id"]
    assert_shows(refused, run(refused))

    deadline = time.monotonic() + 300
    while (job := documents(run(poll))[0])["status"] not in ("succeeded", "failed"):
        assert time.monotonic() < deadline, job
        time.sleep(1)
    assert job["status"] == "succeeded", job
    assert job["hyperparameters"]["block_size"] == 128 and job["suffix"] == "tech-news"
    _, events, metrics = documents(run(poll))
    assert events["data"] and metrics["data"]

    [finished] = documents(run(cancel))  # too late: it has ended
    assert finished["error"]["code"] == "job_finished"

    loaded = run(download)  # the checks, the load and a greedy continuation
    assert "OK" in loaded and "FAILED" not in loaded
    assert loaded.splitlines()[-1].startswith("Apple Inc. released")
    artifact = httpx.get(
        f"http://127.0.0.1:{port}/jobs/{job['id']}",
        headers={"Authorization": f"Bearer {key}"},
    ).json()["artifact"]
    assert (work / "model.tar.gz").stat().st_size == artifact["bytes"]
