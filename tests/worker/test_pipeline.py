"""The whole pipeline on the tiny GPT-2: train, package, and every way a run can end."""

import hashlib
import json
import math
import os
import shutil
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from sqlalchemy import update
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from shared import jobs, storage
from shared.db import session_scope
from shared.models import Job
from shared.settings import Settings, get_settings
from tests.conftest import TINY_MODEL
from tests.tiny_model import build_tiny_model
from tests.worker.conftest import MakeDataset, MakeJob
from tests.worker.helpers import events_of, learnable_text, load_job, metrics_of
from worker import artifacts, pipeline, plan, token_cache, trainer
from worker.attention import CAUSAL_SDPA
from worker.errors import JobCancelled

FULL_RUN = {"epochs": 4, "block_size": 32, "batch_size": 8, "learning_rate": 3e-3, "seed": 7}


def extract(job_id: str, into: Path) -> Path:
    with (
        storage.open_read(storage.artifact_key(job_id)) as stream,
        tarfile.open(fileobj=stream, mode="r|gz") as archive,
    ):
        archive.extractall(into, filter="data")
    return into


def verify_manifest(folder: Path) -> None:
    """Every file but the manifest is listed once with its sha256, as `sha256sum -c` reads it."""
    listed = {}
    for line in (folder / "MANIFEST.sha256").read_text().splitlines():
        digest, name = line.split("  ", 1)
        listed[name] = digest
    on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert set(listed) == on_disk - {"MANIFEST.sha256"}
    for name, digest in listed.items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest, name
    if shutil.which("sha256sum"):
        check = subprocess.run(
            ["sha256sum", "--quiet", "-c", "MANIFEST.sha256"], cwd=folder, capture_output=True
        )
        assert check.returncode == 0, check.stdout + check.stderr


class AtStep(TrainerCallback):
    """Runs `action` while optimizer step `step` is under way (before its end is reported)."""

    def __init__(self, step: int, action: Any) -> None:
        self.step = step
        self.action = action
        self.done = False
        self.trainer_state: Any = None

    def on_step_begin(self, args: Any, state: Any, control: Any, **_: Any) -> None:
        self.trainer_state = state
        if not self.done and state.global_step == self.step - 1:
            self.done = True
            self.action()


@pytest.fixture
def short_job(make_dataset: MakeDataset, make_job: MakeJob) -> tuple[str, int]:
    """A claimed two-step job: what comes after training is what these tests watch."""
    return make_job(make_dataset(learnable_text(40)), block_size=32, max_steps=2)


def request_cancel(job_id: str) -> None:
    with session_scope() as session:
        jobs.cancel(session, job_id)


def cancel_before(monkeypatch: pytest.MonkeyPatch, name: str, job_id: str) -> None:
    """Request the job's cancel just before the pipeline calls its function `name`."""
    real = getattr(pipeline, name)

    def after_a_cancel(*args: Any, **kwargs: Any) -> Any:
        request_cancel(job_id)
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, name, after_a_cancel)


def watch_uploads(
    monkeypatch: pytest.MonkeyPatch,
    *,
    before: Callable[[Path, Callable[[], None]], Callable[[], None]] | None = None,
    after: Callable[[], None] | None = None,
) -> list[str]:
    """Record how each tarball upload ends ("uploaded" or "stopped"); `before` may add to the
    package and wrap the chunk callback, `after` runs once an upload is complete."""
    real = artifacts.upload_tarball
    endings: list[str] = []

    def upload(package: Path, key: str, on_chunk: Callable[[], None]) -> tuple[int, str]:
        if before is not None:
            on_chunk = before(package, on_chunk)
        try:
            result = real(package, key, on_chunk=on_chunk)
        except JobCancelled:
            endings.append("stopped")
            raise
        endings.append("uploaded")
        if after is not None:
            after()
        return result

    monkeypatch.setattr(artifacts, "upload_tarball", upload)
    return endings


def assert_cancelled_with_nothing_kept(job_id: str, settings: Settings) -> None:
    job = load_job(job_id)
    assert job.status == "cancelled", job.error
    assert job.artifact_sha256 is None and job.artifact_bytes is None
    messages = [event.message for event in events_of(job_id)]
    assert "job cancelled while running" in messages and "job succeeded" not in messages
    assert storage.list_dir("artifacts") == []  # neither the tarball nor a partial file
    assert storage.list_dir(storage.checkpoints_key(job_id)) == []
    assert not any((settings.home / "work").iterdir())


def small_dataset(make_dataset: MakeDataset, shape: str) -> str:
    """Plain text, or prompt/completion pairs that pack several to a block (masked)."""
    if shape == "text":
        return make_dataset(learnable_text(80))
    rows = [{"prompt": f"the {i}", "completion": f" red {i}."} for i in range(40)]
    lines = "".join(json.dumps(row) + "\n" for row in rows)
    return make_dataset(lines, format="jsonl", shape=shape)


def hook_trainer(monkeypatch: pytest.MonkeyPatch, callback: TrainerCallback) -> None:
    """Add `callback` to the Trainer the pipeline builds, after its own JobCallback."""
    real = pipeline.build_trainer

    def build(*args: Any, **kwargs: Any) -> Any:
        built = real(*args, **kwargs)
        built.add_callback(callback)
        return built

    monkeypatch.setattr(pipeline, "build_trainer", build)


class TestFullRun:
    def test_trains_packages_and_succeeds(
        self,
        settings: Settings,
        make_dataset: MakeDataset,
        make_job: MakeJob,
        tmp_path: Path,
    ) -> None:
        dataset_id = make_dataset(learnable_text(), filename="colors.txt")
        job_id, attempt = make_job(
            dataset_id, validation_split=0.2, eval_prompts=["the red"], **FULL_RUN
        )

        pipeline.run(job_id, attempt)

        job = load_job(job_id)
        assert job.status == "succeeded", job.error
        assert job.error is None
        metrics = job.metrics
        assert metrics["eval_loss"] < metrics["baseline_eval_loss"]
        assert metrics["eval_perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))
        assert metrics["baseline_eval_perplexity"] == pytest.approx(
            math.exp(metrics["baseline_eval_loss"])
        )
        assert metrics["train_loss"] is not None
        progress = job.progress
        assert progress["step"] == progress["total_steps"] > 0
        assert progress["fraction"] == 1.0 and progress["epoch"] == pytest.approx(4.0)

        # The tarball in storage is what the row says it is.
        body = storage.path(storage.artifact_key(job_id)).read_bytes()
        assert job.artifact_bytes == len(body)
        assert job.artifact_sha256 == hashlib.sha256(body).hexdigest()
        folder = extract(job_id, tmp_path / "artifact")
        verify_manifest(folder)
        model_files = {p.name for p in (folder / "model").iterdir()}
        assert {"config.json", "generation_config.json", "model.safetensors"} <= model_files
        assert not any(name.endswith(".bin") for name in model_files)

        model = AutoModelForCausalLM.from_pretrained(folder / "model")
        tokenizer = AutoTokenizer.from_pretrained(folder / "model")
        inputs = tokenizer("the red", return_tensors="pt")
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=5, do_sample=False)
        assert output.shape[1] > inputs["input_ids"].shape[1]

        document = json.loads((folder / "job.json").read_text())
        assert document["id"] == job_id and document["status"] == "succeeded"
        assert document["metrics"] == metrics
        assert document["artifact"]["url"] == f"/jobs/{job_id}/artifact"
        assert [s["prompt"] for s in document["samples"]] == ["the red"]
        assert {"base", "tuned"} <= set(document["samples"][0])

        card = (folder / "README.md").read_text()
        assert "tiny-gpt2" in card and "colors.txt" in card
        assert hashlib.sha256(learnable_text().encode()).hexdigest() in card
        assert f"{metrics['eval_loss']:.4f}" in card
        assert f"{metrics['baseline_eval_loss']:.4f}" in card
        assert "from_pretrained" in card and "the red" in card

        # Every logged step is a row, in the database and in metrics.jsonl.
        rows = metrics_of(job_id)
        train_rows = [row for row in rows if row.train_loss is not None]
        eval_rows = [row for row in rows if row.eval_loss is not None]
        assert len(train_rows) >= 2
        assert all(row.learning_rate is not None for row in train_rows)
        assert train_rows[-1].tokens_per_second and train_rows[-1].tokens_per_second > 0
        assert [row.step for row in eval_rows] == [0, progress["step"]]
        logged = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        assert [entry["step"] for entry in logged] == [row.step for row in rows]

        messages = [event.message for event in events_of(job_id)]
        for expected in (
            "base model tiny-gpt2 loaded",
            "examples tokenized into",
            "baseline eval: loss",
            "samples from the base model",
            "training started",
            "final eval: loss",
            "samples from the fine-tuned model",
            "saving the model",
            "packaging the artifact",
            "job succeeded",
        ):
            assert any(expected in message for message in messages), expected
        # The working folder is gone.
        assert not any((settings.home / "work").iterdir())

    def test_without_validation_trains_and_leaves_eval_metrics_null(
        self, settings: Settings, make_dataset: MakeDataset, make_job: MakeJob
    ) -> None:
        job_id, attempt = make_job(
            make_dataset(learnable_text(80)), validation_split=0.0, block_size=32, max_steps=3
        )

        pipeline.run(job_id, attempt)

        job = load_job(job_id)
        assert job.status == "succeeded", job.error
        assert job.progress["step"] == 3
        assert job.metrics["train_loss"] is not None
        for name in ("eval_loss", "eval_perplexity", "baseline_eval_loss"):
            assert job.metrics[name] is None
        assert all(row.eval_loss is None for row in metrics_of(job_id))

    @pytest.mark.parametrize(
        ("shape", "attention", "implementation"),
        [("text", "causal", CAUSAL_SDPA), ("prompt_completion", "masked", "sdpa")],
    )
    def test_text_blocks_train_and_evaluate_with_the_causal_flag_packed_rows_with_masks(
        self,
        settings: Settings,
        make_dataset: MakeDataset,
        make_job: MakeJob,
        monkeypatch: pytest.MonkeyPatch,
        shape: str,
        attention: str,
        implementation: str,
    ) -> None:
        seen: dict[str, list[str]] = {"train": [], "eval": []}
        models: list[Any] = []

        class Watch(TrainerCallback):
            def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                seen["train"].append(kwargs["model"].config._attn_implementation)
                models.append(kwargs["model"])

            def on_prediction_step(self, *_: Any, **kwargs: Any) -> None:
                seen["eval"].append(kwargs["model"].config._attn_implementation)

        hook_trainer(monkeypatch, Watch())
        dataset_id = small_dataset(make_dataset, shape)
        job_id, attempt = make_job(dataset_id, validation_split=0.2, block_size=32, max_steps=2)

        pipeline.run(job_id, attempt)

        assert load_job(job_id).status == "succeeded"
        assert seen["train"] == [implementation] * 2
        assert seen["eval"] and set(seen["eval"]) == {implementation}  # baseline and final
        started = next(e for e in events_of(job_id) if e.message == "training started")
        assert started.data["attention"] == attention
        # The tuned model's samples and its save ran the stock implementation again.
        assert models[-1].config._attn_implementation == "sdpa"


class TestFailures:
    def test_a_dataset_with_nothing_left_to_train_is_a_user_error(
        self, settings: Settings, make_dataset: MakeDataset, make_job: MakeJob
    ) -> None:
        rows = "".join(
            json.dumps({"prompt": "why " * 30, "completion": "because " * 30}) + "\n"
            for _ in range(4)
        )
        dataset = make_dataset(
            rows, filename="pairs.jsonl", format="jsonl", shape="prompt_completion"
        )
        job_id, attempt = make_job(dataset, block_size=16)
        with session_scope() as session:
            session.execute(update(Job).where(Job.id == job_id).values(truncation="drop"))

        pipeline.run(job_id, attempt)

        job = load_job(job_id)
        assert job.status == "failed"
        assert job.error["code"] == "dataset_too_small"
        assert job.error["user_error"] is True
        assert "block_size 16" in job.error["message"]
        assert not storage.exists(storage.artifact_key(job_id))

    def test_the_text_tail_and_a_dataset_shorter_than_a_block_are_trained(
        self, settings: Settings, make_dataset: MakeDataset, make_job: MakeJob
    ) -> None:
        # The README's walkthrough once trained 128 of its 230 training tokens.
        job_id, attempt = make_job(make_dataset("hi\nthere\n"), block_size=64, max_steps=1)

        pipeline.run(job_id, attempt)

        job = load_job(job_id)
        assert job.status == "succeeded", job.error
        assert job.plan["blocks"] == 1 and job.plan["train_tokens"] == job.plan["tokens"] > 2

    def test_a_block_size_beyond_the_model_positions_is_a_user_error(
        self, settings: Settings, make_dataset: MakeDataset, make_job: MakeJob
    ) -> None:
        config = json.loads((settings.resolved_models_dir / TINY_MODEL / "config.json").read_text())
        positions = config["n_positions"]
        job_id, attempt = make_job(make_dataset(learnable_text(40)), block_size=positions * 2)

        pipeline.run(job_id, attempt)

        job = load_job(job_id)
        assert job.status == "failed"
        assert job.error["code"] == "block_size_too_large" and job.error["user_error"] is True
        assert f"block_size <= {positions}" in job.error["message"]

    def test_a_model_folder_without_a_tokenizer_is_refused_naming_what_it_holds(
        self, settings: Settings, make_dataset: MakeDataset, make_job: MakeJob
    ) -> None:
        # transformers loads an empty tokenizer from such a folder: 150 lines became 150 EOS.
        folder = build_tiny_model(settings.resolved_models_dir, "no-tokenizer")
        for path in folder.iterdir():
            if path.name not in ("config.json", "generation_config.json", "model.safetensors"):
                path.unlink()
        job_id, attempt = make_job(make_dataset(learnable_text(150)), base_model="no-tokenizer")

        pipeline.run(job_id, attempt)

        job = load_job(job_id)
        assert job.status == "failed" and job.error["code"] == "base_model_invalid"
        assert job.error["user_error"] is True
        assert "has no usable tokenizer" in job.error["message"]
        assert (
            "it holds config.json, generation_config.json, model.safetensors"
            in (job.error["message"])
        )
        assert not storage.exists(storage.artifact_key(job_id))

    def test_the_default_block_size_fits_a_model_of_few_positions(
        self, settings: Settings, make_dataset: MakeDataset, make_job: MakeJob
    ) -> None:
        # The minimal request, on a model of 256 positions (the default used to be 512 always).
        build_tiny_model(settings.resolved_models_dir, "short-gpt2", positions=256)
        job_id, attempt = make_job(make_dataset(learnable_text(240)), base_model="short-gpt2")
        assert load_job(job_id).hyperparameters["block_size"] == "auto"

        pipeline.run(job_id, attempt)

        job = load_job(job_id)
        assert job.status == "succeeded", job.error
        assert job.hyperparameters["block_size"] == job.plan["hyperparameters"]["block_size"]
        assert job.hyperparameters["block_size"] == 256

    def test_an_internal_fault_fails_the_job_without_a_traceback(
        self,
        settings: Settings,
        make_dataset: MakeDataset,
        make_job: MakeJob,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        def broken(*args: Any, **kwargs: Any) -> None:
            raise KeyError("wiring")

        monkeypatch.setattr(plan, "prepare_data", broken)  # planning tokenizes the data
        job_id, attempt = make_job(make_dataset(learnable_text(40)), block_size=32)

        pipeline.run(job_id, attempt)  # returns normally

        job = load_job(job_id)
        assert job.status == "failed"
        assert job.error["code"] == "internal_error" and job.error["user_error"] is False
        assert "Traceback" not in job.error["message"] and "\n" not in job.error["message"]

    def test_running_out_of_memory_is_reported_as_such(
        self,
        settings: Settings,
        make_dataset: MakeDataset,
        make_job: MakeJob,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        def oom(*args: Any, **kwargs: Any) -> None:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

        monkeypatch.setattr(pipeline, "generate_samples", oom)
        job_id, attempt = make_job(make_dataset(learnable_text(40)), block_size=32, max_steps=1)

        pipeline.run(job_id, attempt)

        job = load_job(job_id)
        assert job.status == "failed"
        assert job.error["code"] == "out_of_memory"


@pytest.mark.usefixtures("fast_polls")
class TestStopping:
    # With 200 steps a metric row is written every 4 steps: the cancel of step 3 is read by the
    # step's poll, the one of step 4 by its metric row's heartbeat.
    @pytest.mark.parametrize("cancel_step", [3, 4])
    def test_cancel_stops_within_one_optimizer_step_and_keeps_no_artifact(
        self,
        cancel_step: int,
        settings: Settings,
        make_dataset: MakeDataset,
        make_job: MakeJob,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        job_id, attempt = make_job(
            make_dataset(learnable_text()),
            validation_split=0.2,
            block_size=32,
            batch_size=8,
            max_steps=200,
        )

        assert trainer.logging_steps(200) == 4
        hook = AtStep(cancel_step, lambda: request_cancel(job_id))
        hook_trainer(monkeypatch, hook)

        pipeline.run(job_id, attempt)

        job = load_job(job_id)
        assert job.status == "cancelled"
        assert hook.done and hook.trainer_state.global_step == cancel_step  # the last step
        assert job.artifact_sha256 is None
        assert not storage.exists(storage.artifact_key(job_id))
        assert job.metrics["eval_loss"] is None  # no evaluation after the cancel
        assert max(row.step for row in metrics_of(job_id)) <= cancel_step
        messages = [event.message for event in events_of(job_id)]
        assert "job cancelled while running" in messages
        assert not any("saving" in m or "packaging" in m or "final eval" in m for m in messages)
        assert not any((settings.home / "work").iterdir())

    @pytest.mark.parametrize("stage", ["plan", "generate_samples"])
    def test_a_cancel_while_data_is_tokenized_or_samples_generated_stops_the_stage(
        self,
        stage: str,
        settings: Settings,
        short_job: tuple[str, int],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        job_id, attempt = short_job
        with session_scope() as session:
            session.execute(update(Job).where(Job.id == job_id).values(eval_prompts=["a", "b"]))
        monkeypatch.setenv("TUNERY_HEARTBEAT_TIMEOUT_S", "0.005")  # a beat at every batch, prompt
        get_settings.cache_clear()
        cancel_before(monkeypatch, stage, job_id)

        pipeline.run(job_id, attempt)

        assert_cancelled_with_nothing_kept(job_id, settings)
        messages = [event.message for event in events_of(job_id)]
        # The stage stopped at its first heartbeat: it reported nothing, and nothing came after.
        assert not any("samples from" in m or "eval" in m for m in messages)
        if stage == "plan":
            assert not any("tokenized" in m for m in messages)
            assert token_cache.entries() == []  # no half-prepared data was cached

    def test_a_cancel_while_the_model_is_saved_stops_before_the_upload(
        self, settings: Settings, short_job: tuple[str, int], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        job_id, attempt = short_job
        cancel_before(monkeypatch, "_save_model", job_id)
        uploads = watch_uploads(monkeypatch)

        pipeline.run(job_id, attempt)

        assert uploads == ["stopped"]  # the packaging event's heartbeat read the cancel
        assert_cancelled_with_nothing_kept(job_id, settings)

    def test_a_cancel_during_a_long_upload_stops_it_within_a_heartbeat(
        self, settings: Settings, short_job: tuple[str, int], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        job_id, attempt = short_job
        monkeypatch.setenv("TUNERY_HEARTBEAT_TIMEOUT_S", "0.5")  # the keep-alive beats every 0.1 s
        get_settings.cache_clear()

        def cancel_at_the_first_chunk(package: Path, on_chunk: Callable[[], None]) -> Any:
            # Incompressible bytes make the upload take far longer than a heartbeat interval.
            (package / "padding.bin").write_bytes(os.urandom(64 << 20))
            cancelled = False

            def chunk() -> None:
                nonlocal cancelled
                if not cancelled:
                    cancelled = True
                    request_cancel(job_id)
                on_chunk()

            return chunk

        uploads = watch_uploads(monkeypatch, before=cancel_at_the_first_chunk)

        pipeline.run(job_id, attempt)

        assert uploads == ["stopped"]
        assert_cancelled_with_nothing_kept(job_id, settings)

    def test_a_cancel_read_only_after_the_upload_still_wins(
        self, settings: Settings, short_job: tuple[str, int], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        job_id, attempt = short_job
        uploads = watch_uploads(monkeypatch, after=lambda: request_cancel(job_id))

        pipeline.run(job_id, attempt)

        assert uploads == ["uploaded"]  # then refused success, and the tarball was deleted
        assert_cancelled_with_nothing_kept(job_id, settings)

    def test_a_cancel_just_before_a_dry_run_answers_ends_it_cancelled(
        self, settings: Settings, short_job: tuple[str, int], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        job_id, attempt = short_job
        with session_scope() as session:
            session.execute(update(Job).where(Job.id == job_id).values(dry_run=True))
        cancel_before(monkeypatch, "rendered_examples", job_id)

        pipeline.run(job_id, attempt)

        job = load_job(job_id)
        assert job.status == "cancelled"
        assert "rendered_examples" not in job.plan  # the dry run's answer was refused
        messages = [event.message for event in events_of(job_id)]
        assert "job cancelled while running" in messages and "job succeeded" not in messages

    def test_a_lost_claim_stops_training_and_writes_nothing_more(
        self,
        settings: Settings,
        make_dataset: MakeDataset,
        make_job: MakeJob,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        job_id, attempt = make_job(
            make_dataset(learnable_text()),
            validation_split=0.2,
            block_size=32,
            batch_size=8,
            max_steps=200,
        )
        seen: dict[str, Any] = {}

        def steal_the_claim() -> None:
            # What a sweeper plus another worker do: the job now runs as the next attempt.
            with session_scope() as session:
                session.execute(update(Job).where(Job.id == job_id).values(attempt=Job.attempt + 1))
            seen["events"] = [event.seq for event in events_of(job_id)]
            seen["metrics"] = [row.seq for row in metrics_of(job_id)]
            seen["job"] = load_job(job_id)

        hook = AtStep(3, steal_the_claim)
        hook_trainer(monkeypatch, hook)

        pipeline.run(job_id, attempt)

        job = load_job(job_id)
        assert hook.done and hook.trainer_state.global_step == 3
        assert job.status == "running" and job.attempt == attempt + 1
        assert job.error is None and job.artifact_sha256 is None
        assert [event.seq for event in events_of(job_id)] == seen["events"]
        assert [row.seq for row in metrics_of(job_id)] == seen["metrics"]
        before = seen["job"]
        assert (job.progress, job.metrics, job.heartbeat_at) == (
            before.progress,
            before.metrics,
            before.heartbeat_at,
        )
        assert not storage.exists(storage.artifact_key(job_id))


def test_logging_steps_give_about_fifty_rows() -> None:
    assert trainer.logging_steps(10) == 1
    assert trainer.logging_steps(5000) == 100
