"""Every resource route needs a key, and a key sees only its own project."""

import pytest
from fastapi.testclient import TestClient

from tests.conftest import TINY_MODEL

ROUTES = [
    ("GET", "/datasets"),
    ("POST", "/datasets"),
    ("GET", "/datasets/{dataset_id}"),
    ("GET", "/datasets/{dataset_id}/content"),
    ("DELETE", "/datasets/{dataset_id}"),
    ("GET", "/jobs"),
    ("POST", "/jobs"),
    ("GET", "/jobs/{job_id}"),
    ("POST", "/jobs/{job_id}/cancel"),
    ("GET", "/jobs/{job_id}/events"),
    ("GET", "/jobs/{job_id}/metrics"),
    ("GET", "/jobs/{job_id}/checkpoints"),
    ("GET", "/jobs/{job_id}/artifact"),
]
OWNED_ROUTES = [(method, path) for method, path in ROUTES if "{" in path]


@pytest.fixture
def resources(client: TestClient, auth_headers: dict[str, str]) -> dict[str, str]:
    from tests.api.conftest import upload

    dataset_id = upload(client, auth_headers)
    job = client.post(
        "/jobs", headers=auth_headers, json={"base_model": TINY_MODEL, "dataset_id": dataset_id}
    )
    return {"dataset_id": dataset_id, "job_id": job.json()["id"]}


def call(client: TestClient, method: str, path: str, headers: dict[str, str]):
    return client.request(method, path, headers=headers)


class TestAuthentication:
    @pytest.mark.parametrize(("method", "path"), ROUTES)
    def test_no_key(self, client, resources, method, path):
        response = call(client, method, path.format(**resources), {})
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"
        assert response.json()["error"]["code"] == "missing_api_key"
        assert response.headers["WWW-Authenticate"] == "Bearer"

    @pytest.mark.parametrize(
        "token",
        ["wrong", "tny_0000000000000000000000000_secret", "tny__", "Basic abc"],
    )
    @pytest.mark.parametrize(("method", "path"), ROUTES)
    def test_wrong_key(self, client, resources, auth_headers, method, path, token):
        good = auth_headers["Authorization"].removeprefix("Bearer ")
        for bad in (token, good[:-1] + ("A" if good[-1] != "A" else "B")):
            response = call(
                client, method, path.format(**resources), {"Authorization": f"Bearer {bad}"}
            )
            assert response.status_code == 401, bad
            assert response.json()["error"]["code"] == "invalid_api_key"


class TestIsolation:
    @pytest.mark.parametrize(("method", "path"), OWNED_ROUTES)
    def test_other_projects_ids_answer_404_like_missing_ones(
        self, client, resources, other_auth_headers, method, path
    ):
        foreign = call(client, method, path.format(**resources), other_auth_headers)
        missing = call(
            client,
            method,
            path.format(dataset_id="ds_00000000000000000000000000", job_id="job_0000000000"),
            other_auth_headers,
        )
        assert foreign.status_code == missing.status_code == 404
        assert foreign.json()["error"]["code"] == missing.json()["error"]["code"] == "not_found"
        assert foreign.json()["error"]["type"] == "not_found_error"

    @pytest.mark.parametrize(("method", "path"), OWNED_ROUTES)
    def test_an_id_longer_than_any_issued_answers_404_like_a_missing_one(
        self, client, auth_headers, method, path
    ):
        too_long = {"dataset_id": "ds_" + "7" * 2000, "job_id": "job_" + "7" * 2000}
        response = call(client, method, path.format(**too_long), auth_headers)
        assert response.status_code == 404, response.text
        error = response.json()["error"]
        assert (error["type"], error["code"], error["param"]) == (
            "not_found_error",
            "not_found",
            "id",
        )
        assert len(error["message"]) < 120  # names the id without echoing all of it

    def test_the_owner_still_sees_them(self, client, resources, auth_headers):
        for method, path in OWNED_ROUTES:
            if method == "GET":
                response = call(client, method, path.format(**resources), auth_headers)
                # A queued job has no artifact yet: 409, not the 404 a stranger gets.
                expected = 409 if path.endswith("/artifact") else 200
                assert response.status_code == expected, (path, response.text)
