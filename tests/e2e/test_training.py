"""A real fine-tune through the service, on both stacks: upload, train, poll, download, verify,
load, and a model that learned (held-out loss below the base model's)."""

import hashlib
import io
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from celery import Celery
from transformers import AutoModelForCausalLM, AutoTokenizer

from shared.queue import TRAIN_TASK
from tests.conftest import TINY_MODEL
from tests.e2e.client import TuneryClient
from tests.processes import (
    free_port,
    make_key,
    running_api,
    running_worker,
    stop,
    tunery_environment,
    wait_for,
)

COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
THINGS = ["car", "house", "bird", "apple", "boat", "kite", "lamp", "door"]


def learnable_text(lines: int = 240) -> bytes:
    """Short sentences from a tiny grammar: easy to learn, so eval loss must fall."""
    rows = [
        f"the {COLORS[i % 8]} {THINGS[(i * 3) % 8]} is next to the {COLORS[(i + 1) % 8]} "
        f"{THINGS[(i * 5 + 1) % 8]}."
        for i in range(lines)
    ]
    return ("\n".join(rows) + "\n").encode()


def train_and_verify(client: TuneryClient, tmp_path: Path) -> dict:
    dataset = client.upload(learnable_text())
    job = client.create_job(
        base_model=TINY_MODEL,
        dataset_id=dataset["id"],
        validation_split=0.2,
        hyperparameters={
            "epochs": 4,
            "block_size": 32,
            "batch_size": 8,
            "learning_rate": 3e-3,
            "seed": 7,
        },
        eval_prompts=["the red"],
    )
    finished = client.wait(job["id"], timeout=300)
    assert finished["status"] == "succeeded", client.events(job["id"])
    metrics = finished["metrics"]
    assert metrics["eval_loss"] < metrics["baseline_eval_loss"], metrics
    assert finished["progress"]["fraction"] == 1.0
    assert client.http.get(f"/jobs/{job['id']}/metrics").json()["data"]

    response = client.http.get(f"/jobs/{job['id']}/artifact")
    assert response.status_code == 200
    body = response.content
    artifact = finished["artifact"]
    assert len(body) == artifact["bytes"] == int(response.headers["content-length"])
    assert hashlib.sha256(body).hexdigest() == artifact["sha256"]
    assert response.headers["etag"] == f'"{artifact["sha256"]}"'
    assert response.headers["content-type"] == "application/gzip"

    extracted = tmp_path / "artifact"
    with tarfile.open(fileobj=io.BytesIO(body), mode="r:gz") as archive:
        archive.extractall(extracted, filter="data")
    check = subprocess.run(
        ["sha256sum", "-c", "MANIFEST.sha256"], cwd=extracted, capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    listed = {
        line.split("  ", 1)[1] for line in (extracted / "MANIFEST.sha256").read_text().splitlines()
    }
    on_disk = {str(p.relative_to(extracted)) for p in extracted.rglob("*") if p.is_file()}
    assert listed == on_disk - {"MANIFEST.sha256"}

    model = AutoModelForCausalLM.from_pretrained(extracted / "model")
    tokenizer = AutoTokenizer.from_pretrained(extracted / "model")
    inputs = tokenizer("the red", return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert output.shape[1] > inputs["input_ids"].shape[1]
    assert "README.md" in on_disk and "job.json" in on_disk and "metrics.jsonl" in on_disk

    # A range is exactly those bytes.
    ranged = client.http.get(f"/jobs/{job['id']}/artifact", headers={"Range": "bytes=100-299"})
    assert ranged.status_code == 206
    assert ranged.content == body[100:300]
    assert ranged.headers["content-range"] == f"bytes 100-299/{len(body)}"
    return finished


class TestProductionStack:
    """`tunery api` and a `tunery worker` process on PostgreSQL and Redis."""

    @pytest.fixture
    def stack(self, postgres_url, redis_url, models_dir, home, tmp_path):
        environment = tunery_environment(
            home=str(home),
            database_url=postgres_url,
            broker_url=redis_url,
            models_dir=str(models_dir),
            storage_url=f"file://{tmp_path / 'storage'}",
        )
        token = make_key(environment)
        with (
            running_api(environment, tmp_path / "api.log") as base_url,
            running_worker(environment, tmp_path / "worker.log") as worker,
        ):
            yield TuneryClient(base_url, token), worker, redis_url

    def test_fine_tune_download_and_load(self, stack, tmp_path):
        client, _, _ = stack
        train_and_verify(client, tmp_path)

    def test_cancel_running_then_next_job_succeeds_on_the_same_worker(self, stack, tmp_path):
        client, worker, _ = stack
        dataset = client.upload(learnable_text())
        long_job = client.create_job(
            base_model=TINY_MODEL,
            dataset_id=dataset["id"],
            validation_split=0.0,
            hyperparameters={"block_size": 32, "batch_size": 2, "max_steps": 100000},
        )
        wait_for(
            lambda: client.job(long_job["id"])["progress"]["step"] >= 2,
            timeout=120,
            what="training to start",
        )
        assert client.http.post(f"/jobs/{long_job['id']}/cancel").json()["cancel_requested"]
        cancelled = client.wait(long_job["id"], timeout=60)
        assert cancelled["status"] == "cancelled" and cancelled["artifact"] is None
        assert client.http.get(f"/jobs/{long_job['id']}/artifact").status_code == 409
        next_job = client.create_job(
            base_model=TINY_MODEL,
            dataset_id=dataset["id"],
            validation_split=0.0,
            hyperparameters={"block_size": 32, "batch_size": 4, "max_steps": 3},
        )
        assert client.wait(next_job["id"], timeout=120)["status"] == "succeeded"
        assert worker.poll() is None

    def test_the_same_job_sent_twice_trains_once(self, stack):
        client, _, redis_url = stack
        dataset = client.upload(learnable_text())
        job = client.create_job(
            base_model=TINY_MODEL,
            dataset_id=dataset["id"],
            validation_split=0.0,
            hyperparameters={"block_size": 32, "batch_size": 4, "max_steps": 20},
        )
        doorbell = Celery(broker=redis_url)
        doorbell.send_task(TRAIN_TASK, args=[job["id"]], queue="tunery")
        doorbell.send_task(TRAIN_TASK, args=[job["id"]], queue="tunery")
        finished = client.wait(job["id"], timeout=120)
        assert finished["status"] == "succeeded" and finished["attempt"] == 1
        messages = [event["message"] for event in client.events(job["id"])]
        assert messages.count("job claimed by a worker") == 1

    def test_a_dataset_too_small_fails_as_a_user_error_and_the_worker_goes_on(self, stack):
        client, worker, _ = stack
        # Every example longer than a block, and left out: nothing to train.
        pairs = b'{"prompt": "why why why why why", "completion": "because because because"}\n'
        tiny = client.upload(pairs * 3, filename="pairs.jsonl")
        failed = client.create_job(
            base_model=TINY_MODEL,
            dataset_id=tiny["id"],
            validation_split=0.0,
            truncation="drop",
            hyperparameters={"block_size": 8},
        )
        result = client.wait(failed["id"], timeout=120)
        assert result["status"] == "failed"
        assert result["error"]["user_error"] is True and result["error"]["code"]
        dataset = client.upload(learnable_text())
        ok = client.create_job(
            base_model=TINY_MODEL,
            dataset_id=dataset["id"],
            validation_split=0.0,
            hyperparameters={"block_size": 32, "batch_size": 4, "max_steps": 2},
        )
        assert client.wait(ok["id"], timeout=120)["status"] == "succeeded"
        assert worker.poll() is None


class TestEmbeddedStack:
    """`tunery up` on the embedded defaults: SQLite, local files, the filesystem queue."""

    def test_fine_tune_download_and_load(self, models_dir, home, tmp_path):
        environment = tunery_environment(home=str(home), models_dir=str(models_dir))
        port = free_port()
        log = tmp_path / "up.log"
        with open(log, "wb") as output:
            up = subprocess.Popen(
                [sys.executable, "-m", "shared.cli", "up", "--port", str(port)],
                env=environment,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            token = wait_for(
                lambda: next(
                    (line for line in log.read_text().splitlines() if line.startswith("tny_")), None
                ),
                timeout=60,
                what="the key printed by tunery up",
            )
            client = TuneryClient(f"http://127.0.0.1:{port}", token)
            wait_for(lambda: _ready(client), timeout=60, what="the API")
            train_and_verify(client, tmp_path)
        finally:
            stop(up)


def _ready(client: TuneryClient) -> bool:
    try:
        return client.http.get("/readyz").status_code == 200
    except Exception:
        return False
