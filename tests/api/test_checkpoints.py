"""GET /jobs/{id}/checkpoints: the complete checkpoints in storage, newest first, on SQLite and
PostgreSQL. Checkpoints are written with the same code the worker uses."""

from pathlib import Path

from fastapi.testclient import TestClient

from shared import checkpoints, storage
from tests.api.test_jobs import assert_error, claim, create


def write_checkpoint(job_id: str, step: int, folder: Path) -> None:
    source = folder / f"source-{step}"
    source.mkdir(parents=True)
    (source / "trainer_state.json").write_text(f'{{"global_step": {step}}}')
    (source / "optimizer.pt").write_bytes(b"\x01" * 100)
    metrics = {"train_loss": 2.0 - step / 100, "learning_rate": 1e-4, "epoch": step / 10}
    checkpoints.write(job_id, step, source, {"metrics": metrics, "loss_sum": 0.0})


def new_job(client: TestClient, headers: dict[str, str], dataset_id: str) -> str:
    response = create(client, headers, dataset_id=dataset_id)
    assert response.status_code == 201, response.text
    return response.json()["id"]


class TestListCheckpoints:
    def test_a_new_job_has_none(self, client, auth_headers, dataset_id):
        job_id = new_job(client, auth_headers, dataset_id)
        response = client.get(f"/jobs/{job_id}/checkpoints", headers=auth_headers)
        assert response.status_code == 200
        assert response.json() == {"object": "list", "data": [], "has_more": False}

    def test_complete_ones_newest_first_and_broken_ones_left_out(
        self, client, auth_headers, dataset_id, tmp_path
    ):
        job_id = new_job(client, auth_headers, dataset_id)
        for step in (10, 30, 20):
            write_checkpoint(job_id, step, tmp_path)
        # A writer killed mid-copy: only its hidden temporary folder exists.
        root = storage.path(storage.checkpoints_key(job_id))
        (root / ".step-000000040.abc.partial").mkdir()
        # A folder that claims to be step 50 but lost a file.
        write_checkpoint(job_id, 50, tmp_path)
        (root / "step-000000050" / "optimizer.pt").unlink()

        response = client.get(f"/jobs/{job_id}/checkpoints", headers=auth_headers)
        assert response.status_code == 200
        body = response.json()
        assert body["object"] == "list" and body["has_more"] is False
        assert [c["step"] for c in body["data"]] == [30, 20, 10]
        newest = body["data"][0]
        assert set(newest) == {"object", "step", "created_at", "metrics"}
        assert newest["object"] == "job.checkpoint"
        assert newest["created_at"].endswith("Z")
        assert newest["metrics"] == {"train_loss": 1.7, "learning_rate": 1e-4, "epoch": 3.0}

    def test_pruning_keeps_the_newest_two(self, client, auth_headers, dataset_id, tmp_path):
        job_id = new_job(client, auth_headers, dataset_id)
        for step in (1, 2, 3):
            write_checkpoint(job_id, step, tmp_path)
        checkpoints.prune(job_id)
        response = client.get(f"/jobs/{job_id}/checkpoints", headers=auth_headers)
        assert [c["step"] for c in response.json()["data"]] == [3, 2]

    def test_cancelling_a_queued_job_deletes_its_checkpoints(
        self, client, auth_headers, dataset_id, tmp_path
    ):
        job_id = new_job(client, auth_headers, dataset_id)
        write_checkpoint(job_id, 5, tmp_path)  # as if a worker had handed it back
        assert client.post(f"/jobs/{job_id}/cancel", headers=auth_headers).status_code == 200
        response = client.get(f"/jobs/{job_id}/checkpoints", headers=auth_headers)
        assert response.json()["data"] == []

    def test_someone_elses_job_is_404(
        self, client, auth_headers, other_auth_headers, dataset_id, tmp_path
    ):
        job_id = new_job(client, auth_headers, dataset_id)
        claim(job_id)
        write_checkpoint(job_id, 5, tmp_path)
        response = client.get(f"/jobs/{job_id}/checkpoints", headers=other_auth_headers)
        assert_error(response, 404, "not_found")
        assert_error(
            client.get("/jobs/job_nope/checkpoints", headers=auth_headers), 404, "not_found"
        )
