"""The trained model tarball, streamed with Content-Length, ETag and HTTP ranges."""

from typing import Annotated

from fastapi import APIRouter, Header
from fastapi.responses import FileResponse
from starlette.responses import MalformedRangeHeader, RangeNotSatisfiable

from api.deps import JobSnapshotDep
from api.errors import RESOURCE_ERRORS, APIError, documented
from shared import storage
from shared.jobs import SUCCEEDED

router = APIRouter(prefix="/jobs", tags=["jobs"], responses=RESOURCE_ERRORS)


def _check_range(range_header: str, size: int) -> None:
    # Starlette answers a bad range in plain text; ours must have the contract's error shape.
    try:
        FileResponse._parse_range_header(range_header, size)
    except MalformedRangeHeader as error:
        raise APIError(400, "invalid_range", str(error.content), param="Range") from None
    except RangeNotSatisfiable:
        raise APIError(
            416,
            "range_not_satisfiable",
            f"the artifact has {size} bytes",
            param="Range",
            headers={"Content-Range": f"bytes */{size}"},
        ) from None


@router.get(
    "/{job_id}/artifact",
    response_class=FileResponse,
    responses={
        200: {"content": {"application/gzip": {}}},
        206: {"description": "A range.", "content": {"application/gzip": {}}},
        **documented(400, 409, 416),
    },
)
def download_artifact(
    job: JobSnapshotDep, range_header: Annotated[str | None, Header(alias="Range")] = None
) -> FileResponse:
    """Download the trained model as a tar.gz (supports `Range`)."""
    if job.dry_run:
        raise APIError(
            409,
            "no_artifact",
            "the job is a dry run: it trained nothing, so it has no artifact",
            param="id",
        )
    if job.status != SUCCEEDED or not job.artifact_sha256:
        raise APIError(
            409,
            "artifact_not_ready",
            f"the job is {job.status}; the artifact exists once it has succeeded",
            param="id",
        )
    key = storage.artifact_key(job.id)
    if range_header:
        _check_range(range_header, storage.size(key))
    return FileResponse(
        storage.path(key),
        media_type="application/gzip",
        filename=f"{job.id}.tar.gz",
        headers={"ETag": f'"{job.artifact_sha256}"', "Accept-Ranges": "bytes"},
    )
