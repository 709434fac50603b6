"""Files in storage that nothing will read again, left by a process that died at the wrong moment.

A writer killed mid-write leaves its temporary file (a dataset upload, a model tarball). A process
killed between a row's change and the removal of its files leaves the file of a deleted dataset,
the tarball of a job that did not succeed, or the checkpoints of a job that has ended. Rows decide
what is garbage: a file that no row names is left alone, because it may belong to another
deployment that shares the volume.
"""

from collections.abc import Iterable, Iterator

from sqlalchemy import select

from shared import checkpoints, jobs, storage
from shared.db import read_session
from shared.models import Dataset, Job

# Uploads and packaging write continuously: a temporary file untouched for a day has no writer.
_TEMPORARY_MAX_AGE_S = 24 * 3600.0
_QUERY_BATCH = 500


def remove() -> list[str]:
    """Delete the leftovers; returns their storage keys."""
    keys = storage.temporary_files(older_than_s=_TEMPORARY_MAX_AGE_S)
    keys += [storage.dataset_key(i) for i in _deleted_datasets(storage.stored_dataset_ids())]
    with_artifact = storage.jobs_with_an_artifact()
    with_checkpoints = storage.jobs_with_checkpoints()
    ended = _ended_jobs({*with_artifact, *with_checkpoints})
    unsucceeded = (jobs.FAILED, jobs.CANCELLED)
    keys += [storage.artifact_key(j) for j in with_artifact if ended.get(j) in unsucceeded]
    keys += [storage.checkpoints_key(j) for j in with_checkpoints if j in ended]
    for key in keys:
        storage.delete(key)
    return keys


def remove_unsucceeded(job_id: str) -> None:
    """The files of a job that has just ended without success: its checkpoints, and a tarball
    whose upload finished before a cancel was read."""
    checkpoints.delete_all(job_id)
    storage.delete(storage.artifact_key(job_id))


def _batches(ids: Iterable[str]) -> Iterator[list[str]]:
    ordered = sorted(ids)
    for start in range(0, len(ordered), _QUERY_BATCH):
        yield ordered[start : start + _QUERY_BATCH]


def _deleted_datasets(dataset_ids: Iterable[str]) -> list[str]:
    deleted = []
    with read_session() as session:
        for batch in _batches(dataset_ids):
            deleted += session.scalars(
                select(Dataset.id).where(Dataset.id.in_(batch), Dataset.deleted_at.is_not(None))
            )
    return deleted


def _ended_jobs(job_ids: Iterable[str]) -> dict[str, str]:
    """The status of each of these jobs that has ended."""
    ended: dict[str, str] = {}
    with read_session() as session:
        for batch in _batches(job_ids):
            rows = session.execute(
                select(Job.id, Job.status).where(Job.id.in_(batch), Job.status.in_(jobs.FINISHED))
            )
            ended.update({row.id: row.status for row in rows})
    return ended
