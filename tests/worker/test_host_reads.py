"""Training reads device values on the host only at logging steps.

On a GPU every such read (`.item()`, `bool(tensor)`, ...) makes the host wait for the device, so
one per step would keep the GPU idle while the next step's kernels are queued. The reads are
torch calls, which a `TorchFunctionMode` sees on any device: here they are counted per step of
a real job on the CPU.
"""

import traceback
from collections import defaultdict
from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode
from transformers import TrainerCallback

from shared.settings import Settings
from tests.worker.conftest import MakeDataset, MakeJob
from tests.worker.helpers import load_job
from tests.worker.test_pipeline import hook_trainer, small_dataset
from worker import pipeline
from worker.trainer import logging_steps

SAMPLER = "torch/utils/data/sampler.py"
LOADER = "torch/utils/data/dataloader.py"
# Eager transformers asks whether packed rows hold several examples with one read per forward
# (`find_packed_sequence_indices`); under `compile` it does not. Our masked shapes pay it.
TRANSFORMERS_PACKING_CHECK = "transformers/masking_utils.py"
MAX_STEPS = 150  # long enough that logging is every 3 steps, not every step

# The torch calls that hand a tensor's value to Python.
HOST_READS = frozenset(
    {
        torch.Tensor.item,
        torch.Tensor.tolist,
        torch.Tensor.numpy,
        torch.Tensor.cpu,
        torch.Tensor.__bool__,
        torch.Tensor.__int__,
        torch.Tensor.__float__,
        torch.Tensor.__index__,
        torch.Tensor.__format__,
        torch.Tensor.nonzero,
        torch.nonzero,
        torch.Tensor.masked_select,
        torch.masked_select,
        torch.unique,
        torch.equal,
    }
)


class HostReads(TrainerCallback):
    """The host reads of each optimizer step, from its start to the next one's (so a step's
    logging counts with it), each named by the line of our or a library's code that made it."""

    def __init__(self) -> None:
        self.by_step: dict[int, list[str]] = defaultdict(list)
        self.step = 0
        self.mode = ReadRecorder(self)

    def on_step_begin(self, args: Any, state: Any, control: Any, **_: Any) -> None:
        if self.step == 0:
            self.mode.__enter__()
        self.step = state.global_step + 1

    def on_train_end(self, *_: Any, **__: Any) -> None:
        if self.step:
            self.mode.__exit__(None, None, None)


def epoch_start(frame: traceback.FrameSummary) -> bool:
    """Each epoch the sampler draws its order, and a new loader iterator its base seed, from
    CPU generators, on a GPU machine too: no device value is read."""
    loader_seed = frame.filename.endswith(LOADER) and frame.name == "__init__"
    return frame.filename.endswith(SAMPLER) or loader_seed


class ReadRecorder(TorchFunctionMode):
    def __init__(self, reads: HostReads) -> None:
        super().__init__()
        self.reads = reads

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func in HOST_READS:
            callers = traceback.extract_stack(limit=8)[:-1]
            if not any(epoch_start(frame) for frame in callers):
                caller = callers[-1]
                where = caller.filename.split("site-packages/")[-1]
                self.reads.by_step[self.reads.step].append(f"{where}:{caller.lineno}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("shape", ["text", "prompt_completion"])
def test_training_reads_device_values_only_at_logging_steps(
    settings: Settings,
    make_dataset: MakeDataset,
    make_job: MakeJob,
    monkeypatch: pytest.MonkeyPatch,
    shape: str,
) -> None:
    reads = HostReads()
    hook_trainer(monkeypatch, reads)
    dataset_id = small_dataset(make_dataset, shape)
    job_id, attempt = make_job(dataset_id, block_size=32, batch_size=2, max_steps=MAX_STEPS)

    pipeline.run(job_id, attempt)

    assert load_job(job_id).status == "succeeded"
    every = logging_steps(MAX_STEPS)
    assert every == 3
    logging = {step for step in range(1, MAX_STEPS + 1) if step == 1 or step % every == 0}
    between_logs = [
        caller for step, found in reads.by_step.items() if step not in logging for caller in found
    ]
    if shape != "text":  # text trains with the causal flag: transformers has nothing to check
        between_logs = [c for c in between_logs if not c.startswith(TRANSFORMERS_PACKING_CHECK)]
    assert between_logs == []
    # The logged loss is read at each logging step: the recorder sees reads where there are some.
    assert all(reads.by_step[step] for step in logging)
