"""Memory reuse in CPU training: the seed recipe with glibc's allocator defaults against the
same recipe with the settings the worker's training process uses
(`worker.trainer.keep_freed_training_memory`), side by side.

Both sides run `benchmarks/seed_trainer.py`, the bare script of `training_overhead.py`, on its
model and data, each in a fresh process; the second calls the worker's function first. The runs
alternate (defaults, kept, defaults, kept, ...). Per run: training tokens/s over steps 1..N,
the median step time, and the minor page faults during `trainer.train()`.

    python benchmarks/allocator.py [--runs 6] [--steps 30]
"""

import argparse
import tempfile
from pathlib import Path

from _common import median, print_header, print_table
from training_overhead import build_model, corpus, run_bare

KEEP_FREED = (
    "from worker.trainer import keep_freed_training_memory\nassert keep_freed_training_memory()\n"
)


def run(
    keep_freed: bool, model: Path, data: Path, args: argparse.Namespace, folder: Path
) -> dict[str, float]:
    result = run_bare(model, data, args, folder, prelude=KEEP_FREED if keep_freed else "")
    return {
        "tokens_per_second": result["tokens_per_second"],
        "median_step_ms": 1000 * result["median_step_s"],
        "minor_faults": result["train_minor_faults"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=64)
    args = parser.parse_args()
    print_header("memory reuse in CPU training: glibc defaults vs the worker's settings")

    sides = {"glibc defaults": False, "worker's settings": True}
    runs: dict[str, list[dict[str, float]]] = {side: [] for side in sides}
    with tempfile.TemporaryDirectory(prefix="tunery-bench-allocator-") as folder_name:
        folder = Path(folder_name)
        model = build_model(folder / "models")
        data = folder / "train.txt"
        data.write_bytes(corpus(4000))
        for index in range(args.runs):
            for side, keep_freed in sides.items():
                runs[side].append(run(keep_freed, model, data, args, folder))
            default, kept = (runs[side][-1] for side in sides)
            print(
                f"   run {index + 1}: defaults {default['tokens_per_second']:,.0f} tok/s, "
                f"{default['minor_faults']:,} faults; kept {kept['tokens_per_second']:,.0f} "
                f"tok/s, {kept['minor_faults']:,} faults",
                flush=True,
            )

    def middle(side: str, key: str) -> float:
        return median([r[key] for r in runs[side]])

    def pair_ratio(key: str) -> float:
        pairs = zip(*runs.values(), strict=True)
        return median([kept[key] / default[key] for default, kept in pairs])

    print(
        f"\nGPT-2 4x256, block {args.block_size}, batch {args.batch_size}, {args.steps} steps, "
        f"median of {args.runs} alternating runs\n"
    )
    print_table(
        ["measure", *sides, "kept / defaults"],
        [
            [
                "train tokens/s (steps 1..N)",
                *(round(middle(side, "tokens_per_second"), 1) for side in sides),
                f"{pair_ratio('tokens_per_second'):.3f} (pairs)",
            ],
            [
                "median step time, ms",
                *(round(middle(side, "median_step_ms"), 1) for side in sides),
                f"{pair_ratio('median_step_ms'):.3f} (pairs)",
            ],
            [
                "minor page faults in training",
                *(round(middle(side, "minor_faults")) for side in sides),
                "",
            ],
        ],
    )


if __name__ == "__main__":
    main()
