"""A job created through the API reaches a real Celery worker process, over Redis and over the
local filesystem queue, and the worker claims it."""

from pathlib import Path

from shared.jobs import UNFINISHED
from tests.conftest import TINY_MODEL
from tests.e2e.client import TuneryClient
from tests.processes import make_key, running_api, running_worker, tunery_environment
from tests.seed_data import TECH_NEWS


def claim_through_the_queue(environment: dict[str, str], tmp_path: Path) -> None:
    token = make_key(environment)
    with running_api(environment, tmp_path / "api.log") as base_url:
        client = TuneryClient(base_url, token)
        dataset = client.upload(TECH_NEWS.encode())
        job = client.create_job(
            base_model=TINY_MODEL,
            dataset_id=dataset["id"],
            validation_split=0.0,
            hyperparameters={"block_size": 16, "batch_size": 2, "max_steps": 2},
        )
        assert job["status"] == "queued"
        # The message is sent before any worker exists: the queue must hold it.
        worker_log = tmp_path / "worker.log"
        with running_worker(environment, worker_log) as worker:
            claimed = client.wait(
                job["id"], statuses=frozenset({"running", "succeeded", "failed", "cancelled"})
            )
            assert claimed["attempt"] == 1, claimed
            assert claimed["started_at"] is not None
            finished = client.wait(job["id"])
        assert worker.returncode == 0  # stopped, not failed
        assert "Warm shutdown" in worker_log.read_text()  # its log written out before it exits
        messages = [event["message"] for event in client.events(job["id"])]
        assert "job claimed by a worker" in messages
        assert finished["status"] not in UNFINISHED


class TestQueue:
    def test_over_redis_with_postgresql(self, postgres_url, redis_url, models_dir, home, tmp_path):
        environment = tunery_environment(
            home=str(home),
            database_url=postgres_url,
            broker_url=redis_url,
            models_dir=str(models_dir),
        )
        claim_through_the_queue(environment, tmp_path)

    def test_over_the_local_queue_with_sqlite(self, models_dir, home, tmp_path):
        environment = tunery_environment(home=str(home), models_dir=str(models_dir))
        claim_through_the_queue(environment, tmp_path)
