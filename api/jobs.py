"""Jobs: create (validated, then queued after commit), list, read, cancel, events, metrics."""

import hashlib
import json
import logging
import time
from typing import Annotated, Literal

from fastapi import APIRouter, Header, Query, Response
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from api.base_models import local_config, max_positions
from api.deps import JobDep, JobSnapshotDep, PrincipalDep, SessionDep, owned_dataset
from api.errors import RESOURCE_ERRORS, APIError, documented
from api.pagination import list_of, newest_first
from shared import checkpoints, workers
from shared import jobs as job_states
from shared.models import Job, JobEvent, JobMetric
from shared.queue import send_train
from shared.schemas import (
    JobCreate,
    JobEventRead,
    JobMetricRead,
    JobMetrics,
    JobRead,
    ListRead,
    Progress,
)
from shared.settings import get_settings

router = APIRouter(prefix="/jobs", tags=["jobs"], responses=RESOURCE_ERRORS)
logger = logging.getLogger(__name__)

Limit = Annotated[int, Query(ge=1, le=100)]


def _check_base_model(body: JobCreate) -> None:
    settings = get_settings()
    config = local_config(settings, body.base_model)
    if config is None and body.base_model not in settings.allowed_base_models:
        raise APIError(
            422,
            "unknown_base_model",
            f"base model {body.base_model!r} is neither in the models directory nor in "
            "TUNERY_ALLOWED_BASE_MODELS",
            param="base_model",
        )
    limit = max_positions(config) if config else None
    if body.eval_prompts and limit is not None and body.eval_max_new_tokens >= limit:
        raise APIError(
            422,
            "eval_max_new_tokens_too_large",
            f"eval_max_new_tokens {body.eval_max_new_tokens} leaves no room for a prompt in "
            f"the model's {limit} positions; use at most {limit - 1}",
            param="eval_max_new_tokens",
        )
    block_size = body.hyperparameters.block_size
    if limit is not None and block_size != "auto" and block_size > limit:
        raise APIError(
            422,
            "block_size_too_large",
            f"block_size {body.hyperparameters.block_size} exceeds the model's {limit} positions",
            param="hyperparameters.block_size",
        )


def _check_datasets(session: SessionDep, principal: PrincipalDep, body: JobCreate) -> None:
    shapes = []
    for param in ("dataset_id", "validation_dataset_id"):
        dataset_id = getattr(body, param)
        if dataset_id is None:
            continue
        dataset = owned_dataset(session, principal, dataset_id)
        if dataset is None:
            raise APIError(
                422, "dataset_not_found", f"no dataset with id {dataset_id!r}", param=param
            )
        shapes.append(dataset.shape)
    if len(set(shapes)) > 1:
        raise APIError(
            422,
            "dataset_shapes_differ",
            f"the validation dataset has the {shapes[1]} shape, the training dataset the "
            f"{shapes[0]} shape; they must match",
            param="validation_dataset_id",
        )
    chats = [i for i, prompt in enumerate(body.eval_prompts) if not isinstance(prompt, str)]
    if chats and shapes[0] != "messages":
        raise APIError(
            422,
            "invalid_request",
            f"eval_prompts.{chats[0]} is a conversation, which only a messages dataset's chat "
            f"template renders; this dataset has the {shapes[0]} shape: give a text prompt",
            param=f"eval_prompts.{chats[0]}",
        )


def _request_digest(body: JobCreate) -> str:
    canonical = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _replay(session: SessionDep, principal: PrincipalDep, key: str, digest: str) -> Job | None:
    """The job an earlier request with this Idempotency-Key created, if the body matches."""
    job = session.scalar(
        select(Job).where(Job.project_id == principal.project_id, Job.idempotency_key == key)
    )
    if job is not None and job.request_sha256 != digest:
        raise APIError(
            409,
            "idempotency_key_reused",
            "this Idempotency-Key was used with a different request body",
            param="Idempotency-Key",
        )
    return job


@router.post("", status_code=201, responses=documented(409))
def create_job(
    body: JobCreate,
    session: SessionDep,
    principal: PrincipalDep,
    response: Response,
    idempotency_key: Annotated[str | None, Header(min_length=1, max_length=255)] = None,
) -> JobRead:
    """Create a fine-tuning job; it is queued for a worker."""
    digest = _request_digest(body)
    if idempotency_key and (earlier := _replay(session, principal, idempotency_key, digest)):
        response.headers["Idempotent-Replayed"] = "true"
        return JobRead.from_row(earlier)
    _check_base_model(body)
    _check_datasets(session, principal, body)
    job = Job(
        project_id=principal.project_id,
        base_model=body.base_model,
        dataset_id=body.dataset_id,
        validation_dataset_id=body.validation_dataset_id,
        validation_split=body.validation_split,
        method=body.method,
        hyperparameters=body.hyperparameters.model_dump(mode="json"),
        lora=body.lora.model_dump(mode="json") if body.lora else None,
        eval_prompts=body.model_dump(mode="json")["eval_prompts"],
        eval_max_new_tokens=body.eval_max_new_tokens,
        truncation=body.truncation,
        dry_run=body.dry_run,
        samples=[],
        suffix=body.suffix,
        metadata_=body.metadata,
        progress=Progress(total_steps=body.hyperparameters.max_steps).model_dump(),
        metrics=JobMetrics().model_dump(),
        idempotency_key=idempotency_key,
        request_sha256=digest,
    )
    try:
        job_states.add_queued(session, job)
        if not workers.alive(session):
            job_states.add_event(
                session,
                job.id,
                "no worker is alive: the job waits in the queue until one starts",
                level="warning",
            )
        session.commit()
    except IntegrityError:
        # Another request with the same Idempotency-Key committed first.
        session.rollback()
        earlier = _replay(session, principal, idempotency_key or "", digest)
        if earlier is None:
            raise
        response.headers["Idempotent-Replayed"] = "true"
        return JobRead.from_row(earlier)
    # Send the doorbell only now: a message for an uncommitted row could point at nothing.
    try:
        send_train(job.id)
    except Exception as error:
        logger.warning("could not queue job %s: %s", job.id, error)
        job_states.add_event(
            session,
            job.id,
            "the queue was unreachable; the job stays queued and will be sent again",
            level="warning",
        )
        session.commit()
    if job.dry_run:
        job = _finished_dry_run(session, job)
    return JobRead.from_row(job)


def _finished_dry_run(session: SessionDep, job: Job) -> Job:
    """A dry run is quick work for an idle worker: wait for its plan, so that the caller gets
    the answer in this response. A busy worker leaves it queued, to be polled."""
    deadline = time.monotonic() + get_settings().dry_run_wait_s
    while time.monotonic() < deadline:
        session.refresh(job)
        if job.status in job_states.FINISHED:
            break
        session.commit()  # end the read transaction, so the next refresh sees new commits
        time.sleep(0.05)
    return job


@router.get("")
def list_jobs(
    session: SessionDep,
    principal: PrincipalDep,
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"] | None = None,
    limit: Limit = 20,
    after: Annotated[str | None, Query(max_length=64)] = None,
) -> ListRead[JobRead]:
    """List your jobs, newest first."""
    statement = select(Job).where(Job.project_id == principal.project_id)
    if status is not None:
        statement = statement.where(Job.status == status)
    rows, has_more = newest_first(session, statement, Job.id, limit, after)
    return list_of([JobRead.from_row(job) for job in rows], has_more)


@router.get("/{job_id}", response_model=JobRead)
async def get_job(job: JobSnapshotDep) -> Response:
    """Read a job: status, progress, metrics, error and artifact."""
    # The hot path of every client that polls: serialized once, not validated again.
    return Response(JobRead.from_row(job).model_dump_json(), media_type="application/json")


@router.post("/{job_id}/cancel", responses=documented(409))
def cancel_job(job: JobDep, session: SessionDep) -> JobRead:
    """Cancel a job: a queued one at once, a running one within one optimizer step."""
    try:
        job_states.cancel(session, job.id)
    except job_states.JobFinished as finished:
        raise APIError(409, "job_finished", f"the job has already {finished.status}") from None
    session.commit()
    session.refresh(job)
    if job.status == job_states.CANCELLED:
        # A queued job that a worker handed back may hold checkpoints nobody will resume now.
        checkpoints.delete_all(job.id)
    return JobRead.from_row(job)


@router.get("/{job_id}/events")
def list_events(
    job: JobDep,
    session: SessionDep,
    after: Annotated[str | None, Query(pattern=r"^evt_\d+$")] = None,
    limit: Limit = 100,
) -> ListRead[JobEventRead]:
    """The job's events, oldest first."""
    statement = select(JobEvent).where(JobEvent.job_id == job.id)
    if after is not None:
        statement = statement.where(JobEvent.seq > int(after.removeprefix("evt_")))
    rows = list(session.scalars(statement.order_by(JobEvent.seq).limit(limit + 1)))
    return list_of([JobEventRead.model_validate(row) for row in rows[:limit]], len(rows) > limit)


@router.get("/{job_id}/metrics")
def list_metrics(job: JobDep, session: SessionDep) -> ListRead[JobMetricRead]:
    """Every logged training step, in order."""
    rows = session.scalars(
        select(JobMetric).where(JobMetric.job_id == job.id).order_by(JobMetric.step, JobMetric.seq)
    )
    return list_of([JobMetricRead.model_validate(row) for row in rows], False)
