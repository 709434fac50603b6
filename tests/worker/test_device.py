"""A worker decides its device before it starts (`TUNERY_DEVICE`), and never trains on the CPU
by surprise on a host whose GPU torch cannot use. This machine has no GPU: a GPU host is
pretended only where the check asks whether the host has one."""

import subprocess
import sys
from pathlib import Path

import torch

from tests.processes import tunery_environment
from worker.device import refuse_to_start


def test_a_worker_told_to_use_cuda_refuses_to_start_without_it_in_one_line(
    tmp_path: Path,
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "shared.cli", "worker"],
        env=tunery_environment(home=str(tmp_path / "home"), device="cuda"),
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert done.returncode == 1
    [line] = done.stderr.strip().splitlines()
    assert line == (
        f"tunery worker: TUNERY_DEVICE is cuda, but torch {torch.__version__} is a CPU-only build"
    )


def test_auto_refuses_a_gpu_host_whose_gpu_torch_cannot_use() -> None:
    reason = refuse_to_start("auto", gpu_host=True)

    assert reason is not None
    assert f"torch {torch.__version__} is a CPU-only build" in reason
    assert "set TUNERY_DEVICE=cpu to train on the CPU" in reason
    assert refuse_to_start("auto", gpu_host=False) is None  # a CPU host trains on the CPU


def test_cpu_hides_the_gpus_before_cuda_starts() -> None:
    code = (
        "import os; from worker.device import refuse_to_start; import torch; "
        "print(refuse_to_start('cpu'), repr(os.environ['CUDA_VISIBLE_DEVICES']), "
        "torch.cuda.is_available())"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)

    assert done.stdout.split() == ["None", "''", "False"]
