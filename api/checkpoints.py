"""A job's checkpoints: the complete ones in storage now, newest first."""

from fastapi import APIRouter

from api.deps import JobSnapshotDep
from api.errors import RESOURCE_ERRORS
from api.pagination import list_of
from shared import checkpoints
from shared.schemas import CheckpointRead, ListRead

router = APIRouter(prefix="/jobs", tags=["jobs"], responses=RESOURCE_ERRORS)


@router.get("/{job_id}/checkpoints")
def list_checkpoints(job: JobSnapshotDep) -> ListRead[CheckpointRead]:
    """The job's complete checkpoints, newest first (deleted once the job has ended)."""
    found = checkpoints.list_complete(job.id)
    return list_of(
        [CheckpointRead(step=c.step, created_at=c.created_at, metrics=c.metrics) for c in found],
        False,
    )
