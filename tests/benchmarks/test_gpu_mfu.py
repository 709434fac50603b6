"""The GPU benchmark runs where device time is scarce: its smoke config must keep working here.

Not a measurement (figures come from running the script on the GPU machine): the references
compute what the service trains, and every path runs.
"""

import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, TrainerState

from tests.conftest import REPOSITORY

BENCHMARKS = REPOSITORY / "benchmarks"


@pytest.fixture(scope="module")
def benchmarks() -> Iterator[tuple[ModuleType, ModuleType]]:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import gpu_mfu
        import gpu_reference

        yield gpu_mfu, gpu_reference
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_the_minimal_gpt_computes_hugging_face_gpt2_from_its_weights(
    benchmarks: tuple[ModuleType, ModuleType],
) -> None:
    _, gpu_reference = benchmarks
    # Large weights, so that every difference in the function shows in the loss.
    config = GPT2Config(
        n_layer=2, n_head=4, n_embd=64, n_positions=32, vocab_size=97, initializer_range=0.3
    )
    gpt2 = GPT2LMHeadModel(config).eval()
    minimal = gpu_reference.MinimalGPT(config).eval()
    ids = torch.randint(0, 97, (3, 32), generator=torch.manual_seed(0))

    minimal.copy_gpt2_weights(gpt2)

    assert sum(p.numel() for p in minimal.parameters()) == gpt2.num_parameters()
    with torch.no_grad():
        torch.testing.assert_close(minimal(ids, ids), gpt2(input_ids=ids, labels=ids).loss)


def test_the_service_and_both_references_train_the_same_model(
    benchmarks: tuple[ModuleType, ModuleType], tmp_path: Path
) -> None:
    gpu_mfu, _ = benchmarks
    models = tmp_path / "models"
    # No dropout, so that the two hand-written loops can be compared step for step.
    smoke = ["--smoke", "--dropout", "0"]
    config = gpu_mfu.build_model(models / "gpt2-124m", gpu_mfu.parse_args(smoke))
    results = {
        path: gpu_mfu.run_once(gpu_mfu.parse_args([*smoke, "--path", path]), models, config)
        for path in gpu_mfu.PATHS
    }

    assert {result["parameters"] for result in results.values()} == {
        GPT2LMHeadModel(config).num_parameters()
    }
    assert all(result["tokens_per_second"] > 0 for result in results.values())
    # Same weights, blocks, order and learning rate, no dropout: the two loops stay together.
    bare, minimal = results["bare"]["last_logged"], results["minimal"]["last_logged"]
    assert bare["loss"] == pytest.approx(minimal["loss"], rel=1e-4)
    assert bare["grad_norm"] == pytest.approx(minimal["grad_norm"], rel=1e-3)


def test_host_syncs_are_counted_per_step_with_the_logging_that_follows_it(
    benchmarks: tuple[ModuleType, ModuleType],
) -> None:
    gpu_mfu, _ = benchmarks
    # On the GPU, CUDA's sync debug mode warns at each sync; here the test warns by hand.
    syncs = gpu_mfu.HostSyncs(2, debug_mode=False)
    state = TrainerState(global_step=0)

    def sync() -> None:
        warnings.warn(gpu_mfu.HostSyncs.WARNING, stacklevel=1)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the warm-up steps' warnings, which nobody records
        for _ in range(6):
            syncs.on_step_begin(None, state, None)
            state.global_step += 1
            warnings.warn("an unrelated warning", stacklevel=1)
            if state.global_step % 2 == 0:  # Trainer logs after the step's end: a loss is read
                sync()
        syncs.on_train_end(None, state, None)

    # Steps 1 and 2 are warm-up; each logging step (4, 6) had its one sync.
    assert sorted(syncs.by_step) == [3, 4, 5, 6]
    assert syncs.by_step[3] == syncs.by_step[5] == []
    assert len(syncs.by_step[4]) == len(syncs.by_step[6]) == 1
    assert syncs.by_step[4][0].startswith("test_gpu_mfu.py:")
    report = syncs.report(2)
    assert "host syncs, logging steps: 2 in 2 steps" in report
    assert "host syncs, other steps: 0 in 2 steps" in report


def test_a_baseline_eval_with_a_short_last_batch_compiles_one_graph_beside_training(
    benchmarks: tuple[ModuleType, ModuleType], tmp_path: Path
) -> None:
    gpu_mfu, _ = benchmarks
    arguments = ["--smoke", "--compile", "--evaluate-first", "--steps", "4", "--warmup", "2"]
    args = gpu_mfu.parse_args(arguments)
    config = gpu_mfu.build_model(tmp_path / "models" / "gpt2-124m", args)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()

    result = gpu_mfu.run_once(args, tmp_path / "models", config)

    # The eval's graph and training's: the eval's one-row batch is filled to a full one (before
    # 2026-12-01 it compiled a third graph, and left the batch size dynamic for training).
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
    assert result["evaluate_seconds"] > 0
    assert result["first_step_seconds"] > 0


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_the_lean_loss_gives_transformers_loss_and_gradients(
    benchmarks: tuple[ModuleType, ModuleType], compiled: bool
) -> None:
    from lean_loss import lean_causal_lm_loss

    # No dropout: both runs must compute the same function.
    config = GPT2Config(
        n_layer=2,
        n_head=4,
        n_embd=64,
        n_positions=32,
        vocab_size=97,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    ids = torch.randint(0, 97, (3, 32), generator=torch.manual_seed(0))
    labels = ids.clone()
    labels[:, :7] = -100  # a prompt left out of the loss, as in prompt/completion rows
    labelled = torch.tensor(3 * (32 - 7 - 1))  # what Trainer passes: the shifted labels counted

    def loss_and_gradients(lean: bool, items: torch.Tensor | None) -> list[torch.Tensor]:
        torch.manual_seed(1)
        model = GPT2LMHeadModel(config).train()
        model.loss_type = "ForCausalLM"  # as `load_base_model` sets it: no graph break
        if lean:
            model.loss_function = lean_causal_lm_loss
        forward = torch.compile(model, fullgraph=True) if compiled else model
        loss = forward(input_ids=ids, labels=labels, num_items_in_batch=items).loss
        loss.backward()
        return [loss.detach(), *(p.grad for p in model.parameters())]

    # Trainer's sum over the labelled tokens / their count; eager also the mean of a bare call.
    for items in (labelled,) if compiled else (labelled, None):
        stock, lean = loss_and_gradients(False, items), loss_and_gradients(True, items)
        assert len(stock) == len(lean)
        for expected, got in zip(stock, lean, strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
