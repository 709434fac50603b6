"""Training overhead: the service against the seed recipe as a bare script, side by side.

Same base model (GPT-2, 4 layers, 256 wide, random init, a 512-token byte-level BPE), same
training file, block size, batch size, step count and learning rate. The runs alternate
(bare, service, bare, service, ...) so the noisy shared machine treats both alike; the worker
process idles between its jobs.

- tokens/s: steps 1..N of each run (the bare script times `on_step_end`; the service's are the
  `created_at` of its metric rows, read from PostgreSQL at full precision).
- end to end: from just before `POST /jobs` to the job's `succeeded` event, minus the bare
  script's wall time (after its imports, which the idle worker has already done).
- breakdown: the job's events, read from the database (microsecond timestamps).

    python benchmarks/training_overhead.py [--runs 3] [--steps 40]
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from _common import ROOT, children_minor_faults, median, print_header, print_table, service_stack
from sqlalchemy import create_engine, text

MODEL = "bench-gpt2"
COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
THINGS = ["car", "house", "bird", "apple", "boat", "kite", "lamp", "door"]
VERBS = ["is next to", "is behind", "looks like", "is far from"]


def build_model(models_dir: Path) -> Path:
    """GPT-2 with 4 layers of width 256: big enough that a step dominates, small for CPU."""
    from tests.tiny_model import build_tiny_model

    return build_tiny_model(models_dir, MODEL, layers=4, width=256, heads=4, seed=1234)


def corpus(lines: int, offset: int = 0) -> bytes:
    rows = [
        f"the {COLORS[i % 8]} {THINGS[(i * 3) % 8]} {VERBS[(i // 8) % 4]} the "
        f"{COLORS[(i + 1) % 8]} {THINGS[(i * 5 + 1) % 8]}, number {i}."
        for i in range(offset, offset + lines)
    ]
    return ("\n".join(rows) + "\n").encode()


# Runs the script named after `-c` as its `__main__`, so that a prelude can run before it.
_RUN_SCRIPT = (
    "import runpy, sys\nsys.argv = sys.argv[1:]\nrunpy.run_path(sys.argv[0], run_name='__main__')\n"
)


def run_bare(
    model: Path, data: Path, args: argparse.Namespace, folder: Path, prelude: str = ""
) -> dict[str, Any]:
    """The seed recipe (`seed_trainer.py`) in a fresh process; `prelude`, Python code, runs
    first in that process."""
    out = folder / "bare.json"
    started = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            *(["-c", prelude + _RUN_SCRIPT] if prelude else []),
            str(ROOT / "benchmarks" / "seed_trainer.py"),
            "--model",
            str(model),
            "--data",
            str(data),
            "--block-size",
            str(args.block_size),
            "--batch-size",
            str(args.batch_size),
            "--max-steps",
            str(args.steps),
            "--out",
            str(out),
        ],
        check=True,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    result = json.loads(out.read_text())
    result["spawn_wall_s"] = time.perf_counter() - started
    return result


# (label, event message prefix): the job's life in the order the pipeline writes it.
MARKS = [
    ("claimed", "job claimed"),
    ("load_start", "loading base model"),
    ("loaded", "base model "),
    ("tokenized", None),  # "... examples tokenized into ..."
    ("baseline_eval", "baseline eval"),
    ("train_start", "training started"),
    ("final_eval", "final eval"),
    ("save_start", "saving the model"),
    ("package_start", "packaging the artifact"),
    ("succeeded", "job succeeded"),
]


def stage_marks(events: list[tuple[str, datetime]]) -> dict[str, datetime]:
    found: dict[str, datetime] = {}
    for message, at in events:
        for label, prefix in MARKS:
            if label in found:
                continue
            hit = (" tokenized into " in message) if prefix is None else message.startswith(prefix)
            if label == "loaded" and not message.endswith(")"):
                hit = False  # "base model X loaded (N parameters)", not "loading base model"
            if hit:
                found[label] = at
                break
    return found


def run_service(
    stack: Any, train_id: str, eval_id: str, args: argparse.Namespace, **hyperparameters: Any
) -> dict:
    """One job through the service, timed from its events and metric rows; `hyperparameters`
    add to or replace the benchmark's."""
    body = {
        "base_model": MODEL,
        "dataset_id": train_id,
        "validation_dataset_id": eval_id,
        "hyperparameters": {
            "max_steps": args.steps,
            "batch_size": args.batch_size,
            "block_size": args.block_size,
            "learning_rate": 5e-4,
            "seed": 42,
            **hyperparameters,
        },
    }
    faults_before = children_minor_faults(stack.worker_pid)
    with httpx.Client(base_url=stack.base_url, headers=stack.headers, timeout=30) as client:
        submitted = datetime.now(UTC)
        job = client.post("/jobs", json=body).raise_for_status().json()
        deadline = time.monotonic() + 600
        while client.get(f"/jobs/{job['id']}").json()["status"] not in (
            "succeeded",
            "failed",
            "cancelled",
        ):
            if time.monotonic() > deadline:
                raise TimeoutError(job["id"])
            time.sleep(1.0)  # slow polls: the API must not steal CPU from training
        status = client.get(f"/jobs/{job['id']}").json()["status"]
        if status != "succeeded":
            events = client.get(f"/jobs/{job['id']}/events").json()
            raise RuntimeError(f"job {status}: {events}")
    pool_minor_faults = children_minor_faults(stack.worker_pid) - faults_before
    engine = create_engine(stack.database_url)
    with engine.connect() as connection:
        created = connection.execute(
            text("SELECT created_at FROM jobs WHERE id = :id"), {"id": job["id"]}
        ).scalar_one()
        events = [
            (row.message, row.created_at)
            for row in connection.execute(
                text("SELECT message, created_at FROM job_events WHERE job_id = :id ORDER BY seq"),
                {"id": job["id"]},
            )
        ]
        steps = {
            row.step: row.created_at
            for row in connection.execute(
                text(
                    "SELECT step, created_at FROM job_metrics "
                    "WHERE job_id = :id AND train_loss IS NOT NULL ORDER BY seq"
                ),
                {"id": job["id"]},
            )
        }
    engine.dispose()
    marks = stage_marks(events)
    first, last = min(steps), max(steps)
    tokens_per_step = args.batch_size * args.block_size
    window = (steps[last] - steps[first]).total_seconds()

    def span(a: str, b: str) -> float:
        if a not in marks or b not in marks:
            return float("nan")
        return (marks[b] - marks[a]).total_seconds()

    return {
        "tokens_per_second": tokens_per_step * (last - first) / window,
        "pool_minor_faults": pool_minor_faults,
        "e2e_s": (marks["succeeded"] - submitted).total_seconds(),
        "api_s": (created - submitted).total_seconds(),
        "queue_wait_s": (marks["claimed"] - created).total_seconds(),
        "inputs_s": span("claimed", "load_start"),
        "model_load_s": span("load_start", "loaded"),
        "tokenize_s": span("loaded", "tokenized"),
        "baseline_eval_s": span("tokenized", "baseline_eval"),
        "to_train_start_s": span("baseline_eval", "train_start"),
        "train_s": (steps[last] - marks["train_start"]).total_seconds(),
        "final_eval_s": (marks["final_eval"] - steps[last]).total_seconds(),
        "to_save_s": span("final_eval", "save_start"),
        "save_s": span("save_start", "package_start"),
        "package_s": span("package_start", "succeeded"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=64)
    args = parser.parse_args()
    print_header("training overhead: service vs seed recipe (bare Trainer script)")

    with tempfile.TemporaryDirectory(prefix="tunery-bench-train-") as folder_name:
        folder = Path(folder_name)
        models = folder / "models"
        model = build_model(models)
        train_file = folder / "train.txt"
        train_file.write_bytes(corpus(4000))
        eval_file = folder / "eval.txt"
        eval_file.write_bytes(corpus(200, offset=100_000))
        with service_stack(worker=True, models_dir=models) as stack:
            ids = [stack.upload(path.name, path.read_bytes()) for path in (train_file, eval_file)]
            bare_runs, service_runs = [], []
            for index in range(args.runs):
                bare_runs.append(run_bare(model, train_file, args, folder))
                service_runs.append(run_service(stack, ids[0], ids[1], args))
                print(
                    f"   run {index + 1}: bare {bare_runs[-1]['tokens_per_second']:,.0f} tok/s, "
                    f"service {service_runs[-1]['tokens_per_second']:,.0f} tok/s",
                    flush=True,
                )

    # Each pair ran back to back: the median of the pairs' ratios is steadier than the ratio of
    # the medians when the machine's load changes between pairs.
    pair_ratio = median(
        [
            s["tokens_per_second"] / b["tokens_per_second"]
            for s, b in zip(service_runs, bare_runs, strict=True)
        ]
    )
    pair_added = median(
        [s["e2e_s"] - b["script_wall_s"] for s, b in zip(service_runs, bare_runs, strict=True)]
    )
    bare_tps = median([r["tokens_per_second"] for r in bare_runs])
    service_tps = median([r["tokens_per_second"] for r in service_runs])
    bare_wall = median([r["script_wall_s"] for r in bare_runs])
    bare_process = median([r["process_wall_s"] for r in bare_runs])
    e2e = median([r["e2e_s"] for r in service_runs])
    print(
        f"\nGPT-2 4x256, block {args.block_size}, batch {args.batch_size}, {args.steps} steps, "
        f"median of {args.runs} alternating runs\n"
    )
    print_table(
        ["measure", "bare script", "service", "ratio / added", "goal"],
        [
            [
                "train tokens/s (steps 1..N)",
                bare_tps,
                service_tps,
                f"{pair_ratio:.3f} (pairs)",
                ">= 0.95",
            ],
            [
                "wall: bare after imports / service submit->succeeded (s)",
                bare_wall,
                e2e,
                f"{pair_added:+.2f} s (pairs)",
                "<= +10 s",
            ],
            ["bare process wall incl. imports (s)", bare_process, "", "", ""],
            [
                "minor page faults: bare training / the whole job in the pool process",
                median([r["train_minor_faults"] for r in bare_runs]),
                median([r["pool_minor_faults"] for r in service_runs]),
                "",
                "",
            ],
        ],
    )
    print("\nservice time breakdown (median s; from the job's events in PostgreSQL)\n")
    keys = [k for k in service_runs[0] if k.endswith("_s") and k != "e2e_s"]
    bare_keys = {
        "model_load_s": "load_s",
        "tokenize_s": "tokenize_s",
        "train_s": "train_s",
        "save_s": "save_s",
    }
    print_table(
        ["stage", "service", "bare script"],
        [
            [
                key.removesuffix("_s"),
                median([r[key] for r in service_runs]),
                median([r[bare_keys[key]] for r in bare_runs]) if key in bare_keys else "",
            ]
            for key in keys
        ],
    )


if __name__ == "__main__":
    main()
