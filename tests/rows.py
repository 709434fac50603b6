"""Rows written straight to the database, for tests of code that acts on existing jobs."""

from shared import jobs
from shared.db import session_scope
from shared.keys import project_named
from shared.models import Dataset, Job


def queued_job(project: str = "alpha") -> str:
    """A queued job (and its project and one-line dataset); returns the job id."""
    with session_scope() as session:
        owner = project_named(session, project)
        dataset = Dataset(
            project_id=owner.id,
            filename="d.txt",
            format="text",
            shape="text",
            bytes=1,
            sha256="0" * 64,
            examples=1,
        )
        session.add(dataset)
        session.flush()
        job = Job(
            project_id=owner.id,
            base_model="m",
            dataset_id=dataset.id,
            validation_split=0.1,
            method="full",
            hyperparameters={},
            eval_prompts=[],
            metadata_={},
            progress={},
            metrics={},
        )
        jobs.add_queued(session, job)
        return job.id
