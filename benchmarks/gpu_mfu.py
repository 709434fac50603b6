"""GPU hot path: train the GPT-2 124M architecture (random init, block 1024) through the service's
trainer path and report tokens/s and MFU against the H200's dense bf16 peak.

The service's path is used as a job uses it: the model is saved to a models folder and loaded
with `worker.trainer.load_base_model`; `training_arguments` and `build_trainer` configure
Trainer; `JobCallback` runs inside the loop (its lease is a stand-in without a database, so
only the callback's own work is measured). The data are random token ids in `PackedBlocks`.

FLOPs per token = 6 N + 12 L H Q T (N: parameters without the position embeddings; L layers,
H heads, Q head size, T block size), as in PaLM appendix B and nanoGPT's `estimate_mfu`.
Timing starts after `--warmup` steps (compile and allocator warm-up) and ends at the last step,
with one device synchronisation at each end and none in between but the loss the trainer logs:
it logs as often as a job of `--job-steps` steps does (about fifty times a job), so the timed
steps are a window of such a job.
Each service run also reports its first step's seconds, from `trainer.train()` on: with
`--compile`, what compiling the training graph costs.

Like a job on text blocks, training runs with SDPA's causal flag and no mask
(`worker.attention.causal_attention`); `--stock-attention` trains with the mask transformers
builds, as the service did before 2026-11-30.

`--evaluate-first` runs the baseline eval a job with a validation set runs before training, on
`batch + 1` blocks: a full batch and then one row, as where the eval blocks do not fill the last
batch. Under `compile` the job fills that row's batch (`worker.collate.FullBatches`), so the
eval compiles one graph of its own and training's graph stays static: the run measures the
eval's seconds and checks that its tokens/s are `service`'s.

`--path` measures a reference on the same blocks and settings instead (`gpu_reference.py`):
`bare`, the same Hugging Face model in a hand-written loop, tells what the service's loop costs;
`minimal`, a nanoGPT-style GPT-2 in that loop, tells what the Hugging Face model code costs.

    python benchmarks/gpu_mfu.py [--steps 150] [--batch-size 32] [--compile] [--path bare]
    python benchmarks/gpu_mfu.py --smoke      # a tiny config for a few steps, CPU is fine
"""

import argparse
import json
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from _common import median, print_header, print_table
from gpu_reference import MinimalGPT, bare_training
from lean_loss import lean_causal_lm_loss
from torch.autograd import DeviceType
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader
from transformers import GPT2Config, GPT2LMHeadModel, TrainerCallback

from shared.schemas import Hyperparameters
from shared.settings import Settings
from tests.tiny_model import _train_tokenizer
from worker.attention import causal_attention
from worker.data import PackedBlocks
from worker.trainer import (
    BaseModel,
    JobCallback,
    build_trainer,
    describe_device,
    evaluate_loss,
    load_base_model,
    logging_steps,
    training_arguments,
)

H200_BF16_DENSE_TFLOPS = 989.0
LEARNING_RATE = 6e-4
PATHS = {
    "service": "through the service's trainer",
    "bare": "the same model in a hand-written loop",
    "minimal": "a minimal GPT in a hand-written loop",
}


class StandInLease:
    """What `JobCallback` asks of a lease, without a database: always owned, never cancelled."""

    job_id = "job_bench"
    attempt = 1
    lost = False
    cancel_requested = False
    should_stop = False

    def write(self, fn: Any = None, values: Any = None, **_: Any) -> bool:
        return True

    def beat(self, progress: Any = None, **_: Any) -> bool:
        return True

    def poll(self, **_: Any) -> None:
        return None

    def check(self) -> None:
        return None

    def raise_if_stopped(self) -> None:
        return None

    def event(self, *_: Any, **__: Any) -> None:
        return None


class Stopwatch(TrainerCallback):
    """Host time when training begins (mark 0), and at the end of step 1, step `first` and
    step `last`, each after one device sync. Step 1 holds the compilation of the training graph."""

    def __init__(self, first: int, last: int) -> None:
        self.first, self.last = first, last
        self.marks: dict[int, float] = {}

    def on_train_begin(self, *_: Any, **__: Any) -> None:
        self.marks[0] = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
        if state.global_step in (1, self.first, self.last):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.marks[state.global_step] = time.perf_counter()


class StepProfiler(TrainerCallback):
    """`torch.profiler` over `active` optimizer steps after `skip`: where a step's time goes."""

    def __init__(self, skip: int, active: int) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.profiler = torch.profiler.profile(
            activities=activities,
            schedule=torch.profiler.schedule(wait=skip, warmup=2, active=active, repeat=1),
        )
        self.active = active

    def on_train_begin(self, *_: Any, **__: Any) -> None:
        self.profiler.start()

    def on_step_end(self, *_: Any, **__: Any) -> None:
        self.profiler.step()

    def on_train_end(self, *_: Any, **__: Any) -> None:
        self.profiler.stop()

    def report(self) -> str:
        """The device's busy time per profiled step by kind of kernel, then the top operators.

        Only the device's own kernels are summed: each is also listed under the host call that
        launched it, and the profiler marks each step on the device's timeline too."""
        cuda = torch.cuda.is_available()
        kernels = [
            event
            for event in self.profiler.events()
            if event.device_type != DeviceType.CPU and not event.name.startswith("ProfilerStep")
        ]
        by_kind = Counter[str]()
        for kernel in kernels:
            by_kind[kernel_kind(kernel.name)] += kernel.device_time_total
        busy_us = max(1, sum(by_kind.values()))
        kinds = "".join(
            f"\n  {kind:10s} {us / 1e3 / self.active:8.2f} ms  {us / busy_us:6.1%}"
            for kind, us in by_kind.most_common()
        )
        sort_by = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        table = self.profiler.key_averages().table(sort_by=sort_by, row_limit=30)
        return f"device busy per step: {busy_us / 1e3 / self.active:.2f} ms{kinds}\n\n{table}"


# Kinds of device kernels, by a part of the kernel's name; the first that matches wins.
KERNEL_KINDS = (
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "splitk")),
    ("optimizer", ("multi_tensor", "adam")),  # the fused AdamW step and the clipping norms
    ("copy", ("memcpy", "memset")),
    ("triton", ("triton",)),  # inductor's fused elementwise, norms, loss
)


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, parts in KERNEL_KINDS if any(p in lowered for p in parts)), "other")


class HostSyncs(TrainerCallback):
    """The device synchronisations the host waits for in each step after step `skip`, and where.

    CUDA's sync debug mode warns at every synchronising operation (`.item()`, a device-to-host
    copy, ...); each warning names the Python line that caused it. A step's syncs are the ones
    between its start and the next step's start, so they include its logging.
    """

    WARNING = "called a synchronizing CUDA operation"

    def __init__(self, skip: int, *, debug_mode: bool) -> None:
        self.skip = skip
        self.debug_mode = debug_mode  # False: warnings emitted by hand (the test)
        self.by_step: dict[int, list[str]] = {}
        self._recorder: warnings.catch_warnings | None = None
        self._caught: list[warnings.WarningMessage] = []

    def on_step_begin(self, args: Any, state: Any, control: Any, **_: Any) -> None:
        if self._recorder is not None:
            self._close_step(state.global_step)
        elif state.global_step == self.skip:
            self._recorder = warnings.catch_warnings(record=True)
            self._caught = self._recorder.__enter__()
            warnings.simplefilter("always")
            if self.debug_mode:
                torch.cuda.set_sync_debug_mode("warn")

    def on_train_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
        if self._recorder is None:
            return
        self._close_step(state.global_step)
        if self.debug_mode:
            torch.cuda.set_sync_debug_mode("default")
        self._recorder.__exit__(None, None, None)
        self._recorder = None

    def _close_step(self, step: int) -> None:
        self.by_step[step] = [
            f"{Path(caught.filename).name}:{caught.lineno}"
            for caught in self._caught
            if self.WARNING in str(caught.message)
        ]
        self._caught.clear()

    def report(self, logging_every: int) -> str:
        """Syncs per step, logging steps apart from the others (the callback's promise: none
        but the logged loss's), and where they came from."""
        lines = []
        for logs, name in ((True, "logging steps"), (False, "other steps")):
            steps = {
                step: found
                for step, found in self.by_step.items()
                if (step % logging_every == 0) == logs
            }
            where = Counter(place for found in steps.values() for place in found)
            total = sum(where.values())
            lines.append(
                f"host syncs, {name}: {total} in {len(steps)} steps"
                + "".join(f"\n  {count:5d}  {place}" for place, count in where.most_common(8))
            )
        return "\n".join(lines)


def flops_per_token(config: GPT2Config, block_size: int, parameters: int) -> float:
    head = config.n_embd // config.n_head
    non_position = parameters - config.n_positions * config.n_embd
    return 6 * non_position + 12 * config.n_layer * config.n_head * head * block_size


def build_model(folder: Path, args: argparse.Namespace) -> GPT2Config:
    if args.smoke:
        config = GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=args.block_size)
    else:  # GPT-2 124M
        config = GPT2Config(n_layer=12, n_head=12, n_embd=768, n_positions=1024)
    tokenizer = _train_tokenizer()
    config.vocab_size = args.vocab_size or (len(tokenizer) if args.smoke else 50257)
    config.bos_token_id = config.eos_token_id = tokenizer.eos_token_id
    if args.dropout is not None:  # GPT-2's own config has 0.1 (llm.c trains with none)
        config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = args.dropout
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return config


def random_blocks(args: argparse.Namespace, config: GPT2Config) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    shape = (args.steps * args.batch_size + args.batch_size, args.block_size)
    return torch.randint(0, config.vocab_size, shape, dtype=torch.int32, generator=generator)


def load_saved_model(models: Path, args: argparse.Namespace) -> BaseModel:
    """The saved GPT-2 as a job loads its base model."""
    settings = Settings(models_dir=models, home=models.parent / "home")
    return load_base_model("gpt2-124m", settings, block_size=args.block_size)


def attention(
    args: argparse.Namespace, model: torch.nn.Module, blocks: PackedBlocks
) -> AbstractContextManager[bool]:
    """The job's attention for text blocks, or with `--stock-attention` the masked one."""
    return nullcontext(False) if args.stock_attention else causal_attention(model, blocks)


def service_training(
    args: argparse.Namespace, models: Path, config: GPT2Config, profile: bool
) -> tuple[float, torch.nn.Module, dict[str, Any]]:
    """The job's path: seconds over the timed steps, the model, and the settings Trainer used."""
    base = load_saved_model(models, args)
    if args.lean_loss:
        base.model.loss_function = lean_causal_lm_loss
    if args.without_loss_type:  # as before 2026-11-30: a graph break in every compiled step
        base.model.loss_type = None
    hp = Hyperparameters(
        max_steps=args.steps,
        batch_size=args.batch_size,
        block_size=args.block_size,
        learning_rate=LEARNING_RATE,
        compile=args.compile,
    )
    tokens_per_step = args.batch_size * args.block_size
    callback = JobCallback(StandInLease(), tokens_per_step)  # type: ignore[arg-type]
    watch = Stopwatch(args.warmup, args.steps)
    # Ten steps, or as many as follow the profiler's own two warm-up steps in a short run.
    profiled_steps = max(1, min(10, args.steps - args.warmup - 2))
    profiler = StepProfiler(args.warmup, profiled_steps) if profile else None
    # The profiled run also counts host syncs, where CUDA can tell: its timing is not reported.
    cuda = torch.cuda.is_available()
    syncs = HostSyncs(args.warmup, debug_mode=True) if profile and cuda else None
    evaluate_seconds: float | None = None
    with tempfile.TemporaryDirectory() as output:
        training_args = training_arguments(hp, Path(output), args.job_steps)
        if args.loader_workers:  # as before 2026-12-04 (a job can't: its process is daemonic)
            training_args.dataloader_num_workers = args.loader_workers
            training_args.dataloader_persistent_workers = True
            training_args.dataloader_prefetch_factor = 4
        ids = random_blocks(args, config)
        blocks = PackedBlocks(ids)
        trainer = build_trainer(base.model, training_args, blocks, None, [callback])
        for extra in (syncs, watch, profiler):
            if extra is not None:
                trainer.add_callback(extra)
        with attention(args, base.model, blocks) as causal:
            if args.evaluate_first:  # the loss does not matter, so training's first blocks do
                started = time.perf_counter()
                evaluate_loss(trainer, PackedBlocks(ids[: args.batch_size + 1]))
                evaluate_seconds = time.perf_counter() - started
            trainer.train()
    if profiler is not None:
        counted = syncs.report(training_args.logging_steps) if syncs else "host syncs: no CUDA"
        Path(args.profile).write_text(f"{counted}\n\n{profiler.report()}")
    used = {
        "bf16": training_args.bf16,
        "optim": getattr(training_args.optim, "value", str(training_args.optim)),
        "tf32": bool(training_args.tf32),
        "torch_compile": bool(training_args.torch_compile),
        "dataloader_workers": training_args.dataloader_num_workers,
        "pin_memory": training_args.dataloader_pin_memory,
        "attention": "causal" if causal else "masked",
        "first_step_seconds": watch.marks[1] - watch.marks[0],
    }
    if evaluate_seconds is not None:
        used["evaluate_seconds"] = evaluate_seconds
    return watch.marks[args.steps] - watch.marks[args.warmup], base.model, used


def reference_training(
    args: argparse.Namespace, models: Path, config: GPT2Config
) -> tuple[float, torch.nn.Module, dict[str, Any]]:
    """A hand-written loop over the same blocks, with the loader settings the service uses
    (`worker.trainer.loader_arguments`; built by hand, since building `TrainingArguments` here
    would also set the process's TF32 mode and accelerate's state for this loop).

    `bare` loads the model as the service does, so that only the loop differs; `minimal` starts
    from the same weights.
    """
    model: torch.nn.Module = load_saved_model(models, args).model
    model.config.use_cache = False  # as Trainer sets it; a cache would change the attention mask
    blocks = PackedBlocks(random_blocks(args, config))
    minimal = args.path == "minimal"
    if minimal:  # its SDPA call has `is_causal` written in
        reference = MinimalGPT(config)
        reference.copy_gpt2_weights(model)
        model = reference
    cuda = torch.cuda.is_available()
    loader = DataLoader(  # as `worker.trainer.loader_arguments` loads: no workers, pinned
        blocks,
        batch_size=args.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
        pin_memory=cuda,
        num_workers=args.loader_workers,
        persistent_workers=args.loader_workers > 0,
        prefetch_factor=4 if args.loader_workers else None,
    )
    with nullcontext(True) if minimal else attention(args, model, blocks) as causal:
        seconds, used = bare_training(
            model,
            loader,
            steps=args.steps,
            warmup=args.warmup,
            learning_rate=LEARNING_RATE,
            compile_model=args.compile,
            log_every=logging_steps(args.job_steps),
        )
    loader_used = {"dataloader_workers": loader.num_workers, "pin_memory": cuda}
    return seconds, model, used | loader_used | {"attention": "causal" if causal else "masked"}


def run_once(
    args: argparse.Namespace, models: Path, config: GPT2Config, profile: bool = False
) -> dict[str, Any]:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with sdpa_priority(args.sdpa):
        if args.path == "service":
            seconds, model, used = service_training(args, models, config, profile)
        else:
            seconds, model, used = reference_training(args, models, config)
    tokens_per_second = args.batch_size * args.block_size * (args.steps - args.warmup) / seconds
    parameters = sum(p.numel() for p in model.parameters())
    achieved = tokens_per_second * flops_per_token(config, args.block_size, parameters)
    return used | {
        "tokens_per_second": tokens_per_second,
        "tflops": achieved / 1e12,
        "mfu": achieved / (args.peak_tflops * 1e12),
        "parameters": parameters,
        "peak_memory_gib": (
            torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
        ),
    }


@contextmanager
def sdpa_priority(first: str | None) -> Iterator[None]:
    """Try one SDPA backend first (e.g. cuDNN's on Hopper), the others after it as usual."""
    if first is None:
        yield
        return
    chosen = getattr(SDPBackend, first.upper() + "_ATTENTION")
    usual = [
        SDPBackend.FLASH_ATTENTION,
        SDPBackend.CUDNN_ATTENTION,
        SDPBackend.EFFICIENT_ATTENTION,
        SDPBackend.MATH,
    ]
    order = [chosen, *(backend for backend in usual if backend != chosen)]
    with sdpa_kernel(order, set_priority=True):
        yield


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with the defaults of a full run or of `--smoke` filled in."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny config, few steps, any device")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument(
        "--job-steps",
        type=int,
        default=None,
        help="the steps are a window of a job this long, logged as often as it is (default: steps)",
    )
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--block-size", type=int, default=None)
    parser.add_argument("--vocab-size", type=int, default=None, help="e.g. 50304 (padded)")
    parser.add_argument("--compile", action="store_true", help="the `compile` hyperparameter")
    parser.add_argument("--dropout", type=float, default=None, help="all three GPT-2 dropouts")
    parser.add_argument(
        "--loader-workers",
        type=int,
        default=0,
        help="loader processes (a job has none: it trains in a daemonic pool process)",
    )
    parser.add_argument(
        "--path",
        choices=list(PATHS),
        default="service",
        help="; ".join(f"{path}: {meaning}" for path, meaning in PATHS.items()),
    )
    parser.add_argument(
        "--sdpa", choices=["flash", "cudnn", "efficient"], help="the SDPA backend to try first"
    )
    parser.add_argument(
        "--without-loss-type",
        action="store_true",
        help="the service's model without the loss type the loader now sets (the old graph break)",
    )
    parser.add_argument(
        "--lean-loss",
        action="store_true",
        help="train with `lean_loss.py`'s loss, not transformers' (a candidate for the service)",
    )
    parser.add_argument(
        "--stock-attention",
        action="store_true",
        help="train with the mask transformers builds, not the causal flag (as before)",
    )
    parser.add_argument(
        "--evaluate-first",
        action="store_true",
        help="a baseline eval on batch + 1 blocks before training, as a job with validation",
    )
    parser.add_argument(
        "--profile",
        help="profile 10 steps of the last run, count its host syncs per step, write both here",
    )
    parser.add_argument("--runs", type=int, default=None, help="3, or 1 with --smoke")
    parser.add_argument("--peak-tflops", type=float, default=H200_BF16_DENSE_TFLOPS)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    smoke = args.smoke
    args.steps = args.steps or (6 if smoke else 150)
    args.warmup = args.warmup or (2 if smoke else 20)
    args.job_steps = args.job_steps or args.steps
    args.batch_size = args.batch_size or (2 if smoke else 32)
    args.block_size = args.block_size or (64 if smoke else 1024)
    args.runs = args.runs or (1 if smoke else 3)
    return args


def main() -> None:
    args = parse_args()
    smoke = args.smoke
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --smoke, or on the GPU machine")
    print_header(f"GPU hot path: GPT-2 124M, {PATHS[args.path]}" + (" (smoke)" if smoke else ""))
    print("   device: " + json.dumps(describe_device()))

    runs = []
    with tempfile.TemporaryDirectory(prefix="tunery-bench-gpu-") as folder_name:
        models = Path(folder_name) / "models"
        config = build_model(models / "gpt2-124m", args)
        for index in range(args.runs):
            last = index == args.runs - 1
            runs.append(run_once(args, models, config, profile=bool(args.profile) and last))
            run = runs[-1]
            line = f"   run {index + 1}: {run['tokens_per_second']:,.0f} tok/s"
            if "evaluate_seconds" in run:
                line += f", eval {run['evaluate_seconds']:.1f} s"
            if "first_step_seconds" in run:
                line += f", first step {run['first_step_seconds']:.1f} s"
            print(line, flush=True)

    best = runs[0]
    tps = median([r["tokens_per_second"] for r in runs])
    mfu = median([r["mfu"] for r in runs])
    print(
        f"\nblock {args.block_size}, batch {args.batch_size}, steps {args.warmup}..{args.steps}, "
        f"{best['parameters']:,} parameters, median of {len(runs)}\n"
    )
    print_table(
        [
            "tokens/s",
            "TFLOP/s",
            f"MFU vs {args.peak_tflops:g} TFLOP/s",
            "bf16",
            "optim",
            "tf32",
            "compile",
            "loader workers",
            "pin memory",
            "attention",
            "peak GiB",
        ],
        [
            [
                tps,
                median([r["tflops"] for r in runs]),
                f"{mfu:.1%}",
                best["bf16"],
                best["optim"],
                best["tf32"],
                best["torch_compile"],
                best["dataloader_workers"],
                best["pin_memory"],
                best["attention"],
                best["peak_memory_gib"],
            ]
        ],
    )
    print("\ngoal: MFU >= 45% on the H200" + (" (not meaningful in --smoke)" if smoke else ""))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": runs}) + "\n")


if __name__ == "__main__":
    main()
