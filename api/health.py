"""Operations: liveness, readiness and Prometheus metrics."""

import time

from fastapi import APIRouter, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from sqlalchemy import func, select
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.deps import PrincipalDep
from api.errors import documented, error_response
from shared import jobs as job_states
from shared import workers
from shared.db import read_session
from shared.models import Job
from shared.queue import broker_reachable

router = APIRouter(tags=["operations"])

REQUESTS = Counter(
    "tunery_http_requests_total", "HTTP requests answered.", ["method", "route", "status"]
)
LATENCY = Histogram(
    "tunery_http_request_duration_seconds", "Time to answer an HTTP request.", ["method", "route"]
)


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz", response_model=None, responses=documented(503))
def readyz() -> dict[str, str | int] | Response:
    """The database and the broker are reachable; `workers` says how many workers are alive
    (with none, jobs wait in the queue)."""
    try:
        with read_session() as session:
            alive = workers.alive(session)
    except Exception:
        return error_response(503, "database_unavailable", "the database is unreachable")
    if not broker_reachable():
        return error_response(503, "broker_unavailable", "the message broker is unreachable")
    return {"status": "ready", "workers": alive}


@router.get("/metrics", include_in_schema=False)
def metrics(_: PrincipalDep) -> Response:
    """Prometheus text format; any API key may read it. Besides this process's requests: the
    jobs in each status, and each worker's last heartbeat, read from the database now, so an
    operator can alert on a queue that grows or a worker that went silent."""
    return Response(
        generate_latest() + generate_latest(_service_state()), media_type=CONTENT_TYPE_LATEST
    )


def _service_state() -> CollectorRegistry:
    registry = CollectorRegistry()
    jobs = Gauge("tunery_jobs", "Jobs by status.", ["status"], registry=registry)
    heartbeats = Gauge(
        "tunery_worker_last_heartbeat_timestamp_seconds",
        "When each worker last beat (Unix time); a worker that stops cleanly is removed.",
        ["worker"],
        registry=registry,
    )
    with read_session() as session:
        counted = {
            status: count
            for status, count in session.execute(
                select(Job.status, func.count()).group_by(Job.status)
            )
        }
        beats = workers.last_heartbeats(session)
    for status in job_states.STATUSES:
        jobs.labels(status).set(counted.get(status, 0))
    for worker, heartbeat_at in beats.items():
        heartbeats.labels(worker).set(heartbeat_at.timestamp())
    return registry


class RequestMetrics:
    """Counts and times requests by route template (not raw path, which would explode labels)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            route = _route_template(scope)
            REQUESTS.labels(scope["method"], route, str(status)).inc()
            LATENCY.labels(scope["method"], route).observe(time.perf_counter() - started)


def _route_template(scope: Scope) -> str:
    route = scope.get("route")  # set by the router once a route matched
    return getattr(route, "path", "unmatched")
