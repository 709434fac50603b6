"""Compiled jobs on a CPU: what `compile: true` adds to a real job, stage by stage, against the
same job in eager mode, and the recompilations the worker logged.

The job is the usual one: text (or, with `--shape prompt_completion`, a masked shape in packed
rows) with a validation set (jobs hold out 10% by default), two epochs, and a training set and a
validation set that both end in a short batch, as real data does. Each run starts its own
service, so that the compiled job is the first one a fresh worker process compiles, with an
empty inductor cache; the eager job runs first, then the compiled one, then the compiled one
again (what the worker's next job of the same shapes pays). The worker logs its
recompilations (`TORCH_LOGS=recompiles`), and the script prints what triggered each.

    python benchmarks/compiled_job.py [--runs 3]
    python benchmarks/compiled_job.py --runs 3 --shape prompt_completion --block-size 128
"""

import argparse
import json
import math
import os
import re
import tempfile
from collections import Counter
from pathlib import Path

import httpx
from _common import Stack, median, print_header, print_table, service_stack
from training_overhead import MODEL, build_model, corpus, run_service

# `[__recompiles]     - 0/1: tensor 'L['input_ids']' size mismatch ...`: the first failed
# guard of each recompilation (later lines name the older graphs' guards).
_TRIGGER = re.compile(r"\[__recompiles\]\s+triggered by.*\n.*\[__recompiles\]\s+- [\d/]+: (.*)")
STAGES = ["baseline_eval_s", "to_train_start_s", "train_s", "final_eval_s", "e2e_s"]


def prompt_completion_pairs(lines: int, offset: int = 0) -> bytes:
    """The text corpus's sentences cut into a prompt and a completion: a masked shape, about 37
    tokens an example, so three to a packed row at block size 128."""
    rows = []
    for line in corpus(lines, offset).decode().splitlines():
        prompt, completion = line.split(",")
        rows.append(json.dumps({"prompt": prompt + ",", "completion": completion}))
    return ("\n".join(rows) + "\n").encode()


def recompilations(worker_log: str) -> list[str]:
    """What triggered each recompilation the worker logged, with tensor names left out."""
    return [re.sub(r"'[^ ]*' ", "", match.strip()) for match in _TRIGGER.findall(worker_log)]


def planned_blocks(stack: Stack, train_id: str, eval_id: str, args: argparse.Namespace) -> dict:
    """The dry run's plan: how many training and validation blocks the job will have."""
    body = {
        "base_model": MODEL,
        "dataset_id": train_id,
        "validation_dataset_id": eval_id,
        "dry_run": True,
        "hyperparameters": {"batch_size": args.batch_size, "block_size": args.block_size},
    }
    with httpx.Client(base_url=stack.base_url, headers=stack.headers, timeout=120) as client:
        job = client.post("/jobs", json=body).raise_for_status().json()
    assert job["status"] == "succeeded", job
    return job["plan"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--train-lines", type=int, default=400)
    parser.add_argument("--eval-lines", type=int, default=30)
    parser.add_argument("--shape", choices=["text", "prompt_completion"], default="text")
    args = parser.parse_args()
    print_header("compiled job: compile: true against eager, same job, fresh worker each run")
    os.environ["TORCH_LOGS"] = "recompiles"  # the service's processes inherit the environment
    jobs: dict[str, list[dict]] = {"eager": [], "compiled": [], "compiled again": []}
    triggers = Counter[str]()
    with tempfile.TemporaryDirectory(prefix="tunery-bench-compile-") as folder_name:
        folder = Path(folder_name)
        models = folder / "models"
        build_model(models)
        data = corpus if args.shape == "text" else prompt_completion_pairs
        suffix = ".txt" if args.shape == "text" else ".jsonl"
        files = {
            f"train{suffix}": data(args.train_lines),
            f"eval{suffix}": data(args.eval_lines, offset=100_000),
        }
        for run in range(args.runs):
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder / f"inductor-{run}")
            with service_stack(worker=True, models_dir=models) as stack:
                train_id, eval_id = (stack.upload(name, body) for name, body in files.items())
                plan = planned_blocks(stack, train_id, eval_id, args)
                short = {"blocks": plan["blocks"], "eval_blocks": plan["eval_blocks"]}
                if any(blocks % args.batch_size == 0 for blocks in short.values()):
                    raise SystemExit(f"no short last batch in {short}: change the line counts")
                args.steps = 2 * math.ceil(plan["blocks"] / args.batch_size)  # two epochs
                # The same compiled job twice: the second is what a worker's next job of the
                # same shapes pays.
                for kind, runs in jobs.items():
                    compiled = kind != "eager"
                    runs.append(run_service(stack, train_id, eval_id, args, compile=compiled))
                found = recompilations((stack.folder / "worker.log").read_text(errors="replace"))
            triggers.update(found)
            seconds = ", ".join(f"{kind} {runs[-1]['e2e_s']:.1f}" for kind, runs in jobs.items())
            print(
                f"   run {run + 1}: {short['blocks']} blocks, {short['eval_blocks']} eval blocks, "
                f"{args.steps} steps; job seconds: {seconds}; {len(found)} recompilations",
                flush=True,
            )

    print(
        f"\n{args.shape}, GPT-2 4x256, block {args.block_size}, batch {args.batch_size}, "
        f"median of {args.runs} runs (seconds; added: against the eager job of the same run)\n"
    )
    eager = jobs["eager"]
    rows = []
    for stage in STAGES:
        row: list[object] = [stage.removesuffix("_s")]
        row += [median([r[stage] for r in runs]) for runs in jobs.values()]
        for kind in ("compiled", "compiled again"):
            added = [c[stage] - e[stage] for c, e in zip(jobs[kind], eager, strict=True)]
            row.append(f"{median(added):+.1f}")
        rows.append(row)
    tokens = [median([r["tokens_per_second"] for r in runs]) for runs in jobs.values()]
    rows.append(["train tokens/s (logged steps)", *tokens, "", ""])
    print_table(["stage", *jobs, "compiled adds", "again adds"], rows)
    print(f"\nrecompilations in {2 * args.runs} compiled jobs (a job's first graph is not one):")
    for trigger, count in triggers.most_common():
        print(f"   {count} x {trigger}")


if __name__ == "__main__":
    main()
