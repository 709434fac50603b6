"""Rows and files for pipeline tests: a project, stored datasets, claimed jobs.

Tests call `worker.pipeline.run` directly (no Celery) on the database of the top-level
`settings` fixture, so every pipeline test runs on SQLite and on PostgreSQL.
"""

import hashlib
from collections.abc import Callable
from typing import Any

import pytest

from shared import jobs, storage
from shared.db import session_scope
from shared.ids import new_id
from shared.models import Dataset, Job, Project
from shared.schemas import Hyperparameters
from shared.settings import Settings
from tests.conftest import TINY_MODEL
from worker.lease import Lease


@pytest.fixture
def fast_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    """Read the cancel flag at every step, so "within one step" is exact and testable."""
    monkeypatch.setattr(Lease, "poll_interval_s", 0.0)


@pytest.fixture
def project_id(settings: Settings) -> str:
    with session_scope() as session:
        project = Project(name=f"worker-{new_id('t')}")
        session.add(project)
        session.flush()
        return project.id


MakeDataset = Callable[..., str]


@pytest.fixture
def make_dataset(project_id: str) -> MakeDataset:
    """Store a file and its Dataset row; returns the dataset id."""

    def make(
        content: str | bytes,
        *,
        filename: str = "train.txt",
        format: str = "text",
        shape: str = "text",
    ) -> str:
        body = content.encode() if isinstance(content, str) else content
        dataset_id = new_id("ds")
        with storage.open_write(storage.dataset_key(dataset_id)) as stream:
            stream.write(body)
        examples = sum(1 for line in body.splitlines() if line.strip())
        with session_scope() as session:
            session.add(
                Dataset(
                    id=dataset_id,
                    project_id=project_id,
                    filename=filename,
                    format=format,
                    shape=shape,
                    bytes=len(body),
                    sha256=hashlib.sha256(body).hexdigest(),
                    examples=examples,
                )
            )
        return dataset_id

    return make


MakeJob = Callable[..., tuple[str, int]]


@pytest.fixture
def make_job(project_id: str) -> MakeJob:
    """Create a queued job and claim it as a worker would; returns (job id, attempt)."""

    def make(
        dataset_id: str,
        *,
        base_model: str = TINY_MODEL,
        validation_split: float = 0.0,
        validation_dataset_id: str | None = None,
        eval_prompts: list[str] | None = None,
        **hyperparameters: Any,
    ) -> tuple[str, int]:
        with session_scope() as session:
            job = Job(
                project_id=project_id,
                base_model=base_model,
                dataset_id=dataset_id,
                validation_dataset_id=validation_dataset_id,
                validation_split=validation_split,
                method="full",
                hyperparameters=Hyperparameters(**hyperparameters).model_dump(),
                lora=None,
                eval_prompts=eval_prompts or [],
                suffix=None,
                metadata_={},
                progress={},
                metrics={},
            )
            jobs.add_queued(session, job)
            job_id = job.id
        with session_scope() as session:
            attempt = jobs.claim(session, job_id)
        assert attempt is not None
        return job_id, attempt

    return make
