"""Data preparation: tokenize and pack a generated 200 MB text dataset.

Our path is `worker.data.prepare_data` (streamed, batched, 10% held out, block 1024) reading the
file from storage, as a job does, with the allocator settings of the worker's pool process. The
seed-style path reads the whole file and tokenizes it in one call (what `TextDataset` did), then
cuts blocks; it needs many GB for 200 MB, so it runs on a slice (`--seed-mb`, default 20 MB) and
its throughput is per byte of that slice.

Each measurement runs in a fresh child process, so peak RSS (`ru_maxrss`) is its own; cores used
is the child's CPU time (user + system) over its wall time. The tokenizer is a byte-level BPE
with an 8,192-token vocabulary trained on a sample of the data (GPT-2 style, no download).

    python benchmarks/data_prep.py [--mb 200] [--seed-mb 20] [--runs 3]
"""

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from _common import ROOT, median, print_header, print_table

DATASET_ID = "ds_bench"


def make_corpus(path: Path, megabytes: int) -> None:
    """English-like lines from a 4,000-word synthetic vocabulary, about 100 bytes each."""
    rng = random.Random(7)
    syllables = ["ka", "to", "ri", "en", "sa", "mo", "lu", "ve", "the", "an", "or", "in", "qu"]
    words = ["".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(4000)]
    lines = [
        " ".join(rng.choices(words, k=rng.randint(8, 24))).capitalize() + "." for _ in range(50_000)
    ]
    target = megabytes * 1024 * 1024
    written = 0
    with open(path, "w", encoding="utf-8") as stream:
        while written < target:
            rng.shuffle(lines)
            block = "\n".join(lines) + "\n"
            stream.write(block)
            written += len(block)


def make_tokenizer(sample: Path, folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=8192,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    with open(sample, encoding="utf-8") as stream:
        lines = [next(stream) for _ in range(20_000)]
    backend.train_from_iterator(lines, trainer=trainer)
    PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|endoftext|>", model_max_length=1024
    ).save_pretrained(folder)


# ---- the two paths, each run in a child process ----


def child_ours(tokenizer_dir: str, storage: str, block_size: int) -> dict[str, Any]:
    os.environ["TUNERY_STORAGE_URL"] = f"file://{storage}"
    from transformers import AutoTokenizer

    from worker.data import prepare_data
    from worker.trainer import keep_freed_training_memory

    keep_freed_training_memory()  # as in the worker's pool process, where a job prepares data

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    dataset = SimpleNamespace(id=DATASET_ID, filename="bench.txt", format="text", shape="text")
    start_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    size = (Path(storage) / "datasets" / DATASET_ID).stat().st_size
    cpu0, wall0 = time.process_time(), time.perf_counter()
    data = prepare_data(tokenizer, dataset, None, 0.1, block_size=block_size, seed=42)  # type: ignore[arg-type]
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return {
        "bytes": size,
        "wall_s": wall,
        "cores": cpu / wall,
        "tokens": data.train_tokens_total + data.eval_tokens_total,
        "blocks": len(data.train) + (len(data.eval) if data.eval is not None else 0),
        "start_rss": start_rss,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def child_seed(tokenizer_dir: str, path: str, block_size: int, megabytes: int) -> dict[str, Any]:
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    start_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    cpu0, wall0 = time.process_time(), time.perf_counter()
    with open(path, "rb") as stream:
        raw = stream.read(megabytes * 1024 * 1024)
    text = raw[: raw.rfind(b"\n") + 1].decode("utf-8")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    count = len(ids) // block_size
    blocks = torch.tensor(ids[: count * block_size], dtype=torch.long).view(count, block_size)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return {
        "bytes": len(text.encode()),
        "wall_s": wall,
        "cores": cpu / wall,
        "tokens": len(ids),
        "blocks": blocks.shape[0],
        "start_rss": start_rss,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def run_child(*args: str) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", *args],
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mb", type=int, default=200)
    parser.add_argument("--seed-mb", type=int, default=20)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--block-size", type=int, default=1024)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "ours":
            result = child_ours(rest[0], rest[1], args.block_size)
        else:
            result = child_seed(rest[0], rest[1], args.block_size, int(rest[2]))
        print(json.dumps(result))
        return

    print_header(f"data preparation: {args.mb} MB of text, block {args.block_size}")
    with tempfile.TemporaryDirectory(prefix="tunery-bench-data-") as folder_name:
        folder = Path(folder_name)
        storage = folder / "storage"
        (storage / "datasets").mkdir(parents=True)
        data = storage / "datasets" / DATASET_ID
        make_corpus(data, args.mb)
        make_tokenizer(data, folder / "tokenizer")
        ours, seed = [], []
        for index in range(args.runs):
            ours.append(run_child("ours", str(folder / "tokenizer"), str(storage)))
            seed.append(run_child("seed", str(folder / "tokenizer"), str(data), str(args.seed_mb)))
            print(
                f"   run {index + 1}: ours {ours[-1]['bytes'] / ours[-1]['wall_s'] / 1e6:.1f} MB/s "
                f"({ours[-1]['cores']:.2f} cores, {ours[-1]['peak_rss'] / 2**20:.0f} MiB), "
                f"seed {seed[-1]['bytes'] / seed[-1]['wall_s'] / 1e6:.1f} MB/s "
                f"({seed[-1]['cores']:.2f} cores, {seed[-1]['peak_rss'] / 2**20:.0f} MiB)",
                flush=True,
            )

    def row(name: str, runs: list[dict[str, Any]]) -> list[Any]:
        return [
            name,
            f"{runs[0]['bytes'] / 1e6:.0f}",
            median([r["bytes"] / r["wall_s"] / 1e6 for r in runs]),
            median([r["tokens"] / r["wall_s"] / 1e6 for r in runs]),
            median([r["cores"] for r in runs]),
            median([r["start_rss"] / 2**20 for r in runs]),
            median([r["peak_rss"] / 2**20 for r in runs]),
        ]

    print(f"\nmedian of {args.runs} alternating runs\n")
    headers = ["path", "MB", "MB/s", "Mtok/s", "cores", "RSS before MiB", "peak RSS MiB"]
    print_table(headers, [row("prepare_data (ours)", ours), row("one call (seed)", seed)])
    ratio = median([r["bytes"] / r["wall_s"] for r in ours]) / median(
        [r["bytes"] / r["wall_s"] for r in seed]
    )
    print(f"\nthroughput ratio ours / seed: {ratio:.2f} (goal >= 1.5); peak RSS goal < 1024 MiB")
    seed_mib = median([(r["peak_rss"] - r["start_rss"]) / 2**20 for r in seed])
    print(
        f"seed path grows {seed_mib:.0f} MiB for {args.seed_mb} MB: about "
        f"{seed_mib * args.mb / args.seed_mb / 1024:.1f} GiB at {args.mb} MB"
    )


if __name__ == "__main__":
    main()
