"""One training job from claimed row to finished row: the order of the steps, top to bottom.

load base model -> tokenize + pack + split -> baseline samples and eval -> Trainer.train()
-> final eval and samples -> save -> package the tarball into storage -> mark succeeded.

`run` never raises: a failure becomes the job's `error`, a cancel becomes `cancelled`, a lost
claim ends the attempt silently, because another attempt owns the job now, and a worker shutting
down hands the job back to the queue after a checkpoint. A re-claimed job resumes from its newest
complete checkpoint; the checkpoints are deleted once the job has ended.
"""

import gc
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import torch
from huggingface_hub.utils import disable_progress_bars
from pydantic import ValidationError
from sqlalchemy import inspect as orm_inspect
from sqlalchemy import select
from sqlalchemy.orm import Session
from transformers import GenerationConfig, Trainer
from transformers.utils import logging as transformers_logging

from shared import checkpoints, jobs, storage
from shared.checkpoints import Checkpoint
from shared.db import session_scope
from shared.models import Dataset, Job, JobMetric, utcnow
from shared.queue import send_train
from shared.schemas import Hyperparameters, JobMetricRead, JobMetrics, JobRead
from shared.settings import get_settings
from worker import artifacts, leftovers, shutdown, work_folders
from worker.attention import causal_attention
from worker.checkpoints import CheckpointCallback, restore_newest
from worker.data import PreparedData
from worker.errors import (
    HandBack,
    JobCancelled,
    JobFailure,
    LeaseLost,
    classify,
    is_disk_full,
    name_a_full_disk,
)
from worker.lease import Lease, retry_on_outage
from worker.lora import apply_lora, save_lora
from worker.masking import DEFAULT_CHAT_TEMPLATE, render_prompts
from worker.plan import Plan, plan, rendered_examples
from worker.trainer import (
    BaseModel,
    JobCallback,
    build_trainer,
    describe_device,
    evaluate_loss,
    generate_samples,
    load_base_model,
    logging_steps,
    perplexity,
    training_arguments,
)

logger = logging.getLogger(__name__)

Outcome = TypeVar("Outcome")


@dataclass
class JobInputs:
    """The rows a run reads, loaded once (detached copies; the database stays the truth)."""

    job: Job
    dataset: Dataset
    validation: Dataset | None
    hyperparameters: Hyperparameters


@dataclass
class RunState:
    """What the run has learned so far, reported in events, job.json and the model card."""

    metrics: dict[str, Any] = field(default_factory=lambda: JobMetrics().model_dump())
    progress: dict[str, Any] = field(default_factory=dict)
    samples: list[dict[str, str]] = field(default_factory=list)
    training: dict[str, Any] = field(default_factory=dict)


def run(job_id: str, attempt: int) -> None:
    """Train job `job_id`, claimed by the caller as `attempt`, and record how it ended."""
    transformers_logging.disable_progress_bar()
    disable_progress_bars()
    lease = Lease(job_id, attempt)
    try:
        with work_folders.for_attempt(job_id, attempt) as workdir:
            _train(lease, workdir)
    except LeaseLost:
        logger.warning("job %s attempt %s lost its claim; stopped without writing", job_id, attempt)
    except HandBack as reason:
        _hand_back(job_id, attempt, str(reason))
    except JobCancelled:
        logger.info("job %s cancelled", job_id)
        if _record_end(job_id, lambda session: jobs.mark_cancelled(session, job_id, attempt)):
            leftovers.remove_unsucceeded(job_id)
    except Exception as exc:
        error = classify(exc)
        logger.exception("job %s attempt %s failed: %s", job_id, attempt, error["code"])
        failed = _record_end(
            job_id, lambda session: jobs.mark_failed(session, job_id, error, attempt=attempt)
        )
        if failed:
            leftovers.remove_unsucceeded(job_id)
    finally:
        # Free the model before the next job; the worker process lives on.
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _record_end(job_id: str, transition: Callable[[Session], Outcome]) -> Outcome | None:
    """Apply the job's final transition, through a database outage; what it returned, or None
    when the database stayed away (the sweeper will re-queue the job, so its checkpoints must
    stay)."""

    def apply() -> Outcome:
        with session_scope() as session:
            return transition(session)

    try:
        return retry_on_outage(apply, f"recording how job {job_id} ended")
    except Exception:
        logger.exception("job %s: could not record how it ended", job_id)
        return None


def _hand_back(job_id: str, attempt: int, reason: str) -> None:
    """Re-queue the job (its checkpoint is in storage) and ring the doorbell after the commit;
    if the message is lost, the sweeper rings again. A cancel that came after the last check
    ends the job cancelled instead."""
    logger.info("job %s: handing it back: %s", job_id, reason)
    ended = _record_end(job_id, lambda session: jobs.hand_back(session, job_id, attempt, reason))
    if ended == jobs.CANCELLED:  # the cancel came after the last check: nothing resumes it
        leftovers.remove_unsucceeded(job_id)
    if ended != jobs.QUEUED:
        return
    try:
        send_train(job_id)
    except Exception:
        logger.warning("job %s: re-queued, but the doorbell failed; the sweeper resends it", job_id)


def _check(lease: Lease) -> None:
    """Between stages: stop for a cancel or a lost claim, hand back on shutdown."""
    lease.check()
    if shutdown.requested():
        raise HandBack("the worker is shutting down; the job resumes from its last checkpoint")


def _load_rows(job_id: str) -> tuple[Job | None, Dataset | None, Dataset | None]:
    with session_scope() as session:
        job = session.get(Job, job_id)
        if job is None:
            return None, None, None
        dataset = session.get(Dataset, job.dataset_id)
        validation = (
            session.get(Dataset, job.validation_dataset_id) if job.validation_dataset_id else None
        )
        return job, dataset, validation


def load_inputs(job_id: str, attempt: int) -> JobInputs:
    job, dataset, validation = retry_on_outage(lambda: _load_rows(job_id), f"loading job {job_id}")
    if job is None or job.status != jobs.RUNNING or job.attempt != attempt:
        raise LeaseLost(f"job {job_id} is not running as attempt {attempt}")
    deleted = [d for d in (dataset, validation) if d is not None and d.deleted_at is not None]
    if dataset is None or (job.validation_dataset_id and validation is None) or deleted:
        raise JobFailure("dataset_not_found", "the job's dataset was deleted", user_error=True)
    try:
        hyperparameters = Hyperparameters.model_validate(job.hyperparameters)
    except ValidationError as exc:
        raise JobFailure(
            "invalid_hyperparameters",
            f"invalid hyperparameters: {exc.errors()[0]['msg']}",
            user_error=True,
        ) from None
    return JobInputs(job, dataset, validation, hyperparameters)


def _train(lease: Lease, workdir: Path) -> None:
    inputs = load_inputs(lease.job_id, lease.attempt)
    job, state = inputs.job, RunState()

    lease.event(f"loading base model {job.base_model}")
    with lease.keep_alive():  # a Hub download can take minutes
        base = load_base_model(
            job.base_model,
            get_settings(),
            block_size=inputs.hyperparameters.block_size,
            keep_going=lambda: _check(lease),
        )
    parameters = sum(p.numel() for p in base.model.parameters())
    lease.event(
        f"base model {job.base_model} loaded ({parameters:,} parameters)",
        data={"base_model": job.base_model, "parameters": parameters, **describe_device()},
    )
    _check(lease)
    if job.method == "lora":
        base.model = apply_lora(base.model, job.lora or {})

    job_plan = plan(
        lease,
        base.model,
        base.tokenizer,
        dataset=inputs.dataset,
        validation=inputs.validation,
        validation_split=job.validation_split,
        hyperparameters=inputs.hyperparameters,
        method=job.method,
        truncation=job.truncation,
        max_positions=base.max_positions,
    )
    inputs.hyperparameters = job_plan.hyperparameters
    data = job_plan.data
    _report_plan(lease, job_plan)
    _check(lease)
    if job.dry_run:
        _answer_dry_run(lease, inputs, job_plan, base)
        return

    restored = restore_newest(lease, workdir / "resume")
    resumed = restored[0] if restored else None
    trainer, callback, saver = _make_trainer(lease, base, job_plan, workdir, state, resumed)
    sampling = _sampling(lease, job, base, inputs.dataset.shape)
    baseline_samples = _samples(lease, trainer, base, sampling, "base model")
    with causal_attention(trainer.model, data.train) as causal:
        state.training["attention"] = "causal" if causal else "masked"
        _fit(lease, trainer, data, state, restored, callback, saver)
    tuned_samples = _samples(lease, trainer, base, sampling, "fine-tuned model")
    state.samples = [
        {"prompt": prompt, "base": before, "tuned": after}
        for prompt, before, after in zip(
            job.eval_prompts, baseline_samples, tuned_samples, strict=True
        )
    ]
    lease.check()

    package = workdir / "package"
    lease.event("saving the model")
    with lease.keep_alive():
        _save_model(trainer, base, job, package)
    lease.event("packaging the artifact")
    with lease.keep_alive():
        finished_at = utcnow()
        _write_package(package, inputs, state, finished_at)
        # The keep-alive's beats read the cancel flag: a cancel stops a long upload within a
        # beat, and its partial file is removed.
        size, sha256 = artifacts.upload_tarball(
            package, storage.artifact_key(job.id), on_chunk=lease.raise_if_stopped
        )
    values = {
        "artifact_bytes": size,
        "artifact_sha256": sha256,
        "metrics": state.metrics,
        "progress": state.progress,
        "samples": state.samples,
        "finished_at": finished_at,
    }

    def succeed() -> bool:
        with session_scope() as session:
            return jobs.mark_succeeded(session, job.id, lease.attempt, values=values)

    if retry_on_outage(succeed, f"recording that job {job.id} succeeded"):
        checkpoints.delete_all(job.id)
    else:
        lease.check()  # raises why: a cancel read after the upload, or a lost claim


def _fit(
    lease: Lease,
    trainer: Trainer,
    data: PreparedData,
    state: RunState,
    restored: tuple[Checkpoint, Path] | None,
    callback: JobCallback,
    saver: CheckpointCallback,
) -> None:
    """The baseline eval, training (from the newest checkpoint if there is one), the final eval."""
    _evaluate(lease, trainer, data, state, stage="baseline")
    _check(lease)
    if restored is not None:
        step = restored[0].step
        lease.event(
            f"resumed from checkpoint at step {step}",
            data={"step": step, **state.training},
            values={"resumed_from_step": step},
        )
    else:
        lease.event("training started", data=state.training)
    try:
        output = trainer.train(resume_from_checkpoint=str(restored[1]) if restored else None)
    except Exception as error:
        error = name_a_full_disk(error, Path(trainer.args.output_dir))
        if is_disk_full(error):  # while saving a checkpoint, Trainer's files or ours
            saver.report_disk_full(trainer.state.global_step)
        raise error
    lease.check()  # a cancel or a lost claim stopped the loop: leave before anything is saved
    if saver.handing_back:
        raise HandBack(
            f"the worker is shutting down; the job resumes from its checkpoint at step "
            f"{saver.last_saved_step}"
        )
    state.metrics["train_loss"] = saver.run_train_loss(output.training_loss, trainer.state)
    state.progress = {**callback.progress(trainer.state), "fraction": 1.0, "eta_seconds": 0.0}
    _evaluate(lease, trainer, data, state, stage="final")


def _report_plan(lease: Lease, job_plan: Plan) -> None:
    report, data = job_plan.report, job_plan.data
    if data.cache_hit:
        lease.event("tokenized data reused from the cache (same dataset, tokenizer and options)")
    message = (
        f"{report['examples']} examples tokenized into {report['blocks'] + report['eval_blocks']}"
        f" blocks of up to {job_plan.hyperparameters.block_size} tokens"
    )
    if report["truncated"] or report["dropped"]:
        message += f"; {report['truncated']} truncated, {report['dropped']} dropped (too long)"
    # The resolved hyperparameters replace any "auto" on the job, so it says what it trains with.
    lease.event(
        message,
        data=report,
        values={"plan": report, "hyperparameters": report["hyperparameters"]},
    )
    if data.eval_is_short_block:
        lease.event(
            f"the validation set has {data.eval_tokens_total} tokens, fewer than one block; "
            "it is evaluated as one shorter block",
            level="warning",
        )


def _answer_dry_run(lease: Lease, inputs: JobInputs, job_plan: Plan, base: BaseModel) -> None:
    """A dry run ends here: its answer is the plan, with the first examples rendered."""
    report = {
        **job_plan.report,
        "rendered_examples": rendered_examples(base.tokenizer, inputs.dataset),
    }

    def succeed() -> bool:
        with session_scope() as session:
            return jobs.mark_succeeded(
                session, inputs.job.id, lease.attempt, values={"plan": report}
            )

    if not retry_on_outage(succeed, f"recording the dry run of job {inputs.job.id}"):
        lease.check()


def _make_trainer(
    lease: Lease,
    base: BaseModel,
    job_plan: Plan,
    workdir: Path,
    state: RunState,
    resumed: Checkpoint | None,
) -> tuple[Trainer, JobCallback, CheckpointCallback]:
    hp, data, total_steps = job_plan.hyperparameters, job_plan.data, job_plan.total_steps
    state.training = {
        "total_steps": total_steps,
        "logging_steps": logging_steps(total_steps),
        "train_blocks": len(data.train),
        "eval_blocks": len(data.eval) if data.eval is not None else 0,
        "train_tokens": data.train_stats.tokens,
        **describe_device(),
    }
    # Packed rows may be shorter than a block: count the tokens a step really sees.
    tokens_per_row = data.train_stats.tokens / max(1, len(data.train))
    tokens_per_step = round(hp.batch_size * hp.gradient_accumulation_steps * tokens_per_row)
    callback = JobCallback(lease, tokens_per_step)
    # After JobCallback: it sees a stop (cancel, lost claim) first and then saves nothing.
    saver = CheckpointCallback(lease, get_settings().checkpoint_interval_s, resumed)
    args = training_arguments(hp, workdir / "trainer", total_steps)
    if hp.compile:
        # Graphs an earlier job compiled in this process would leave this job's sizes dynamic
        # (automatic dynamic shapes) and count towards dynamo's limit of graphs per function,
        # past which it runs eager: each job compiles its own, from inductor's cache on disk
        # where an earlier job had the same shapes.
        torch._dynamo.reset()
    trainer = build_trainer(
        base.model, args, data.train, data.eval, [callback, saver], collator=data.collator
    )
    return trainer, callback, saver


@dataclass
class Sampling:
    """The job's sample prompts as the model continues them, and how far."""

    prompts: list[Any]  # as the job gives them: text, or conversations
    texts: list[str]
    rendered: bool  # by the chat template
    max_new_tokens: int


def _sampling(lease: Lease, job: Job, base: BaseModel, shape: str) -> Sampling:
    """A `messages` job's prompts go through the chat template it trains with (a text prompt
    is one user message), so that its samples show the model in chat use. The API refuses
    more new tokens than a local model has positions; a Hub model's are known only here."""
    max_new_tokens, positions = job.eval_max_new_tokens, base.max_positions
    if job.eval_prompts and positions is not None and max_new_tokens >= positions:
        lease.event(
            f"eval_max_new_tokens {max_new_tokens} leaves no room for a prompt in the model's "
            f"{positions} positions; the samples generate {positions - 1}",
            level="warning",
        )
        max_new_tokens = positions - 1
    if shape != "messages":
        return Sampling(job.eval_prompts, list(job.eval_prompts), False, max_new_tokens)
    conversations = [
        [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        for prompt in job.eval_prompts
    ]
    texts = render_prompts(base.tokenizer, conversations) if conversations else []
    return Sampling(job.eval_prompts, texts, True, max_new_tokens)


def _samples(
    lease: Lease, trainer: Trainer, base: BaseModel, sampling: Sampling, which: str
) -> list[str]:
    completions = generate_samples(
        trainer.model,
        base.tokenizer,
        sampling.texts,
        max_positions=base.max_positions,
        max_new_tokens=sampling.max_new_tokens,
        rendered=sampling.rendered,
        on_progress=lease.keep_going,
    )
    if completions:
        samples = [
            {"prompt": prompt, "completion": completion}
            for prompt, completion in zip(sampling.prompts, completions, strict=True)
        ]
        lease.event(f"samples from the {which}", data={"model": which, "samples": samples})
    return completions


def _evaluate(
    lease: Lease, trainer: Trainer, data: PreparedData, state: RunState, *, stage: str
) -> None:
    """Eval loss and perplexity, written as a metric row, an event and the job's metrics."""
    loss = evaluate_loss(trainer, data.eval)
    if loss is None:
        return
    ppl = perplexity(loss)
    prefix = "baseline_" if stage == "baseline" else ""
    state.metrics[f"{prefix}eval_loss"] = loss
    state.metrics[f"{prefix}eval_perplexity"] = ppl
    step = trainer.state.global_step
    message = f"{stage} eval: loss {loss:.4f}" + (f", perplexity {ppl:.2f}" if ppl else "")
    row = JobMetric(
        job_id=lease.job_id, step=step, epoch=float(trainer.state.epoch or 0.0), eval_loss=loss
    )

    def add(session: Session) -> None:
        session.add(row)
        data = {"stage": stage, "step": step, "eval_loss": loss, "eval_perplexity": ppl}
        jobs.add_event(session, lease.job_id, message, type="metrics", data=data)

    logger.info("job %s: %s", lease.job_id, message)
    if not lease.write(add, values={"metrics": dict(state.metrics)}):
        raise LeaseLost(lease.job_id)


def _save_model(trainer: Trainer, base: BaseModel, job: Job, package: Path) -> None:
    """`model/` for a full fine-tune; `adapter/` (and, with `merge`, `model/`) for LoRA."""
    tokenizer = base.tokenizer
    if tokenizer.chat_template is None:
        # Chat data was rendered with the default template: ship it, so the tuned model's
        # tokenizer renders conversations the way the model learned them.
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    model = trainer.model
    if job.method == "lora":
        merge = bool((job.lora or {}).get("merge"))
        model = save_lora(model, package, tokenizer, merge=merge, base_model_name=job.base_model)
        if not merge:
            return
    else:
        model.save_pretrained(package / "model")
        tokenizer.save_pretrained(package / "model")
    if not (package / "model" / "generation_config.json").is_file():
        # The contract promises it; models without one get the defaults from their config.
        GenerationConfig.from_model_config(model.config).save_pretrained(package / "model")


def _write_package(
    package: Path, inputs: JobInputs, state: RunState, finished_at: datetime
) -> None:
    job, dataset = inputs.job, inputs.dataset
    job_json = _job_document(job.id, state, finished_at)
    artifacts.write_json(package / "job.json", job_json)
    artifacts.write_jsonl(package / "metrics.jsonl", _metric_rows(job.id))
    facts = artifacts.CardFacts(
        job_id=job.id,
        base_model=job.base_model,
        dataset={
            "filename": dataset.filename,
            "sha256": dataset.sha256,
            "examples": dataset.examples,
            "format": dataset.format,
            "shape": dataset.shape,
        },
        validation=_validation_text(inputs),
        hyperparameters=inputs.hyperparameters.model_dump(),
        method=job.method,
        lora=job.lora,
        training=state.training,
        metrics=state.metrics,
        samples=state.samples,
        suffix=job.suffix,
    )
    (package / "README.md").write_text(artifacts.render_model_card(facts), encoding="utf-8")
    artifacts.write_manifest(package)


def _validation_text(inputs: JobInputs) -> str:
    if inputs.validation is not None:
        return f"dataset `{inputs.validation.filename}` (sha256 `{inputs.validation.sha256}`)"
    split = inputs.job.validation_split
    if split > 0:
        seed = inputs.hyperparameters.seed
        return f"{split:.0%} of the training examples, held out with seed {seed}"
    return "none (validation_split 0): no evaluation"


def _job_document(job_id: str, state: RunState, finished_at: datetime) -> dict[str, Any]:
    """The job object as it reads once succeeded. Its `artifact` has the URL but no size or
    hash: a file cannot contain the hash of the archive it is inside."""
    with session_scope() as session:
        job = session.get(Job, job_id)
        columns = {c.key: getattr(job, c.key) for c in orm_inspect(Job).mapper.column_attrs}
    snapshot = SimpleNamespace(
        **{
            **columns,
            "status": jobs.SUCCEEDED,
            "metrics": state.metrics,
            "progress": state.progress,
            "finished_at": finished_at,
        }
    )
    document = JobRead.from_row(snapshot).model_dump(mode="json")
    document["artifact"] = {"url": f"/jobs/{job_id}/artifact", "bytes": None, "sha256": None}
    document["samples"] = state.samples
    return document


def _metric_rows(job_id: str) -> list[dict[str, Any]]:
    with session_scope() as session:
        rows = session.scalars(
            select(JobMetric).where(JobMetric.job_id == job_id).order_by(JobMetric.seq)
        ).all()
        return [JobMetricRead.model_validate(row).model_dump(mode="json") for row in rows]
