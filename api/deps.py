"""Request dependencies: a database session, the caller's project, and load-or-404 lookups."""

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Path
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from api.errors import APIError, not_found
from shared.db import new_session
from shared.keys import authenticate
from shared.models import Dataset, Job


def get_db() -> Iterator[Session]:
    with new_session() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_db)]

_bearer = HTTPBearer(auto_error=False, description="An API key from `tunery keys create`.")


@dataclass(frozen=True)
class Principal:
    project_id: str
    key_id: str


def get_principal(
    session: SessionDep,
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
    key = authenticate(session, credentials.credentials)
    if key is None:
        raise APIError(401, "invalid_api_key", "the API key is not valid", headers=challenge)
    return Principal(project_id=key.project_id, key_id=key.id)


PrincipalDep = Annotated[Principal, Depends(get_principal)]


def owned_dataset(session: Session, principal: Principal, dataset_id: str) -> Dataset | None:
    dataset = session.get(Dataset, dataset_id)
    if dataset is None or dataset.deleted_at is not None:
        return None
    return dataset if dataset.project_id == principal.project_id else None


def get_dataset(
    session: SessionDep, principal: PrincipalDep, dataset_id: Annotated[str, Path(max_length=64)]
) -> Dataset:
    dataset = owned_dataset(session, principal, dataset_id)
    if dataset is None:
        raise not_found("dataset", dataset_id)
    return dataset


def get_job(
    session: SessionDep, principal: PrincipalDep, job_id: Annotated[str, Path(max_length=64)]
) -> Job:
    job = session.get(Job, job_id)
    if job is None or job.project_id != principal.project_id:
        raise not_found("job", job_id)
    return job


DatasetDep = Annotated[Dataset, Depends(get_dataset)]
JobDep = Annotated[Job, Depends(get_job)]
