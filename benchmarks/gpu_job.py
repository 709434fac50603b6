"""A real job on the GPU, run as a person runs one: `tunery up` on the embedded defaults (SQLite,
the local queue, files under its home), a text dataset uploaded through the API, `POST /jobs` on
a GPT-2 124M-sized local model with `compile: true` (a GPU trains in bf16 by default), polled to
`succeeded`, then the tarball downloaded, checked against its sha256 and its manifest, and
loaded.

The model and shapes are `gpu_mfu.py`'s (GPT-2 124M, random init, vocab 50,304, block 1024,
batch 32), so the job's tokens/s compare with the sweep's `service` figure. It reports:

- training tokens/s and MFU from the job's metric rows: each logged step reads the loss on the
  host, so the rows' times bracket the device's work; the first rows (the compile) are left out;
- the tokens/s the job itself reported (`progress.tokens_per_second`), for comparison;
- the time from `POST /jobs` to the first training step, stage by stage from the job's events:
  queue, model load, tokenization, the baseline eval (which compiles the eval graph), and the
  first step (which compiles training's graph). Run first on a fresh machine, as
  `gpu_session.sh` does, the compiles are cold, as in a new worker's first job.

    python benchmarks/gpu_job.py [--steps 200] [--json FILE]
    python benchmarks/gpu_job.py --smoke [--no-compile]    # a tiny model, any device
"""

import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import torch
from _common import ROOT, free_port, median, print_header, print_table, wait_for
from compiled_job import recompilations
from gpu_mfu import H200_BF16_DENSE_TFLOPS, build_model, flops_per_token
from sqlalchemy import select
from sqlalchemy.orm import Session
from training_overhead import stage_marks
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from shared.db import engine_for
from shared.jobs import FINISHED
from shared.models import Job, JobEvent, JobMetric

MODEL = "gpt2-124m"
# Steps left out of the timed window: the first compiles training's graph, and the allocator and
# loader settle in the next few.
SETTLE_STEPS = 20
WORDS = (
    "the a model data service train token price market report city river energy battery phone "
    "search engine company quarter profit growth team player season game research study result "
    "new old fast slow large small early late strong weak open closed public private local "
    "released announced reported expected reviewed launched improved reduced increased said "
    "yesterday today tomorrow week month year after before during while because although"
)


def text_dataset(tokens: int, seed: int = 0) -> bytes:
    """Lines of made-up news sentences, about `tokens` tokens for the benchmark's tokenizer."""
    rng, words = random.Random(seed), WORDS.split()
    lines, size = [], 0
    while size < tokens * 7 // 4:  # about 1.75 bytes a token for the benchmark's small BPE
        line = " ".join(rng.choices(words, k=rng.randint(8, 30))).capitalize() + "."
        lines.append(line)
        size += len(line) + 1
    return ("\n".join(lines) + "\n").encode()


def model_arguments(args: argparse.Namespace) -> argparse.Namespace:
    """What `gpu_mfu.build_model` reads."""
    vocab_size = None if args.smoke else 50304
    return argparse.Namespace(
        smoke=args.smoke, block_size=args.block_size, vocab_size=vocab_size, dropout=None
    )


class TuneryUp:
    """`tunery up` in its own process group, on a home of its own, stopped with Ctrl-C's signal."""

    def __init__(self, folder: Path, models: Path) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log = folder / "up.log"
        environment = {k: v for k, v in os.environ.items() if not k.startswith("TUNERY_")}
        environment |= {
            "TUNERY_HOME": str(folder / "home"),
            "TUNERY_MODELS_DIR": str(models),
            "PYTHONUNBUFFERED": "1",
        }
        with open(self.log, "wb") as output:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "shared.cli", "up", "--port", str(self.port)],
                env=environment,
                stdout=output,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                start_new_session=True,
            )

    def ready(self) -> bool:
        """The API answers /readyz and the worker says it is ready: a job posted now waits for
        nothing but the queue."""
        if self.process.poll() is not None:
            raise RuntimeError(f"tunery up exited:\n{self.tail()}")
        if " ready." not in self.text():
            return False
        try:
            return httpx.get(f"{self.base_url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def key(self) -> str:
        return next(line for line in self.text().splitlines() if line.startswith("tny_"))

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def tail(self, characters: int = 6000) -> str:
        return self.text()[-characters:]

    def stop(self) -> float:
        """Ctrl-C, as a terminal sends it to the group; seconds until it exited."""
        started = time.monotonic()
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return time.monotonic() - started


@dataclass
class Timeline:
    """A job's own record at full precision, read from its database (the API rounds to
    seconds): when it was created, its events and its metric rows, oldest first."""

    created: datetime
    events: list[JobEvent]
    rows: list[JobMetric]

    @classmethod
    def read(cls, database_url: str, job_id: str) -> "Timeline":
        with Session(engine_for(database_url), expire_on_commit=False) as session:
            created = session.get_one(Job, job_id).created_at
            events = session.scalars(
                select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.seq)
            ).all()
            rows = session.scalars(
                select(JobMetric)
                .where(JobMetric.job_id == job_id, JobMetric.train_loss.is_not(None))
                .order_by(JobMetric.seq)
            ).all()
            return cls(created, list(events), list(rows))

    def training_rate(self, tokens_per_step: int) -> dict[str, Any]:
        """Tokens/s between the first logged step after `SETTLE_STEPS` and the last one."""
        window = [row for row in self.rows if row.step > SETTLE_STEPS] or self.rows[-2:]
        first, last = window[0], window[-1]
        seconds = (last.created_at - first.created_at).total_seconds()
        reported = [row.tokens_per_second for row in window if row.tokens_per_second]
        return {
            "window_steps": [first.step, last.step],
            "tokens_per_second": tokens_per_step * (last.step - first.step) / seconds,
            "rows_median_tokens_per_second": median(reported),
        }

    def stages(self, submitted: datetime) -> dict[str, float]:
        """Seconds of each stage, from `POST /jobs` to `succeeded`."""
        marks = stage_marks([(event.message, event.created_at) for event in self.events])
        marks |= {
            "created": self.created,
            "first_step": self.rows[0].created_at,
            "last_step": self.rows[-1].created_at,
        }
        order = [
            ("post", "created"),
            ("queue", "claimed"),
            ("model_load", "loaded"),
            ("tokenize", "tokenized"),
            ("baseline_eval", "baseline_eval"),
            ("to_train_start", "train_start"),
            ("first_step", "first_step"),
            ("training", "last_step"),
            ("final_eval", "final_eval"),
            ("save", "package_start"),
            ("package", "succeeded"),
        ]
        stages, previous = {}, submitted
        for name, mark in order:
            if mark in marks:
                stages[name] = (marks[mark] - previous).total_seconds()
                previous = marks[mark]
        stages["post_to_first_step"] = (marks["first_step"] - submitted).total_seconds()
        stages["post_to_succeeded"] = (marks["succeeded"] - submitted).total_seconds()
        return stages

    def training_started(self) -> dict[str, Any]:
        return next(e.data for e in self.events if e.message.startswith("training started"))


def download_and_check(
    client: httpx.Client, job: dict[str, Any], folder: Path
) -> tuple[Path, dict[str, Any]]:
    """The tarball, its sha256 against the job's and the ETag, and every manifest entry."""
    tarball = folder / "model.tar.gz"
    digest = hashlib.sha256()
    started = time.perf_counter()
    with client.stream("GET", job["artifact"]["url"]) as response, open(tarball, "wb") as out:
        response.raise_for_status()
        etag = response.headers.get("etag", "").strip('"')
        for chunk in response.iter_bytes(1 << 20):
            digest.update(chunk)
            out.write(chunk)
    download_s = time.perf_counter() - started
    sha256 = digest.hexdigest()
    if sha256 != job["artifact"]["sha256"] or etag != sha256:
        raise RuntimeError(f"sha256 {sha256}, job says {job['artifact']['sha256']}, ETag {etag}")
    if tarball.stat().st_size != job["artifact"]["bytes"]:
        raise RuntimeError(f"{tarball.stat().st_size} bytes, job says {job['artifact']['bytes']}")
    extracted = folder / "extracted"
    with tarfile.open(tarball) as archive:
        archive.extractall(extracted, filter="data")
    entries = (extracted / "MANIFEST.sha256").read_text().splitlines()
    for entry in entries:
        expected, name = entry.split("  ", 1)
        if hashlib.sha256((extracted / name).read_bytes()).hexdigest() != expected:
            raise RuntimeError(f"manifest: {name} does not match")
    checks = {
        "artifact_bytes": job["artifact"]["bytes"],
        "download_s": download_s,
        "manifest_entries": len(entries),
    }
    return extracted, checks


def load_tuned(extracted: Path, sample: str, block_size: int) -> dict[str, Any]:
    """Load `model/` as the card says, on the GPU if there is one: its loss on a block of the
    training text, and a greedy continuation."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(extracted / "model")
    model = AutoModelForCausalLM.from_pretrained(extracted / "model").to(device).eval()
    load_s = time.perf_counter() - started
    ids = tokenizer(sample, return_tensors="pt")["input_ids"][:, :block_size].to(device)
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
        continued = model.generate(input_ids=ids[:, :8], max_new_tokens=12, do_sample=False)
    return {
        "load_s": load_s,
        "parameters": sum(p.numel() for p in model.parameters()),
        "loss_on_training_text": loss,
        "continuation": tokenizer.decode(continued[0, 8:]),
    }


def run_job(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    models = folder / "models"
    config = build_model(models / MODEL, model_arguments(args))
    dataset = text_dataset(args.tokens)
    up = TuneryUp(folder, models)
    try:
        started = time.perf_counter()
        wait_for(up.ready, timeout=180, what="tunery up's API and worker")
        up_s = time.perf_counter() - started
        headers = {"Authorization": f"Bearer {up.key()}"}
        with httpx.Client(base_url=up.base_url, headers=headers, timeout=120) as client:
            uploaded = client.post("/datasets", files={"file": ("news.txt", dataset)})
            dataset_id = uploaded.raise_for_status().json()["id"]
            body = {
                "base_model": MODEL,
                "dataset_id": dataset_id,
                "hyperparameters": {
                    "max_steps": args.steps,
                    "batch_size": args.batch_size,
                    "block_size": args.block_size,
                    "learning_rate": 6e-4,
                    "compile": args.compile,
                },
            }
            submitted = datetime.now(UTC)
            job = client.post("/jobs", json=body).raise_for_status().json()
            deadline = time.monotonic() + args.timeout
            while job["status"] not in FINISHED:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"job {job['id']} still {job['status']}:\n{up.tail()}")
                time.sleep(1.0)
                job = client.get(f"/jobs/{job['id']}").raise_for_status().json()
            if job["status"] != "succeeded":
                raise RuntimeError(f"job {job['status']}: {job['error']}\n{up.tail()}")
            extracted, checks = download_and_check(client, job, folder)
    finally:
        stop_s = up.stop()
    timeline = Timeline.read(f"sqlite:///{folder / 'home' / 'tunery.db'}", job["id"])
    rate = timeline.training_rate(args.batch_size * args.block_size)
    flops = flops_per_token(config, args.block_size, parameter_count(config))
    return {
        "job_id": job["id"],
        "up_ready_s": up_s,
        "stop_s": stop_s,
        "dataset_bytes": len(dataset),
        "plan": {key: job["plan"][key] for key in ("examples", "blocks", "eval_blocks")},
        "training": timeline.training_started(),
        **rate,
        "mfu": rate["tokens_per_second"] * flops / (H200_BF16_DENSE_TFLOPS * 1e12),
        "job_reported_tokens_per_second": job["progress"]["tokens_per_second"],
        "metrics": job["metrics"],
        "stages_s": timeline.stages(submitted),
        "recompilations": recompilations(up.text()),
        **checks,
        "loaded": load_tuned(extracted, dataset[: 8 * args.block_size].decode(), args.block_size),
    }


def parameter_count(config: GPT2Config) -> int:
    """The model's parameters, counted on the meta device (no memory)."""
    with torch.device("meta"):
        return GPT2LMHeadModel(config).num_parameters()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny model and job, any device")
    parser.add_argument("--steps", type=int, default=None, help="max_steps (200; smoke 12)")
    parser.add_argument("--batch-size", type=int, default=None, help="32; smoke 4")
    parser.add_argument("--block-size", type=int, default=None, help="1024; smoke 64")
    parser.add_argument("--tokens", type=int, default=None, help="dataset size (4 M; smoke 20 k)")
    parser.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=True, help="the hyperparameter"
    )
    parser.add_argument("--timeout", type=float, default=900, help="seconds the job may take")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    smoke = args.smoke
    args.steps = args.steps or (12 if smoke else 200)
    args.batch_size = args.batch_size or (4 if smoke else 32)
    args.block_size = args.block_size or (64 if smoke else 1024)
    args.tokens = args.tokens or (20_000 if smoke else 4_000_000)
    return args


def main() -> None:
    args = parse_args()
    # A `timeout` ends the script with SIGTERM: exit through the `finally` that stops tunery up.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    print_header("a real job on the GPU: tunery up, upload, POST /jobs, poll, download, load")
    with tempfile.TemporaryDirectory(prefix="tunery-bench-gpu-job-") as folder_name:
        result = run_job(args, Path(folder_name))
    stages = result["stages_s"]
    print(f"   job {result['job_id']}: {result['plan']}, training {result['training']}")
    print(f"   recompilations: {result['recompilations'] or 'none'}")
    print(f"   tuned model loaded: {result['loaded']}\n")
    print_table(
        [
            "tokens/s (rows' times)",
            "MFU",
            "job-reported tokens/s",
            "POST to first step, s",
            "POST to succeeded, s",
            "artifact MB",
            "tunery up stopped in, s",
        ],
        [
            [
                result["tokens_per_second"],
                f"{result['mfu']:.1%}",
                result["job_reported_tokens_per_second"] or float("nan"),
                stages["post_to_first_step"],
                stages["post_to_succeeded"],
                result["artifact_bytes"] / 1e6,
                result["stop_s"],
            ]
        ],
    )
    print()
    print_table(["stage", "seconds"], [[name, seconds] for name, seconds in stages.items()])
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), **result}, default=str) + "\n")


if __name__ == "__main__":
    main()
