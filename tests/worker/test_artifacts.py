"""The tarball and its manifest, the model card, and how errors are reported."""

import hashlib
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from shared import storage
from shared.settings import get_settings
from worker import artifacts
from worker.errors import JobFailure, classify


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("TUNERY_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("TUNERY_STORAGE_URL", raising=False)
    get_settings.cache_clear()
    yield tmp_path / "home"
    get_settings.cache_clear()


def make_package(folder: Path) -> Path:
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "config.json").write_text('{"model_type": "gpt2"}\n')
    (folder / "model" / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    (folder / "README.md").write_text("# card\n")
    (folder / "job.json").write_text("{}\n")
    return folder


@pytest.mark.usefixtures("home")
def test_the_tarball_streams_to_storage_with_its_size_and_hash(tmp_path: Path) -> None:
    package = make_package(tmp_path / "package")
    artifacts.write_manifest(package)
    (package / "model" / "model.safetensors").chmod(0o600)  # as a temporary file is written
    chunks: list[int] = []

    size, sha256 = artifacts.upload_tarball(
        package, "artifacts/job_x.tar.gz", on_chunk=lambda: chunks.append(1)
    )

    body = storage.path("artifacts/job_x.tar.gz").read_bytes()
    assert size == len(body) and sha256 == hashlib.sha256(body).hexdigest()
    assert chunks  # the caller could heartbeat while it streamed
    with tarfile.open(storage.path("artifacts/job_x.tar.gz"), "r:gz") as archive:
        members = {member.name: member for member in archive.getmembers()}
        assert set(members) == {
            "MANIFEST.sha256",
            "README.md",
            "job.json",
            "model/config.json",
            "model/model.safetensors",
        }
        assert all(member.uid == 0 and member.uname == "" for member in members.values())
        assert {member.mode for member in members.values()} == {0o644}
        manifest = archive.extractfile("MANIFEST.sha256").read().decode()
    expected = hashlib.sha256((package / "model" / "model.safetensors").read_bytes()).hexdigest()
    assert f"{expected}  model/model.safetensors\n" in manifest
    assert "MANIFEST.sha256" not in manifest


def test_the_model_card_states_what_the_run_did() -> None:
    facts = artifacts.CardFacts(
        job_id="job_1",
        base_model="gpt2",
        dataset={
            "filename": "news.txt",
            "sha256": "ab" * 32,
            "examples": 5,
            "format": "text",
            "shape": "text",
        },
        validation="10% of the training examples, held out with seed 42",
        hyperparameters={"epochs": 3, "learning_rate": 5e-05},
        training={"total_steps": 12},
        metrics={
            "baseline_eval_loss": 3.5,
            "baseline_eval_perplexity": 33.1,
            "eval_loss": 2.25,
            "eval_perplexity": 9.49,
            "train_loss": 2.5,
        },
        samples=[{"prompt": "Apple Inc.", "base": "is a", "tuned": "released\nits phone"}],
        suffix="tech-news",
    )

    card = artifacts.render_model_card(facts)

    for expected in (
        "gpt2",
        "news.txt",
        "ab" * 32,
        "examples: 5",
        "| learning_rate | 5e-05 |",
        "3.5000",
        "2.2500",
        "9.4900",
        "> released\n> its phone",
        'AutoModelForCausalLM.from_pretrained("model")',
        "sha256sum -c MANIFEST.sha256",
    ):
        assert expected in card, expected


class TestClassify:
    def test_our_failures_keep_their_code(self) -> None:
        error = classify(JobFailure("dataset_too_small", "too small", user_error=True))
        assert error == {"code": "dataset_too_small", "message": "too small", "user_error": True}

    @pytest.mark.parametrize(
        "exc",
        [
            MemoryError(),
            torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB"),
            RuntimeError("[enforce fail at alloc_cpu.cpp] DefaultCPUAllocator: out of memory"),
        ],
    )
    def test_out_of_memory_is_named(self, exc: BaseException) -> None:
        error = classify(exc)
        assert error["code"] == "out_of_memory" and "batch_size" in error["message"]

    def test_anything_else_is_internal_and_one_line(self) -> None:
        error = classify(ValueError("first line\n  File 'x.py', line 3\nmore"))
        assert error["code"] == "internal_error" and error["user_error"] is False
        assert "\n" not in error["message"] and "ValueError: first line" in error["message"]
