"""Redis restarted and flushed, PostgreSQL restarted: the database is the truth, so queued jobs
are sent again and a running job rides out the outage.

Both servers are the test session's own (`tests.servers`); each is started again in a
`finally`, whatever happens.
"""

import time
from pathlib import Path

import redis

from tests import servers
from tests.chaos.conftest import Stack, figures, now


class TestRedisLost:
    def test_redis_restarted_and_flushed_with_three_jobs_queued_all_succeed(
        self, stack: Stack
    ) -> None:
        job_ids = [stack.create_job(max_steps=10) for _ in range(3)]
        server = servers.redis_server()
        try:
            redis.Redis.from_url(server.url).flushall()
            server.stop()
        finally:
            if not server.up():
                server.start()
        restarted = now()
        worker = stack.start_worker("worker")
        finished = [stack.client.wait(job_id, timeout=180) for job_id in job_ids]
        recovered_s = now() - restarted
        assert [job["status"] for job in finished] == ["succeeded"] * 3
        for job_id in job_ids:
            assert any("its message was sent again" in m for m in stack.messages(job_id))
        assert worker.poll() is None
        figures(
            "c.redis_restarted_and_flushed",
            jobs=3,
            seconds_until_all_succeeded=round(recovered_s, 2),
        )


class TestPostgresRestarted:
    def test_postgres_down_mid_training_api_answers_503_and_the_job_succeeds(
        self, stack: Stack, tmp_path: Path
    ) -> None:
        # A lease far longer than the outage: the job must ride it out, not move.
        worker = stack.start_worker("worker", heartbeat_timeout_s="60")
        stack.wait_ready("worker", worker)
        job_id = stack.create_job()
        stopped_at = stack.wait_step(job_id, 10)
        stack.engine.dispose()
        answers = []
        server = servers.postgres()
        try:
            server.stop()
            down = now()
            started = time.monotonic()
            response = stack.client.http.get(f"/jobs/{job_id}", timeout=15)
            answers.append((response.status_code, time.monotonic() - started))
            assert response.status_code == 503, response.text
            assert response.json()["error"]["type"] == "server_error"
            time.sleep(3)  # past a heartbeat and a metrics write of the worker
        finally:
            if not server.up():
                server.start()
        outage_s = now() - down
        finished = stack.client.wait(job_id, timeout=240)
        assert finished["status"] == "succeeded", stack.messages(job_id)
        assert finished["attempt"] == 1 and finished["resumed_from_step"] is None
        assert answers[0][1] < 10  # 503 at once, no hang
        figures(
            "d.postgres_restarted",
            step_at_outage=stopped_at,
            outage_seconds=round(outage_s, 2),
            api_503_after_seconds=round(answers[0][1], 2),
            attempt=finished["attempt"],
            step_resumed_from=None,
        )
