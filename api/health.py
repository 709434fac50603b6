"""Operations: liveness, readiness and Prometheus metrics."""

import time

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from sqlalchemy import text
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.deps import PrincipalDep
from api.errors import documented, error_response
from shared.db import get_engine
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
def readyz() -> dict[str, str] | Response:
    """The database and the broker are reachable."""
    try:
        with get_engine().connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception:
        return error_response(503, "database_unavailable", "the database is unreachable")
    if not broker_reachable():
        return error_response(503, "broker_unavailable", "the message broker is unreachable")
    return {"status": "ready"}


@router.get("/metrics", include_in_schema=False)
def metrics(_: PrincipalDep) -> Response:
    """Prometheus text format; any API key may read it."""
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


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
