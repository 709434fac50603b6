"""Batches are loaded where a job trains: in a Celery pool process, which may not start children.

On a GPU the job's loaders once asked for worker processes, and every GPU job failed at its
first batch ("daemonic processes are not allowed to have children"), which no CPU run could
show. The GPU's loader settings are checked here, in a pool process of the kind Celery forks.
"""

from pathlib import Path
from typing import Any

import billiard
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from worker.data import PackedBlocks
from worker.trainer import loader_arguments


def first_batches(output_dir: str, loader_settings: dict[str, Any]) -> list[list[int]]:
    """In the calling process: Trainer's training and eval loaders with these settings, and the
    shape of the first batch of each."""
    tiny = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=64))
    blocks = PackedBlocks(torch.arange(10 * 8).remainder(64).view(10, 8))
    arguments = TrainingArguments(
        output_dir=output_dir,
        use_cpu=True,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        report_to="none",
        **loader_settings,
    )
    trainer = Trainer(model=tiny, args=arguments, train_dataset=blocks, eval_dataset=blocks)
    loaders = [trainer.get_train_dataloader(), trainer.get_eval_dataloader()]
    return [list(next(iter(loader))["input_ids"].shape) for loader in loaders]


@pytest.mark.filterwarnings("ignore:.*pin_memory.*")  # no device to pin for on this machine
@pytest.mark.parametrize("cuda", [True, False], ids=["gpu", "cpu"])
def test_a_pool_process_loads_training_and_eval_batches(cuda: bool, tmp_path: Path) -> None:
    with billiard.Pool(1) as pool:
        shapes = pool.apply(first_batches, (str(tmp_path), loader_arguments(cuda)))

    assert shapes == [[4, 8], [4, 8]]


def test_loader_workers_would_fail_in_a_pool_process(tmp_path: Path) -> None:
    # What the GPU's settings were: the check above can tell them apart.
    workers = {"dataloader_num_workers": 2, "dataloader_persistent_workers": True}
    with billiard.Pool(1) as pool, pytest.raises(AssertionError, match="daemonic processes"):
        pool.apply(first_batches, (str(tmp_path), workers))
