"""Dry run latency: POST /jobs with `dry_run: true` on a 10 MB dataset, idle worker on Redis and
PostgreSQL, answered in the response (issue goal: within 5 s).

Each run uploads a dataset no earlier run has seen (a different seed), so the token cache never
answers: these are cold dry runs. A text, a prompt/completion and a chat (`messages`) dataset.

    python benchmarks/dry_run.py [--runs 3] [--megabytes 10]
"""

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import httpx
from _common import machine, median, print_header, print_table, service_stack

from tests.tiny_model import build_tiny_model

WORDS = [
    "the",
    "model",
    "learns",
    "from",
    "data",
    "that",
    "services",
    "upload",
    "and",
    "train",
    "on",
    "every",
    "day",
]


def dataset(shape: str, megabytes: int, seed: int) -> bytes:
    rng = random.Random(seed)
    lines: list[str] = []
    size = 0
    while size < megabytes * 1_000_000:
        sentence = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 24)))
        if shape == "text":
            line = sentence
        elif shape == "prompt_completion":
            line = json.dumps({"prompt": sentence + "?", "completion": " " + sentence[::-1]})
        else:  # a two-turn conversation, rendered with the model's (default) chat template
            turns = [("user", sentence + "?"), ("assistant", sentence[::-1])]
            line = json.dumps({"messages": [{"role": r, "content": c} for r, c in turns]})
        lines.append(line)
        size += len(line) + 1
    return ("\n".join(lines) + "\n").encode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--megabytes", type=int, default=10)
    args = parser.parse_args()
    print_header(f"Dry run of a {args.megabytes} MB dataset, idle worker")
    print(f"   {machine()}")
    with tempfile.TemporaryDirectory(prefix="tunery-bench-dry-") as folder:
        models = Path(folder) / "models"
        build_tiny_model(models, "tiny-gpt2")
        with service_stack(worker=True, models_dir=models) as stack:
            http = httpx.Client(base_url=stack.base_url, headers=stack.headers, timeout=120)
            times: dict[str, list[float]] = {"text": [], "prompt_completion": [], "messages": []}
            for run in range(args.runs):
                for shape in times:
                    body = dataset(shape, args.megabytes, seed=run * 10 + len(shape))
                    name = "data.txt" if shape == "text" else "data.jsonl"
                    uploaded = http.post("/datasets", files={"file": (name, body)}).json()
                    started = time.perf_counter()
                    job = http.post(
                        "/jobs",
                        json={
                            "base_model": "tiny-gpt2",
                            "dataset_id": uploaded["id"],
                            "dry_run": True,
                            "hyperparameters": {"block_size": 512},
                        },
                    ).json()
                    elapsed = time.perf_counter() - started
                    assert job["status"] == "succeeded", job
                    times[shape].append(elapsed)
                    print(
                        f"   run {run + 1} {shape}: {elapsed:.2f} s, "
                        f"{job['plan']['examples']:,} examples, {job['plan']['tokens']:,} tokens"
                    )
    rows = [
        [shape, f"{median(values):.2f}", f"{max(values):.2f}"] for shape, values in times.items()
    ]
    print_table(["dataset shape", "median s", "max s"], rows)


if __name__ == "__main__":
    main()
