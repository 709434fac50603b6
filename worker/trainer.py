"""The model side of a job: load the base model, configure `Trainer`, report from inside it.

Base models are untrusted input: no remote code, safetensors weights only. `JobCallback` is the
job's eyes and hands inside the training loop (heartbeat, progress, metric rows, cancel); more
callbacks (checkpoints) plug in beside it through `build_trainer(callbacks=...)`.
"""

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from sqlalchemy.orm import Session
from torch.utils.data import Dataset as TorchDataset
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
    default_data_collator,
)
from transformers.loss.loss_utils import LOSS_MAPPING

from shared.memory import MiB, keep_freed_memory
from shared.models import JobMetric
from shared.schemas import Hyperparameters
from shared.settings import Settings
from worker import hub
from worker.collate import Collate, compiled_collator
from worker.errors import JobFailure
from worker.lease import Lease

logger = logging.getLogger(__name__)

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass
class BaseModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: str  # the local folder or the Hub id it was loaded from
    max_positions: int | None


def finite(value: Any) -> float | None:
    """A float the JSON columns can hold: NaN and infinity become None."""
    if value is None:
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def perplexity(loss: float | None) -> float | None:
    if loss is None:
        return None
    try:
        return finite(math.exp(loss))
    except OverflowError:
        return None


# ---- Loading the base model ----


def resolve_base_model(name: str, settings: Settings) -> tuple[str, bool]:
    """(folder or Hub id, is_local) for a job's `base_model`."""
    models_dir = settings.resolved_models_dir
    folder = (models_dir / name).resolve()
    # `name` was checked against a strict pattern by the API; stay inside the models dir anyway.
    if folder.is_relative_to(models_dir) and (folder / "config.json").is_file():
        return str(folder), True
    if name in settings.allowed_base_models:
        return name, False
    raise JobFailure(
        "base_model_not_found",
        f"base model {name!r} is neither in the models directory nor an allowed Hub id",
        user_error=True,
    )


def check_local_weights(folder: Path, name: str) -> None:
    """Refuse a folder without safetensors weights before anything unpickles a file."""
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.name.endswith(_PICKLE_SUFFIXES))
    if pickles:
        raise JobFailure(
            "unsafe_model_weights",
            f"base model {name!r} has only pickle weights ({', '.join(pickles[:3])}); Tunery "
            "loads safetensors only, convert the model to model.safetensors",
            user_error=True,
        )
    raise JobFailure(
        "base_model_invalid",
        f"base model {name!r} has no safetensors weights; Tunery loads safetensors only",
        user_error=True,
    )


def _max_positions(config: Any) -> int | None:
    value = getattr(config, "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def _no_stop() -> None:
    return None


def load_base_model(
    name: str,
    settings: Settings,
    *,
    block_size: int | str,
    keep_going: Callable[[], None] = _no_stop,
) -> BaseModel:
    """Load tokenizer and model in fp32 (mixed precision happens in Trainer) with SDPA. A Hub
    model is fetched into the Hub cache first; `keep_going` is called during the download and
    stops it by raising."""
    source, is_local = resolve_base_model(name, settings)
    safe = {"trust_remote_code": False}
    try:
        folder = Path(source) if is_local else hub.fetch(source, keep_going=keep_going)
        check_local_weights(folder, name)
        config = AutoConfig.from_pretrained(folder, **safe)
        max_positions = _max_positions(config)
        # Checked before the weights load: a wrong block size should fail in seconds.
        if max_positions is not None and block_size != "auto" and int(block_size) > max_positions:
            raise JobFailure(
                "block_size_too_large",
                f"block_size {block_size} exceeds the {max_positions} positions of base model "
                f"{name!r}; use block_size <= {max_positions}",
                user_error=True,
            )
        tokenizer = AutoTokenizer.from_pretrained(folder, **safe)
        model = AutoModelForCausalLM.from_pretrained(
            folder,
            config=config,
            dtype=torch.float32,
            attn_implementation="sdpa",
            use_safetensors=True,
            **safe,
        )
    except OSError as exc:  # the Hub: unreachable, unknown id, gated; or unreadable files
        where = "its folder" if is_local else "the Hugging Face Hub or the local cache"
        raise JobFailure(
            "base_model_unavailable",
            f"base model {name!r} could not be loaded from {where}: {_first_line(exc)}",
            user_error=False,
        ) from exc
    except ValueError as exc:  # unknown architecture, remote code required, no SDPA support
        raise JobFailure(
            "base_model_invalid",
            f"base model {name!r} cannot be fine-tuned: {_first_line(exc)}",
            user_error=True,
        ) from exc
    check_tokenizer(tokenizer, folder, name)
    if tokenizer.pad_token is None:
        # Causal LMs often ship without a pad token; blocks are never padded, so EOS is safe.
        tokenizer.pad_token = tokenizer.eos_token
    if model.loss_type not in LOSS_MAPPING:
        # Classes not named `...ForCausalLM` (GPT2LMHeadModel) have no loss type: transformers
        # falls back to the causal LM loss after a warning on every forward, which writes a
        # misleading line to the worker's log and, under torch.compile, breaks every step's graph.
        model.loss_type = "ForCausalLM"
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return BaseModel(model, tokenizer, source, max_positions)


def check_tokenizer(tokenizer: PreTrainedTokenizerBase, folder: Path, name: str) -> None:
    """Refuse a tokenizer that turns text into nothing: transformers loads one, empty, from a
    folder without tokenizer files, and every example would become a lone EOS."""
    if tokenizer("Hello, world. 123", add_special_tokens=False)["input_ids"]:
        return
    files = sorted(path.name for path in folder.iterdir())
    shown = ", ".join(files[:12]) + (f" and {len(files) - 12} more" if len(files) > 12 else "")
    raise JobFailure(
        "base_model_invalid",
        f"base model {name!r} has no usable tokenizer: it turns text into no tokens. Its folder "
        "needs the model's tokenizer files (tokenizer.json, or vocab.json and merges.txt, or "
        f"tokenizer.model); it holds {shown}",
        user_error=True,
    )


def _first_line(exc: BaseException) -> str:
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), repr(exc))


# ---- Trainer ----


def keep_freed_training_memory() -> bool:
    """Keep the memory a CPU training step frees for the next step, set in the process that
    trains.

    Each step frees and allocates the same activations and gradients. With glibc's defaults
    much of that goes back to the kernel and comes back page-faulted: thousands of faults a
    step on the training-overhead benchmark's small model, and about a tenth of its step time
    (BENCHMARKS.md section 1). 32 MiB is the highest bound glibc's own adaptive threshold
    reaches, and it then keeps twice that; here it holds from the first step."""
    return keep_freed_memory(mmap_threshold=32 * MiB, trim_threshold=64 * MiB)


def use_bf16() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def describe_device() -> dict[str, Any]:
    if torch.cuda.is_available():
        return {
            "device": "cuda",
            "name": torch.cuda.get_device_name(),
            "precision": "bf16" if use_bf16() else "fp32",
        }
    return {"device": "cpu", "precision": "fp32"}


def logging_steps(total_steps: int) -> int:
    """About fifty metric rows per job, and one per step for tiny jobs."""
    return max(1, total_steps // 50)


def loader_arguments(cuda: bool) -> dict[str, Any]:
    """How Trainer loads batches: in the training process itself, pinned on a GPU.

    A job trains inside a Celery pool process, which is daemonic and may not start children: a
    loader with worker processes fails at its first batch ("daemonic processes are not allowed
    to have children"). None is needed: blocks and packed rows are arrays in memory, cheap to
    batch while the device still runs the step before, and a pinned batch is copied to the
    device without blocking the host (`non_blocking`)."""
    return {
        "dataloader_num_workers": 0,
        "dataloader_pin_memory": cuda,
        "accelerator_config": {"non_blocking": True} if cuda else None,
    }


def training_arguments(
    hp: Hyperparameters, output_dir: Path, total_steps: int
) -> TrainingArguments:
    cuda = torch.cuda.is_available()
    ampere = cuda and torch.cuda.get_device_capability()[0] >= 8
    return TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=hp.epochs,
        max_steps=hp.max_steps or -1,
        learning_rate=hp.learning_rate,
        per_device_train_batch_size=hp.batch_size,
        per_device_eval_batch_size=hp.batch_size,
        gradient_accumulation_steps=hp.gradient_accumulation_steps,
        warmup_steps=hp.warmup_ratio,  # a float below 1 is a ratio of the total steps
        weight_decay=hp.weight_decay,
        lr_scheduler_type=hp.lr_scheduler,
        seed=hp.seed,
        data_seed=hp.seed,
        bf16=use_bf16(),
        use_cpu=not cuda,
        logging_strategy="steps",
        logging_steps=logging_steps(total_steps),
        logging_first_step=True,
        # Trainer's NaN filter reads every step's loss on the host; we report NaN as it is.
        logging_nan_inf_filter=False,
        eval_strategy="no",  # the pipeline evaluates before and after training itself
        save_strategy="no",  # checkpoints come from their own callback
        prediction_loss_only=True,  # never gather logits: vocab x tokens would fill memory
        report_to="none",
        disable_tqdm=True,
        # Fused AdamW on either device (on a CPU it halves the optimizer step against the
        # foreach one); on a GPU, TF32 for the fp32 matmuls bf16 autocast leaves.
        tf32=True if ampere else None,
        optim="adamw_torch_fused",
        torch_compile=hp.compile,
        **loader_arguments(cuda),
    )


def build_trainer(
    model: PreTrainedModel,
    args: TrainingArguments,
    train: TorchDataset,
    evaluation: TorchDataset | None,
    callbacks: list[TrainerCallback],
    collator: Collate = default_data_collator,
) -> Trainer:
    if args.torch_compile:
        # Evaluation batches as many rows as training (`training_arguments`).
        rows = args.per_device_train_batch_size
        collator = compiled_collator(collator, [train, evaluation], rows)
    trainer = Trainer(
        model=model,
        args=args,
        data_collator=collator,
        train_dataset=train,
        eval_dataset=evaluation,
        callbacks=callbacks,
    )
    # With tqdm off, Trainer prints every log dict to stdout; JobCallback reports instead.
    trainer.remove_callback(PrinterCallback)
    return trainer


def evaluate_loss(trainer: Trainer, dataset: TorchDataset | None) -> float | None:
    if dataset is None:
        return None
    return finite(trainer.evaluate(eval_dataset=dataset)["eval_loss"])


class JobCallback(TrainerCallback):
    """Heartbeat, progress, metric rows and cancellation for the job being trained.

    It reads values Trainer already has on the host (step, epoch, the logged loss), so it adds
    no device sync; the database is touched at logging steps and otherwise at most every
    `Lease.heartbeat_interval_s` (heartbeat) and `Lease.poll_interval_s` (cancel flag).
    """

    def __init__(self, lease: Lease, tokens_per_step: int) -> None:
        self.lease = lease
        self.tokens_per_step = tokens_per_step
        self.total_steps: int | None = None
        self.last_progress: dict[str, Any] = {}
        self._rate_at = (time.monotonic(), 0)
        self._tokens_per_second: float | None = None
        self._seconds_per_step: float | None = None

    def progress(self, state: TrainerState, *, logged: bool = False) -> dict[str, Any]:
        """Where training stands. The rate is measured from one logged step to the next: at
        each, Trainer has read the loss on the host, so the device has done every step between
        them. Between logged steps the host runs ahead of the device, and its clock says nothing
        about the device's (one step timed that way on a GPU read half the true rate)."""
        now, step = time.monotonic(), state.global_step
        since, since_step = self._rate_at
        if logged and step > since_step and now > since:
            self._seconds_per_step = (now - since) / (step - since_step)
            self._tokens_per_second = self.tokens_per_step / self._seconds_per_step
            self._rate_at = (now, step)
        total = self.total_steps or state.max_steps or None
        remaining = max((total or step) - step, 0)
        eta = remaining * self._seconds_per_step if self._seconds_per_step is not None else None
        self.last_progress = {
            "step": step,
            "total_steps": total,
            "epoch": float(state.epoch or 0.0),
            "fraction": min(step / total, 1.0) if total else 0.0,
            "tokens_per_second": self._tokens_per_second,
            "eta_seconds": eta,
        }
        return self.last_progress

    def _stop(self, control: TrainerControl) -> TrainerControl:
        # Stop after this optimizer step, and make sure Trainer neither logs, evaluates nor
        # saves on its way out.
        control.should_training_stop = True
        control.should_log = control.should_evaluate = control.should_save = False
        return control

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        self.total_steps = state.max_steps
        self._rate_at = (time.monotonic(), state.global_step)
        self.lease.beat(self.progress(state), force=True)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> TrainerControl:
        if control.should_log:
            # `on_log` writes this step's metric row, and that write's heartbeat reads the
            # cancel flag: one visit to the database in this step, not a read and a write.
            return control
        self.lease.poll()
        if not self.lease.should_stop:
            self.lease.beat(self.progress(state))
        if self.lease.should_stop:
            return self._stop(control)
        return control

    def on_substep_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        # Long gradient accumulation: keep the lease fresh between optimizer steps.
        if not self.lease.should_stop:
            self.lease.beat()

    def on_prediction_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        # Evaluation has no stop flag: raising is the only way out of a long one.
        self.lease.poll()
        if not self.lease.should_stop:
            self.lease.beat()
        self.lease.raise_if_stopped()

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **_: Any,
    ) -> TrainerControl:
        # Only training logs become rows here; evaluations are recorded by the pipeline.
        if not logs or "loss" not in logs or self.lease.should_stop:
            return control
        progress = self.progress(state, logged=True)
        row = JobMetric(
            job_id=self.lease.job_id,
            step=state.global_step,
            epoch=finite(state.epoch),
            train_loss=finite(logs.get("loss")),
            learning_rate=finite(logs.get("learning_rate")),
            grad_norm=finite(logs.get("grad_norm")),
            tokens_per_second=finite(progress["tokens_per_second"]),
        )

        def add(session: Session) -> None:
            session.add(row)

        self.lease.write(add, values={"progress": progress}, skip_on_outage=True, poll=True)
        if self.lease.should_stop:
            return self._stop(control)
        return control


# ---- Samples ----


@torch.inference_mode()
def generate_samples(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    *,
    max_positions: int | None,
    max_new_tokens: int,
    rendered: bool = False,
    on_progress: Callable[[], object] | None = None,
) -> list[str]:
    """The greedy continuation of each prompt, one prompt at a time (no padding to get wrong).
    `rendered` prompts come from a chat template, which writes its own special tokens."""
    if not prompts:
        return []
    was_training = model.training
    model.eval()
    samples = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=not rendered)["input_ids"]
        if max_positions is not None:  # keep the end of a long prompt, leave room to answer
            ids = ids[:, -max(1, max_positions - max_new_tokens) :]
        ids = ids.to(model.device)
        output = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=tokenizer.pad_token_id,
        )
        samples.append(tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True))
        if on_progress is not None:
            on_progress()
    model.train(was_training)
    return samples
