"""Request dependencies: a database session, the caller's project, and load-or-404 lookups."""

import hashlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from api.errors import APIError, not_found
from shared.db import new_session, read_session
from shared.keys import authenticate
from shared.models import Dataset, Job


async def get_db() -> AsyncIterator[Session]:
    """A session for the request. Making one does no I/O, so it is made on the event loop;
    closing one that used a connection (a rollback, a return to the pool) runs in a thread."""
    session = new_session()
    try:
        yield session
    finally:
        if session.in_transaction():
            await run_in_threadpool(session.close)
        else:
            session.close()


SessionDep = Annotated[Session, Depends(get_db)]

_bearer = HTTPBearer(auto_error=False, description="An API key from `tunery keys create`.")


@dataclass(frozen=True)
class Principal:
    project_id: str
    key_id: str


# Keys verified in the last few seconds, by the sha256 of the whole token: a client polling a
# job would otherwise pay a database lookup for its key on every request. Keys are never
# changed in place, so the only staleness is a deleted key working for VERIFIED_TTL_S more.
VERIFIED_TTL_S = 30.0
_VERIFIED_MAX = 10_000
_verified: dict[str, tuple[Principal, float]] = {}


def _remembered(token_digest: str) -> Principal | None:
    entry = _verified.get(token_digest)
    if entry is None or entry[1] < time.monotonic():
        return None
    return entry[0]


def _remember(token_digest: str, principal: Principal) -> None:
    if len(_verified) >= _VERIFIED_MAX:
        _verified.clear()
    _verified[token_digest] = (principal, time.monotonic() + VERIFIED_TTL_S)


def _verify(token: str) -> Principal | None:
    # A session of its own rather than the request's: a route that needs no session of its
    # own (a polled GET) then makes none, and the key lookup opens no transaction.
    with read_session() as session:
        key = authenticate(session, token)
    return Principal(project_id=key.project_id, key_id=key.id) if key else None


async def get_principal(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    challenge = {"WWW-Authenticate": "Bearer"}
    if credentials is None:
        raise APIError(
            401,
            "missing_api_key",
            "send an API key as `Authorization: Bearer <key>`",
            headers=challenge,
        )
    token_digest = hashlib.sha256(credentials.credentials.encode()).hexdigest()
    if principal := _remembered(token_digest):
        return principal
    principal = await run_in_threadpool(_verify, credentials.credentials)
    if principal is None:
        raise APIError(401, "invalid_api_key", "the API key is not valid", headers=challenge)
    _remember(token_digest, principal)
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]


def owned_dataset(session: Session, principal: Principal, dataset_id: str) -> Dataset | None:
    dataset = session.get(Dataset, dataset_id)
    if dataset is None or dataset.deleted_at is not None:
        return None
    return dataset if dataset.project_id == principal.project_id else None


def get_dataset(session: SessionDep, principal: PrincipalDep, dataset_id: str) -> Dataset:
    dataset = owned_dataset(session, principal, dataset_id)
    if dataset is None:
        raise not_found("dataset", dataset_id)
    return dataset


def read_dataset(principal: PrincipalDep, dataset_id: str) -> Dataset:
    """The dataset as it is now, for a route that only shows it or streams its file: read with
    no transaction, so that none stays open while a slow client downloads."""
    with read_session() as session:
        return get_dataset(session, principal, dataset_id)


def get_job(session: SessionDep, principal: PrincipalDep, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None or job.project_id != principal.project_id:
        raise not_found("job", job_id)
    return job


async def read_job(request: Request, principal: PrincipalDep, job_id: str) -> Any:
    """The job as it is now, for a route that only shows it (`api/job_reads.py`): a row with
    a `Job`'s attribute names, not a `Job`."""
    job = await request.app.state.job_reader.get(job_id)
    if job is None or job.project_id != principal.project_id:
        raise not_found("job", job_id)
    return job


DatasetDep = Annotated[Dataset, Depends(get_dataset)]
JobDep = Annotated[Job, Depends(get_job)]
# Read-only rows, read with no transaction: show them, never change them.
DatasetSnapshotDep = Annotated[Dataset, Depends(read_dataset)]
JobSnapshotDep = Annotated[Any, Depends(read_job)]  # a row with a `Job`'s attribute names
