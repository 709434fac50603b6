"""Compiled jobs batch text blocks in one size: one graph for training, one for evaluation, and
the same losses and gradients as without the filler rows."""

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, Trainer, default_data_collator

from shared.models import Job
from shared.schemas import Hyperparameters
from shared.settings import Settings
from tests.conftest import TINY_MODEL
from tests.worker.conftest import MakeDataset, MakeJob
from tests.worker.helpers import learnable_text, load_job
from worker import pipeline
from worker.collate import FullBatches
from worker.data import PackedBlocks
from worker.masking import IGNORE_INDEX
from worker.trainer import training_arguments

BLOCK = 32


@pytest.fixture
def model(models_dir: Path) -> PreTrainedModel:
    model = AutoModelForCausalLM.from_pretrained(models_dir / TINY_MODEL)
    model.loss_type = "ForCausalLM"
    return model.eval()  # no dropout: the two batchings must compute the same function


def blocks(rows: int) -> PackedBlocks:
    ids = torch.randint(0, 500, (rows, BLOCK), dtype=torch.int32, generator=torch.manual_seed(0))
    return PackedBlocks(ids)


def test_a_short_batch_is_filled_with_rows_the_loss_ignores() -> None:
    data = blocks(3)

    batch = FullBatches(4)([data[i] for i in range(3)])
    full = FullBatches(4)([data[i] for i in range(3)] + [data[0]])

    assert batch["input_ids"].shape == batch["labels"].shape == (4, BLOCK)
    assert torch.equal(batch["input_ids"][:3], data.blocks.long())
    assert torch.equal(batch["labels"][:3], data.blocks.long())
    assert torch.equal(batch["input_ids"][3], data.blocks[0].long())
    assert bool((batch["labels"][3] == IGNORE_INDEX).all())
    assert bool((full["labels"] != IGNORE_INDEX).all())  # a full batch is left as it is


def test_filled_batches_give_the_same_loss_and_gradients(model: PreTrainedModel) -> None:
    features = [blocks(3)[i] for i in range(3)]

    def loss_and_gradients(batch: dict[str, torch.Tensor]) -> tuple[float, list[torch.Tensor]]:
        model.zero_grad()
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters()]

    short_loss, short_gradients = loss_and_gradients(default_data_collator(features))
    filled_loss, filled_gradients = loss_and_gradients(FullBatches(4)(features))

    assert filled_loss == pytest.approx(short_loss, rel=1e-6)
    for filled, short in zip(filled_gradients, short_gradients, strict=True):
        torch.testing.assert_close(filled, short, rtol=1e-5, atol=1e-7)


def test_trainer_evaluates_the_same_loss_on_filled_batches(
    model: PreTrainedModel, tmp_path: Path
) -> None:
    # 6 blocks at batch 4: a full batch and a batch of 2, counted by its 2 rows.
    evaluation = blocks(6)
    args = training_arguments(Hyperparameters(batch_size=4, block_size=BLOCK), tmp_path, 1)

    def eval_loss(collator: object) -> float:
        trainer = Trainer(model=model, args=args, data_collator=collator)
        return trainer.evaluate(eval_dataset=evaluation)["eval_loss"]

    assert eval_loss(FullBatches(4)) == pytest.approx(eval_loss(default_data_collator), rel=1e-6)


@pytest.fixture
def dynamo_counters() -> Iterator[dict]:
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield torch._dynamo.utils.counters
    torch._dynamo.reset()


def run_compiled_job(make_dataset: MakeDataset, make_job: MakeJob, batch_size: int) -> Job:
    job_id, attempt = make_job(
        make_dataset(learnable_text(63)),
        validation_split=0.2,
        epochs=2,
        block_size=BLOCK,
        batch_size=batch_size,
        compile=True,
    )
    pipeline.run(job_id, attempt)
    return load_job(job_id)


def test_a_compiled_job_compiles_one_graph_for_training_and_one_for_evals(
    settings: Settings, make_dataset: MakeDataset, make_job: MakeJob, dynamo_counters: dict
) -> None:
    job = run_compiled_job(make_dataset, make_job, batch_size=4)

    assert job.status == "succeeded", job.error
    # The premise: training's epochs and the evals all end in a short batch.
    assert job.plan["blocks"] % 4 and job.plan["eval_blocks"] % 4, job.plan
    assert job.metrics["eval_loss"] < job.metrics["baseline_eval_loss"]
    # The evals' graph, then training's; before full batches, an eval's last batch added one.
    assert dynamo_counters["stats"]["unique_graphs"] == 2


def test_a_compiled_job_compiles_its_own_graphs_whatever_its_worker_compiled_before(
    settings: Settings, make_dataset: MakeDataset, make_job: MakeJob, dynamo_counters: dict
) -> None:
    # A long-lived worker meets dynamo's limit of graphs per function (8) after a few shapes
    # and models, and then runs eager; a limit of 2 shows it after one earlier job.
    with torch._dynamo.config.patch(recompile_limit=2):
        earlier = run_compiled_job(make_dataset, make_job, batch_size=4)
        graphs_before = dynamo_counters["stats"]["unique_graphs"]
        job = run_compiled_job(make_dataset, make_job, batch_size=6)

    assert earlier.status == job.status == "succeeded", job.error
    assert graphs_before == 2
    assert dynamo_counters["stats"]["unique_graphs"] - graphs_before == 2  # not 0: not eager
