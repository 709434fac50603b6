"""Compiled jobs batch in one shape: one graph for training, one for evaluation, and the same
losses and gradients as without the filler rows."""

import json
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset as TorchDataset
from transformers import AutoModelForCausalLM, PreTrainedModel, Trainer, default_data_collator

from shared.models import Job
from shared.schemas import Hyperparameters
from shared.settings import Settings
from tests.conftest import TINY_MODEL
from tests.worker.conftest import MakeDataset, MakeJob
from tests.worker.helpers import learnable_text, load_job
from worker import pipeline
from worker.collate import (
    Collate,
    FullBatches,
    PackedCollator,
    PackedDataset,
    compiled_collator,
)
from worker.data import PackedBlocks
from worker.masking import IGNORE_INDEX, TokenizedExample
from worker.packing import pack_examples
from worker.trainer import training_arguments

BLOCK = 32


@pytest.fixture
def model(models_dir: Path) -> PreTrainedModel:
    model = AutoModelForCausalLM.from_pretrained(models_dir / TINY_MODEL)
    model.loss_type = "ForCausalLM"
    return model.eval()  # no dropout: the two batchings must compute the same function


def text_blocks(rows: int) -> PackedBlocks:
    ids = torch.randint(0, 500, (rows, BLOCK), dtype=torch.int32, generator=torch.manual_seed(0))
    return PackedBlocks(ids)


def packed_rows(rows: int) -> PackedDataset:
    """Rows of prompt/completion-like examples of 5 to 20 tokens, packed (not all full)."""
    generator = random.Random(0)
    examples = []
    while True:
        data = pack_examples(examples, BLOCK)
        if len(data) == rows:
            return PackedDataset(data)
        ids = [generator.randrange(1, 500) for _ in range(generator.randrange(5, 21))]
        examples.append(TokenizedExample(ids, [IGNORE_INDEX] * 3 + ids[3:]))


# (dataset of 6 rows, the collator a job gives it, the compiled model's collator at batch 4)
def text_case() -> tuple[TorchDataset, Collate, Collate]:
    data = text_blocks(6)
    return data, default_data_collator, compiled_collator(default_data_collator, [data], 4)


def packed_case() -> tuple[TorchDataset, Collate, Collate]:
    data = packed_rows(6)
    collator = PackedCollator("packed", 0)
    return data, collator, compiled_collator(collator, [data], 4)


CASES = {"text": text_case, "packed": packed_case}


def test_a_short_batch_is_filled_with_rows_the_loss_ignores() -> None:
    data = text_blocks(3)

    batch = FullBatches(default_data_collator, 4)([data[i] for i in range(3)])
    full = FullBatches(default_data_collator, 4)([data[i] for i in range(3)] + [data[0]])

    assert batch["input_ids"].shape == batch["labels"].shape == (4, BLOCK)
    assert torch.equal(batch["input_ids"][:3], data.blocks.long())
    assert torch.equal(batch["labels"][:3], data.blocks.long())
    assert torch.equal(batch["input_ids"][3], data.blocks[0].long())
    assert bool((batch["labels"][3] == IGNORE_INDEX).all())
    assert bool((full["labels"] != IGNORE_INDEX).all())  # a full batch is left as it is


def test_packed_rows_of_a_compiled_model_have_one_shape() -> None:
    data, collator, compiled = packed_case()
    longest = data.longest_row
    lengths = {len(data[i]["input_ids"]) for i in range(len(data))}

    as_job = [collator([data[i] for i in batch]) for batch in ([0, 1, 2, 3], [4, 5])]
    as_compiled = [compiled([data[i] for i in batch]) for batch in ([0, 1, 2, 3], [4, 5])]

    assert len(lengths) > 1  # the premise: rows of several lengths
    assert {batch["input_ids"].shape for batch in as_job} != {(4, longest)}
    assert {batch["input_ids"].shape for batch in as_compiled} == {(4, longest)}
    assert {batch["position_ids"].shape for batch in as_compiled} == {(4, longest)}
    assert bool((as_compiled[1]["labels"][2:] == IGNORE_INDEX).all())


@pytest.mark.parametrize("case", CASES)
def test_filled_batches_give_the_same_loss_and_gradients(model: PreTrainedModel, case: str) -> None:
    data, collator, compiled = CASES[case]()
    features = [data[i] for i in range(3)]

    def loss_and_gradients(batch: dict[str, torch.Tensor]) -> tuple[float, list[torch.Tensor]]:
        model.zero_grad()
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters()]

    short_loss, short_gradients = loss_and_gradients(collator(features))
    filled_loss, filled_gradients = loss_and_gradients(compiled(features))

    assert compiled(features)["input_ids"].shape[0] == 4
    assert filled_loss == pytest.approx(short_loss, rel=1e-6)
    for filled, short in zip(filled_gradients, short_gradients, strict=True):
        torch.testing.assert_close(filled, short, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("case", CASES)
def test_trainer_evaluates_the_same_loss_on_filled_batches(
    model: PreTrainedModel, tmp_path: Path, case: str
) -> None:
    # 6 rows at batch 4: a full batch and a batch of 2, counted by its 2 rows.
    data, collator, compiled = CASES[case]()
    args = training_arguments(Hyperparameters(batch_size=4, block_size=BLOCK), tmp_path, 1)

    def eval_loss(collate: Collate) -> float:
        trainer = Trainer(model=model, args=args, data_collator=collate)
        return trainer.evaluate(eval_dataset=data)["eval_loss"]

    assert eval_loss(compiled) == pytest.approx(eval_loss(collator), rel=1e-6)


@pytest.fixture
def dynamo_counters() -> Iterator[dict]:
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield torch._dynamo.utils.counters
    torch._dynamo.reset()


def run_compiled_job(
    make_dataset: MakeDataset, make_job: MakeJob, batch_size: int, shape: str = "text"
) -> Job:
    if shape == "text":
        dataset_id = make_dataset(learnable_text(63))
    else:  # two to six tokens of completion: packed rows of several lengths
        rows = [{"prompt": f"the {i} is", "completion": " red" * (2 + i % 5)} for i in range(90)]
        lines = "".join(json.dumps(row) + "\n" for row in rows)
        dataset_id = make_dataset(lines, format="jsonl", shape=shape)
    job_id, attempt = make_job(
        dataset_id,
        validation_split=0.2,
        epochs=2,
        block_size=BLOCK,
        batch_size=batch_size,
        compile=True,
    )
    pipeline.run(job_id, attempt)
    return load_job(job_id)


@pytest.mark.parametrize("shape", ["text", "prompt_completion"])
def test_a_compiled_job_compiles_one_graph_for_training_and_one_for_evals(
    settings: Settings,
    make_dataset: MakeDataset,
    make_job: MakeJob,
    dynamo_counters: dict,
    shape: str,
) -> None:
    job = run_compiled_job(make_dataset, make_job, batch_size=4, shape=shape)

    assert job.status == "succeeded", job.error
    # The premise: training's epochs and the evals all end in a short batch.
    assert job.plan["blocks"] % 4 and job.plan["eval_blocks"] % 4, job.plan
    assert job.plan["collation"] == ("blocks" if shape == "text" else "packed")
    assert job.metrics["eval_loss"] < job.metrics["baseline_eval_loss"]
    # The evals' graph, then training's; before full batches, short batches (and, for packed
    # rows, other lengths) added two more.
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
