"""Which base models a job may load, and how refusing one reads."""

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from shared.schemas import Hyperparameters
from shared.settings import Settings, get_settings
from tests.conftest import TINY_MODEL
from tests.tiny_model import with_pickle_weights
from tests.worker.conftest import MakeDataset, MakeJob
from tests.worker.helpers import learnable_text, load_job
from worker import pipeline
from worker.data import PackedBlocks
from worker.trainer import build_trainer, load_base_model, training_arguments


def use_models_dir(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    monkeypatch.setenv("TUNERY_MODELS_DIR", str(folder))
    get_settings.cache_clear()


def test_a_pickle_only_model_is_refused_before_anything_is_unpickled(
    settings: Settings,
    make_dataset: MakeDataset,
    make_job: MakeJob,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    tiny = settings.resolved_models_dir / TINY_MODEL
    with_pickle_weights(tiny, tmp_path / "models" / "pickled-gpt2")
    use_models_dir(monkeypatch, tmp_path / "models")

    def no_unpickling(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("torch.load was called on an untrusted file")

    monkeypatch.setattr(torch, "load", no_unpickling)
    job_id, attempt = make_job(
        make_dataset(learnable_text(40)), base_model="pickled-gpt2", block_size=32
    )

    pipeline.run(job_id, attempt)

    job = load_job(job_id)
    assert job.status == "failed"
    assert job.error["code"] == "unsafe_model_weights"
    assert job.error["user_error"] is True
    assert "pytorch_model.bin" in job.error["message"] and "safetensors" in job.error["message"]


def test_a_hub_model_that_cannot_be_fetched_fails_with_a_clear_message(
    settings: Settings,
    make_dataset: MakeDataset,
    make_job: MakeJob,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    # Offline, so the test does not wait out network retries; the code takes the real Hub path
    # (the download process reads the variable).
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TUNERY_ALLOWED_BASE_MODELS", "tunery-test/not-cached-gpt2")
    get_settings.cache_clear()
    job_id, attempt = make_job(
        make_dataset(learnable_text(40)), base_model="tunery-test/not-cached-gpt2", block_size=32
    )

    pipeline.run(job_id, attempt)

    job = load_job(job_id)
    assert job.status == "failed"
    assert job.error["code"] == "base_model_unavailable"
    assert job.error["user_error"] is False
    message = job.error["message"]
    assert "tunery-test/not-cached-gpt2" in message and "Hugging Face Hub" in message
    assert "not cached" in message
    assert "Traceback" not in message and "\n" not in message


def test_a_model_neither_local_nor_allowed_is_not_looked_up(
    settings: Settings, make_dataset: MakeDataset, make_job: MakeJob
) -> None:
    job_id, attempt = make_job(
        make_dataset(learnable_text(40)), base_model="someone/elses-model", block_size=32
    )

    pipeline.run(job_id, attempt)

    job = load_job(job_id)
    assert job.status == "failed"
    assert job.error["code"] == "base_model_not_found" and job.error["user_error"] is True


def test_a_missing_pad_token_is_taken_from_eos(settings: Settings) -> None:
    tiny = settings.resolved_models_dir / TINY_MODEL
    assert AutoTokenizer.from_pretrained(tiny).pad_token is None  # the premise

    base = load_base_model(TINY_MODEL, get_settings(), block_size=32)

    assert base.tokenizer.pad_token == base.tokenizer.eos_token
    assert base.model.config.pad_token_id == base.tokenizer.eos_token_id
    assert base.model.config._attn_implementation == "sdpa"
    assert base.model.dtype == torch.float32


def test_a_loaded_model_compiles_to_one_graph_with_the_causal_lm_loss(settings: Settings) -> None:
    # The premise: GPT-2's class name gives transformers no loss type, and it then warns on
    # every forward, which torch.compile cannot trace (a graph break in each training step).
    assert GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=1)).loss_type is None
    model = load_base_model(TINY_MODEL, get_settings(), block_size=32).model
    ids = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.manual_seed(0))

    torch._dynamo.reset()
    try:
        # fullgraph=True raises at the first graph break; the eager backend skips code generation.
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        loss = compiled(input_ids=ids, labels=ids).loss
    finally:
        torch._dynamo.reset()

    logits = model(input_ids=ids).logits
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(loss, expected)


def test_training_uses_fused_adamw_on_any_device(settings: Settings, tmp_path: Path) -> None:
    model = load_base_model(TINY_MODEL, get_settings(), block_size=32).model
    blocks = PackedBlocks(torch.zeros((4, 32), dtype=torch.int32))
    arguments = training_arguments(Hyperparameters(max_steps=1), tmp_path, total_steps=1)

    optimizer = build_trainer(model, arguments, blocks, None, []).create_optimizer()

    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["fused"] is True
