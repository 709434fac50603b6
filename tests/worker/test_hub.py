"""Base models from the Hugging Face Hub: fetched by a child process with the real
huggingface_hub client, from a stand-in Hub (no internet here), and stopped mid-download by a
cancel or a shutdown."""

import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import huggingface_hub.constants
import pytest
from transformers import AutoModelForCausalLM

from shared import jobs
from shared.db import session_scope
from shared.settings import Settings, get_settings
from tests.conftest import TINY_MODEL
from tests.fake_hub import FakeHub, download_processes
from tests.processes import wait_for
from tests.tiny_model import with_pickle_weights
from tests.worker.conftest import MakeDataset, MakeJob
from tests.worker.helpers import events_of, learnable_text, load_job
from worker import pipeline, shutdown, sweeper

REPO = "tunery-test/tiny-gpt2"
WEIGHTS = "model.safetensors"
ON_THE_HUB = {"base_model": REPO, "block_size": 32, "max_steps": 2}
NewJob = Callable[[], tuple[str, int]]
RunAJob = Callable[[FakeHub], str]


@pytest.fixture
def hub_cache(settings: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty Hub cache, and the stand-in's repository on the allowed list."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "huggingface"))
    # The child reads the environment; the sweeper, in this process, read it at import.
    monkeypatch.setattr(
        huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "huggingface" / "hub")
    )
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TUNERY_ALLOWED_BASE_MODELS", REPO)
    get_settings.cache_clear()
    return tmp_path / "huggingface" / "hub"


@pytest.fixture(autouse=True)
def no_shutdown() -> Iterator[None]:
    shutdown.clear()
    yield
    shutdown.clear()


@pytest.fixture
def new_job(hub_cache: Path, make_dataset: MakeDataset, make_job: MakeJob) -> NewJob:
    """Makes a claimed job whose base model is the stand-in's repository."""
    return lambda: make_job(make_dataset(learnable_text(40)), **ON_THE_HUB)


@pytest.fixture
def run_a_job(new_job: NewJob, monkeypatch: pytest.MonkeyPatch) -> RunAJob:
    """Runs a new job to its end while `hub` serves; returns its id."""

    def run(hub: FakeHub) -> str:
        with hub.running():
            monkeypatch.setenv("HF_ENDPOINT", hub.url)
            job_id, attempt = new_job()
            pipeline.run(job_id, attempt)
        return job_id

    return run


def downloads(hub: FakeHub) -> list[str]:
    return sorted(line.rsplit("/", 1)[1] for line in hub.served if line.startswith("GET /tunery"))


def run_in_thread(job_id: str, attempt: int) -> threading.Thread:
    thread = threading.Thread(target=pipeline.run, args=(job_id, attempt), daemon=True)
    thread.start()
    return thread


def test_a_hub_model_is_fetched_once_and_then_trains_from_the_cache(
    settings: Settings,
    new_job: NewJob,
    run_a_job: RunAJob,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hub = FakeHub({REPO: settings.resolved_models_dir / TINY_MODEL})
    job_id = run_a_job(hub)

    job = load_job(job_id)
    assert job.status == "succeeded", job.error
    assert downloads(hub) == sorted(p.name for p in hub.files(REPO))
    assert f"base model {REPO} loaded" in " ".join(e.message for e in events_of(job_id))

    # The stand-in is gone and the worker offline: the cached files are enough.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    job_id, attempt = new_job()
    pipeline.run(job_id, attempt)
    assert load_job(job_id).status == "succeeded", load_job(job_id).error


def test_only_the_weights_transformers_loads_are_downloaded(
    settings: Settings, run_a_job: RunAJob, tmp_path: Path
) -> None:
    tiny = settings.resolved_models_dir / TINY_MODEL
    sharded = tmp_path / "sharded"
    shutil.copytree(tiny, sharded, ignore=shutil.ignore_patterns("*.safetensors"))
    AutoModelForCausalLM.from_pretrained(tiny).save_pretrained(sharded, max_shard_size="300KB")
    # The same weights in another layout, as Mistral's repositories hold them beside the shards.
    shutil.copy(tiny / WEIGHTS, sharded / "consolidated.safetensors")
    hub = FakeHub({REPO: sharded})

    job_id = run_a_job(hub)

    assert load_job(job_id).status == "succeeded", load_job(job_id).error
    shards = sorted(p.name for p in sharded.glob("model-*.safetensors"))
    assert len(shards) >= 2
    fetched = downloads(hub)
    assert set(shards) < set(fetched) and "model.safetensors.index.json" in fetched
    assert "consolidated.safetensors" not in fetched


def test_an_unknown_repository_fails_with_the_hubs_answer(
    run_a_job: RunAJob,
) -> None:
    job_id = run_a_job(FakeHub({}))

    job = load_job(job_id)
    assert job.status == "failed"
    assert job.error["code"] == "base_model_unavailable" and job.error["user_error"] is False
    message = job.error["message"]
    assert REPO in message and "Hugging Face Hub" in message, message
    assert "no such repository" in message and "404" in message, message
    assert "\n" not in message and "Traceback" not in message


def test_a_gated_repository_is_fetched_with_the_workers_token(
    settings: Settings, run_a_job: RunAJob, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = FakeHub({REPO: settings.resolved_models_dir / TINY_MODEL}, token="hf_tunery_test")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    refused = load_job(run_a_job(hub))
    assert refused.status == "failed" and refused.error["code"] == "base_model_unavailable"
    assert "gated" in refused.error["message"] and "HF_TOKEN" in refused.error["message"]

    monkeypatch.setenv("HF_TOKEN", "hf_tunery_test")
    job = load_job(run_a_job(hub))
    assert job.status == "succeeded", job.error


def test_pickle_weights_on_the_hub_are_never_downloaded(
    settings: Settings, run_a_job: RunAJob, tmp_path: Path
) -> None:
    pickled = with_pickle_weights(settings.resolved_models_dir / TINY_MODEL, tmp_path / "pickled")
    hub = FakeHub({REPO: pickled})
    job_id = run_a_job(hub)

    job = load_job(job_id)
    assert job.status == "failed"
    assert job.error["code"] == "base_model_invalid" and job.error["user_error"] is True
    assert "safetensors" in job.error["message"]
    assert "pytorch_model.bin" not in downloads(hub) and "config.json" in downloads(hub)


@pytest.mark.parametrize("stop", ["cancel", "shutdown"])
def test_a_download_stops_at_once_for_a_cancel_or_a_shutdown(
    settings: Settings,
    hub_cache: Path,
    new_job: NewJob,
    monkeypatch: pytest.MonkeyPatch,
    stop: str,
) -> None:
    hub = FakeHub({REPO: settings.resolved_models_dir / TINY_MODEL}, hold=WEIGHTS)
    with hub.running():
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        job_id, attempt = new_job()
        thread = run_in_thread(job_id, attempt)
        assert hub.held.wait(30), hub.served  # the weights are half-way down, and stay so
        asked = time.monotonic()
        if stop == "cancel":
            with session_scope() as session:
                jobs.cancel(session, job_id)
        else:
            shutdown.request()
        thread.join(30)
        stopped_after_s = time.monotonic() - asked
        assert not thread.is_alive(), "the download did not stop"
        assert hub.dropped.wait(5)  # the downloader's connection was closed: it was killed

    # The parent reads the cancel flag and the shutdown flag every 0.5 s.
    assert stopped_after_s < 3, stopped_after_s
    assert download_processes(hub) == []
    job = load_job(job_id)
    assert job.status == ("cancelled" if stop == "cancel" else "queued"), job.error
    assert not any("loaded" in event.message for event in events_of(job_id))

    # The killed download's partial file stays until the sweeper finds it a day old.
    [partial] = hub_cache.glob("*/blobs/*.incomplete")
    assert sweeper.sweep(storage_leftovers=True).abandoned_downloads == []
    day_ago = time.time() - 25 * 3600
    os.utime(partial, (day_ago, day_ago))
    removed = sweeper.sweep(storage_leftovers=True).abandoned_downloads
    assert removed == [str(partial.relative_to(hub_cache))] and not partial.exists()


def test_a_download_ends_soon_after_its_worker_is_killed(
    settings: Settings, hub_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = FakeHub({REPO: settings.resolved_models_dir / TINY_MODEL}, hold=WEIGHTS)
    fetching = f"from worker import hub; hub.fetch({REPO!r}, keep_going=lambda: None)"
    with hub.running():
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        worker = subprocess.Popen([sys.executable, "-c", fetching])
        assert hub.held.wait(30), hub.served
        assert len(download_processes(hub)) == 1

        worker.kill()  # SIGKILL: no cleanup of any kind in the worker
        worker.wait()

        wait_for(lambda: download_processes(hub) == [], timeout=5, what="the orphan to end")
        assert hub.dropped.wait(5)
