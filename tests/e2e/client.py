"""A small HTTP client for the end-to-end tests, the way another service would call Tunery."""

import time
from typing import Any

import httpx

from shared.jobs import FINISHED


class TuneryClient:
    def __init__(self, base_url: str, token: str) -> None:
        self.http = httpx.Client(
            base_url=base_url, headers={"Authorization": f"Bearer {token}"}, timeout=30
        )

    def upload(self, content: bytes, filename: str = "my_dataset.txt") -> dict[str, Any]:
        response = self.http.post("/datasets", files={"file": (filename, content)})
        assert response.status_code == 201, response.text
        return response.json()

    def create_job(self, **body: Any) -> dict[str, Any]:
        response = self.http.post("/jobs", json=body)
        assert response.status_code == 201, response.text
        return response.json()

    def job(self, job_id: str) -> dict[str, Any]:
        response = self.http.get(f"/jobs/{job_id}")
        assert response.status_code == 200, response.text
        return response.json()

    def events(self, job_id: str) -> list[dict[str, Any]]:
        return self.http.get(f"/jobs/{job_id}/events?limit=100").json()["data"]

    def wait(self, job_id: str, statuses: frozenset[str] = FINISHED, timeout: float = 240) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if job["status"] in statuses:
                return job
            time.sleep(0.3)
        raise TimeoutError(f"job {job_id} still {job['status']}: {self.events(job_id)}")
