"""Checkpoint store: how long the training loop waits while a checkpoint reaches storage.

Files of the size Trainer writes for GPT-2 124M (498 MB of weights, 995 MB of AdamW state, and
the small files) are written into a work folder under the service's home, as Trainer writes
them, and then stored with `shared.checkpoints.write`: hashed, flushed to disk and moved into
storage whole (storage is under the same home, as in the embedded default). Side by side, the
same files are stored by a plain copy flushed to disk, the least a store that survives a crash
must do (`cp` then `sync`). Each run writes fresh files, so both read them from the page cache
as the real store does. The two alternate; the median of `--runs` is reported.

    python benchmarks/checkpoint_store.py [--runs 5] [--scale 1.0]
"""

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from _common import median, print_header, print_table

from shared import checkpoints, storage
from shared.settings import get_settings

FILES_MB = {"model.safetensors": 498, "optimizer.pt": 995, "scheduler.pt": 0.001}
_BLOCK = os.urandom(1 << 20)


def write_checkpoint(folder: Path, scale: float) -> int:
    """Trainer's files, not yet flushed to disk (as torch.save leaves them); their bytes."""
    folder.mkdir(parents=True)
    total = 0
    for name, megabytes in FILES_MB.items():
        size = max(1, int(megabytes * scale * (1 << 20)))
        with open(folder / name, "wb") as stream:
            for start in range(0, size, len(_BLOCK)):
                total += stream.write(_BLOCK[: min(len(_BLOCK), size - start)])
    return total


def plain_copy(source: Path, target: Path) -> None:
    target.mkdir(parents=True)
    for file in sorted(source.iterdir()):
        shutil.copyfile(file, target / file.name)
        with open(target / file.name, "rb") as stream:
            os.fsync(stream.fileno())


def timed(store: Callable[[Path], None], work: Path, scale: float) -> tuple[float, int]:
    """Seconds to store a freshly written checkpoint, and its bytes."""
    source = work / "checkpoint"
    size = write_checkpoint(source, scale)
    started = time.perf_counter()
    store(source)
    seconds = time.perf_counter() - started
    shutil.rmtree(source, ignore_errors=True)
    return seconds, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--scale", type=float, default=1.0, help="of GPT-2 124M's files")
    args = parser.parse_args()
    print_header("checkpoint store: checkpoints.write against a plain copy flushed to disk")
    with tempfile.TemporaryDirectory(prefix="tunery-bench-checkpoint-") as home:
        os.environ["TUNERY_HOME"] = home
        get_settings.cache_clear()
        work, copy = Path(home) / "work", Path(home) / "copy"
        ours, plain, size = [], [], 0
        for run in range(args.runs):
            seconds, size = timed(
                lambda source: checkpoints.write("job_bench", 1, source, {}), work, args.scale
            )
            ours.append(seconds)
            plain.append(timed(lambda source: plain_copy(source, copy), work, args.scale)[0])
            shutil.rmtree(copy)
            checkpoints.delete_all("job_bench")
            print(f"   run {run + 1}: ours {ours[-1]:.2f} s, plain copy {plain[-1]:.2f} s")
        shared_disk = work.stat().st_dev == storage.root().stat().st_dev
    print(f"\n{size / 1e6:,.0f} MB a checkpoint; work and storage on one filesystem: {shared_disk}")
    ratios = [a / b for a, b in zip(ours, plain, strict=True)]
    print_table(
        ["store", "median s", "MB/s", "ours / plain copy (median of pairs)"],
        [
            ["checkpoints.write", median(ours), size / 1e6 / median(ours), median(ratios)],
            ["plain copy + fsync", median(plain), size / 1e6 / median(plain), ""],
        ],
    )


if __name__ == "__main__":
    main()
