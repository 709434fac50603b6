"""Liveness, readiness and Prometheus metrics."""

import time

import psycopg
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, make_url, text

from api.job_reads import APPLICATION_NAME
from shared import jobs as job_states
from shared.settings import get_settings
from tests import servers
from tests.rows import queued_job


def app_with(monkeypatch: pytest.MonkeyPatch, **environment: str) -> TestClient:
    from api.main import create_app
    from shared.queue import celery_app

    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    celery_app.cache_clear()
    return TestClient(create_app(), raise_server_exceptions=False)


class TestHealthz:
    def test_up(self, client):
        assert client.get("/healthz").json() == {"status": "ok"}


class TestReadyz:
    def test_ready(self, client):
        response = client.get("/readyz")
        assert response.status_code == 200 and response.json() == {"status": "ready", "workers": 0}

    def test_counts_the_workers_that_beat_within_the_heartbeat_timeout(
        self, client, settings, beating
    ):
        beating("gpu-host-1-100")
        beating("gpu-host-2-200", seconds_ago=settings.heartbeat_timeout_s + 1)  # silent
        assert client.get("/readyz").json() == {"status": "ready", "workers": 1}

    def test_database_unreachable(self, settings, monkeypatch):
        client = app_with(
            monkeypatch,
            TUNERY_DATABASE_URL="postgresql+psycopg://postgres@127.0.0.1:1/none",
        )
        response = client.get("/readyz")
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "database_unavailable"

    def test_broker_unreachable(self, settings, monkeypatch):
        client = app_with(monkeypatch, TUNERY_BROKER_URL="redis://127.0.0.1:1/0")
        response = client.get("/readyz")
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "broker_unavailable"

    def test_resource_routes_answer_503_while_the_database_is_away(self, settings, monkeypatch):
        client = app_with(
            monkeypatch,
            TUNERY_DATABASE_URL="postgresql+psycopg://postgres@127.0.0.1:1/none",
        )
        response = client.get("/jobs", headers={"Authorization": "Bearer tny_x_y"})
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "database_unavailable"

    def test_a_polled_job_answers_503_while_the_database_is_away(
        self, settings, monkeypatch, auth_headers
    ):
        # The key is remembered from a request made while the database was up, so the job
        # read itself (`api/job_reads.py`, its own pool on PostgreSQL) meets the outage.
        with app_with(monkeypatch) as client:
            assert client.get("/jobs/job_x", headers=auth_headers).status_code == 404
        away = "postgresql+psycopg://postgres@127.0.0.1:1/none"
        with app_with(monkeypatch, TUNERY_DATABASE_URL=away) as client:
            started = time.monotonic()
            response = client.get("/jobs/job_x", headers=auth_headers)
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "database_unavailable"
        assert time.monotonic() - started < 10  # no hang


class TestMetrics:
    def test_prometheus_text_counts_requests_by_route(self, client, auth_headers):
        client.get("/jobs/job_x", headers=auth_headers)
        text = client.get("/metrics", headers=auth_headers).text
        assert "# TYPE tunery_http_requests_total counter" in text
        assert 'route="/jobs/{job_id}"' in text and 'status="404"' in text

    def test_jobs_by_status_and_each_workers_last_heartbeat(self, client, auth_headers, beating):
        def gauges() -> dict[str, float]:
            text = client.get("/metrics", headers=auth_headers).text
            return {
                line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith(("tunery_jobs{", "tunery_worker_last_heartbeat"))
            }

        before = gauges()
        queued_job()
        beating("gpu-host-1-100", seconds_ago=5)
        after = gauges()

        assert set(before) >= {f'tunery_jobs{{status="{s}"}}' for s in job_states.STATUSES}
        queued = 'tunery_jobs{status="queued"}'
        assert after[queued] == before[queued] + 1
        heartbeat = after['tunery_worker_last_heartbeat_timestamp_seconds{worker="gpu-host-1-100"}']
        assert time.time() - heartbeat == pytest.approx(5, abs=2)

    def test_metrics_need_a_key_like_every_route_but_health_and_docs(self, client):
        response = client.get("/metrics")
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"
        assert client.get("/docs").status_code == 200
        assert client.get("/openapi.json").status_code == 200
        for undocumented in ("/redoc", "/docs/oauth2-redirect"):
            assert client.get(undocumented).status_code == 404


class TestJobReadsAfterAServerRestart:
    def test_a_job_read_survives_its_pooled_connections_being_cut(
        self, client, auth_headers, database_url
    ):
        if not database_url.startswith("postgresql"):
            pytest.skip("SQLite has no server connections to cut")
        assert client.get("/jobs/job_x", headers=auth_headers).status_code == 404
        # As a PostgreSQL restart does to every pooled connection of the job reads.
        with psycopg.connect(
            make_url(database_url)
            .set(drivername="postgresql")
            .render_as_string(hide_password=False),
            autocommit=True,
        ) as admin:
            cut = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = %s AND datname = current_database()",
                [APPLICATION_NAME],
            ).fetchone()
        assert cut is not None and cut[0] >= 1
        # The first read meets a dead connection; the reader tests the pool and reads again.
        response = client.get("/jobs/job_x", headers=auth_headers)
        assert response.status_code == 404, response.text
        assert response.json()["error"]["code"] == "not_found"

    def test_a_read_as_the_server_comes_back_does_not_wait_for_the_pools_retries(
        self, client, auth_headers, database_url, monkeypatch
    ):
        if not database_url.startswith("postgresql"):
            pytest.skip("SQLite has no server to come back")
        assert client.get("/jobs/job_x", headers=auth_headers).status_code == 404  # key known
        name = make_url(database_url).database
        admin = create_engine(servers.postgres().admin_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            connection.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false'))
        try:
            # An app whose pool meets a server that refuses it, as during an outage: a read
            # answers 503, and the pool's next attempts come 1, 2, 4... s apart.
            with app_with(monkeypatch) as fresh:
                assert fresh.get("/jobs/job_x", headers=auth_headers).status_code == 503
                time.sleep(0.5)  # past the retry 1 s in: the next one is ~2 s later
                with admin.connect() as connection:
                    connection.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
                response = fresh.get("/jobs/job_x", headers=auth_headers)
        finally:
            with admin.connect() as connection:
                connection.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
            admin.dispose()
        assert response.status_code == 404, response.text
        assert response.json()["error"]["code"] == "not_found"
