"""The device a worker trains on, decided once, before it starts (`TUNERY_DEVICE`).

`auto` trains on the GPU when torch can use one and on the CPU otherwise, but refuses to start
on a host that has an NVIDIA GPU torch cannot use (a CPU-only build of torch, or a CUDA build
newer than the driver): training there on the CPU would be a slow surprise. `cuda` refuses to
start without CUDA; `cpu` trains on the CPU even where a GPU is there.
"""

import os
import shutil
from pathlib import Path

import torch


def has_nvidia_gpu() -> bool:
    """An NVIDIA GPU is visible to this process (its device node, or the driver's tool)."""
    return Path("/dev/nvidiactl").exists() or shutil.which("nvidia-smi") is not None


def _why_not_cuda() -> str:
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    try:
        torch.cuda.init()
    except Exception as error:  # the driver's own words: too old, no device, ...
        reason = next((line for line in str(error).splitlines() if line.strip()), repr(error))
        return f"torch {torch.__version__} (CUDA {torch.version.cuda}) cannot use it: {reason}"
    return f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no GPU"


def refuse_to_start(setting: str, gpu_host: bool | None = None) -> str | None:
    """Why this worker must not start with `TUNERY_DEVICE=setting`, or None. With `cpu`, hides
    the GPUs from this process and its pool children (before CUDA starts)."""
    if setting == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        return None
    if torch.cuda.is_available():
        return None
    if setting == "cuda":
        return f"TUNERY_DEVICE is cuda, but {_why_not_cuda()}"
    if gpu_host if gpu_host is not None else has_nvidia_gpu():
        return (
            f"this host has an NVIDIA GPU, but {_why_not_cuda()}: install a torch build for "
            "your driver (README, Install), or set TUNERY_DEVICE=cpu to train on the CPU"
        )
    return None
