from collections.abc import Callable, Iterator
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import delete, update

from shared import workers
from shared.db import session_scope
from shared.models import Worker, utcnow
from tests.seed_data import TECH_NEWS


def upload(client: TestClient, headers: dict[str, str], content: str = TECH_NEWS) -> str:
    response = client.post(
        "/datasets", headers=headers, files={"file": ("my_dataset.txt", content.encode())}
    )
    assert response.status_code == 201, response.text
    return response.json()["id"]


@pytest.fixture
def dataset_id(client: TestClient, auth_headers: dict[str, str]) -> str:
    return upload(client, auth_headers)


@pytest.fixture
def beating() -> Iterator[Callable[..., None]]:
    """Record workers' heartbeats, as their sweepers do; the rows are removed afterwards."""
    names: list[str] = []

    def beat(name: str, seconds_ago: float = 0.0) -> None:
        names.append(name)
        with session_scope() as session:
            workers.beat(session, name)
            at = utcnow() - timedelta(seconds=seconds_ago)
            session.execute(update(Worker).where(Worker.name == name).values(heartbeat_at=at))

    yield beat
    with session_scope() as session:
        session.execute(delete(Worker).where(Worker.name.in_(names)))
