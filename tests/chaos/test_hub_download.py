"""A real worker downloading its base model from the Hub (a stand-in: no internet here) stops
the download at once when the job is cancelled or the worker is asked to stop."""

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chaos.conftest import TINY, Stack, figures, now
from tests.fake_hub import FakeHub, download_processes
from tests.processes import wait_for

REPO = "tunery-test/tiny-gpt2"
pytestmark = pytest.mark.tunery_settings(allowed_base_models=REPO)


@pytest.fixture
def hub(chaos_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """The tiny model on a stand-in Hub that holds its weights half-way; requested before
    `stack`, whose processes inherit these variables."""
    stand_in = FakeHub({REPO: chaos_models / TINY}, hold="model.safetensors")
    with stand_in.running():
        monkeypatch.setenv("HF_ENDPOINT", stand_in.url)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "huggingface"))
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        yield stand_in


def downloading(stack: Stack, hub: FakeHub) -> str:
    """A job whose worker is half-way through its base model's weights."""
    worker = stack.start_worker("first")
    stack.wait_ready("first", worker)
    job_id = stack.create_job(base_model=REPO)
    assert hub.held.wait(60), stack.log("first").read_text()[-3000:]
    assert len(download_processes(hub)) == 1
    return job_id


def test_a_cancel_stops_the_download_at_once(hub: FakeHub, stack: Stack) -> None:
    job_id = downloading(stack, hub)

    asked = now()
    stack.client.http.post(f"/jobs/{job_id}/cancel").raise_for_status()
    finished = stack.client.wait(job_id, timeout=30)
    stopped_s = now() - asked

    assert finished["status"] == "cancelled"
    assert hub.dropped.wait(5) and not download_processes(hub)
    assert stopped_s < 3, stopped_s
    figures("hub.cancel", seconds_to_stop=round(stopped_s, 2))


def test_a_stopping_worker_hands_the_job_back_without_finishing_the_download(
    hub: FakeHub, stack: Stack
) -> None:
    job_id = downloading(stack, hub)
    worker = stack.workers[0]

    # As `docker stop` does: the main process only; it forwards the stop to its child.
    worker.send_signal(signal.SIGTERM)
    signalled = now()
    worker.wait(timeout=60)
    stopped_s = now() - signalled

    assert stack.row(job_id).status == "queued", stack.messages(job_id)
    assert "worker is shutting down" in stack.messages(job_id)[-1]
    assert hub.dropped.wait(5)
    wait_for(lambda: not download_processes(hub), timeout=5, what="the download process to end")
    figures("hub.sigterm", seconds_to_stop=round(stopped_s, 2))
