"""Queue latency: from POST /jobs to `running`, with an idle `tunery worker` on Redis and
PostgreSQL, over 20 jobs one after another (each a one-step job of the tests' tiny GPT-2, waited
for before the next is sent, so the worker is idle every time).

Latency is the job's `started_at` (set by the claim, read from PostgreSQL at full precision)
minus the wall-clock time just before the POST was sent; the part inside the API (to the row's
`created_at`) is shown too.

    python benchmarks/queue_latency.py [--jobs 20]
"""

import argparse
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
from _common import median, percentile, print_header, print_table, service_stack
from sqlalchemy import create_engine, text

from tests.tiny_model import build_tiny_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=20)
    args = parser.parse_args()
    print_header(f"queue latency: POST /jobs -> running, {args.jobs} jobs, idle worker on Redis")
    with tempfile.TemporaryDirectory(prefix="tunery-bench-queue-") as folder_name:
        models = Path(folder_name) / "models"
        build_tiny_model(models, "tiny-gpt2")
        with service_stack(worker=True, models_dir=models) as stack:
            engine = create_engine(stack.database_url)
            body = {
                "base_model": "tiny-gpt2",
                "validation_split": 0.0,
                "hyperparameters": {"max_steps": 1, "block_size": 32, "batch_size": 2},
            }
            latencies, api_parts = [], []
            with httpx.Client(base_url=stack.base_url, headers=stack.headers, timeout=30) as client:
                files = {"file": ("d.txt", b"the red car is next to the blue house.\n" * 200)}
                body["dataset_id"] = client.post("/datasets", files=files).json()["id"]
                for _ in range(args.jobs):
                    time.sleep(1.0)  # let the worker settle back to idle
                    sent = datetime.now(UTC)
                    job = client.post("/jobs", json=body).raise_for_status().json()
                    deadline = time.monotonic() + 120
                    while True:
                        with engine.connect() as connection:
                            row = connection.execute(
                                text(
                                    "SELECT created_at, started_at, status FROM jobs WHERE id=:id"
                                ),
                                {"id": job["id"]},
                            ).one()
                        if row.status in ("succeeded", "failed", "cancelled"):
                            break
                        if time.monotonic() > deadline:
                            raise TimeoutError(job["id"])
                        time.sleep(0.2)
                    if row.started_at is None:
                        raise RuntimeError(f"job {job['id']} ended {row.status} without running")
                    latencies.append((row.started_at - sent).total_seconds())
                    api_parts.append((row.created_at - sent).total_seconds())
            engine.dispose()

    print(f"\n{len(latencies)} jobs\n")
    print_table(
        ["measure", "p50 s", "p90 s", "max s"],
        [
            [
                "POST /jobs -> running",
                median(latencies),
                percentile(latencies, 0.9),
                max(latencies),
            ],
            [
                "POST /jobs -> row created",
                median(api_parts),
                percentile(api_parts, 0.9),
                max(api_parts),
            ],
        ],
    )
    print("\ngoal: p50 < 1 s")


if __name__ == "__main__":
    main()
