import pytest
from fastapi.testclient import TestClient

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
