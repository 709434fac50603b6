"""Every error response has the contract's shape: {"error": {type, code, message, param, ...}}."""

import logging
from typing import Any

import psycopg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import InterfaceError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared.schemas import ErrorRead

logger = logging.getLogger(__name__)


def documented(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for error statuses, all with the contract's shape (FastAPI's own 422
    schema is replaced, since our handler answers validation errors in this shape too)."""
    return {status: {"model": ErrorRead, "description": "An error."} for status in statuses}


RESOURCE_ERRORS = documented(400, 401, 404, 422, 503)

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    416: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        param: str | None = None,
        details: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.details = details or {}
        self.headers = headers


def not_found(kind: str, object_id: str) -> APIError:
    # Any string is an id that may not exist; one far longer than ours is only shown in part.
    shown = object_id if len(object_id) <= 64 else f"{object_id[:64]}..."
    return APIError(404, "not_found", f"no {kind} with id {shown!r}", param="id")


def error_response(
    status: int,
    code: str,
    message: str,
    *,
    param: str | None = None,
    details: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {
        "error": {
            "type": _TYPE_BY_STATUS.get(status, "server_error"),
            "code": code,
            "message": message,
            "param": param,
            "details": details or {},
        }
    }
    return JSONResponse(body, status_code=status, headers=headers)


def _param_from_location(location: tuple[Any, ...]) -> str | None:
    # ("body", "hyperparameters", "epochs") -> "hyperparameters.epochs"
    # Union branches add tags such as "constrained-float" or "literal['auto']": not fields.
    parts = [
        str(part)
        for part in location
        if part not in ("body", "query", "path", "header")
        and (isinstance(part, int) or str(part).isidentifier())
    ]
    return ".".join(parts) or None


async def _api_error(_request: Request, error: APIError) -> JSONResponse:
    return error_response(
        error.status,
        error.code,
        error.message,
        param=error.param,
        details=error.details,
        headers=error.headers,
    )


async def _validation_error(_request: Request, error: RequestValidationError) -> JSONResponse:
    first = error.errors()[0]
    param = _param_from_location(tuple(first.get("loc", ())))
    message = first.get("msg", "invalid request")
    if first.get("type") == "extra_forbidden":
        message = "unknown field"
    elif first.get("type") == "json_invalid":
        # Its location is a character offset, not a field the caller could name.
        message, param = f"the body is not valid JSON (at character {param})", None
    problems = [
        {"param": _param_from_location(tuple(e.get("loc", ()))), "message": e.get("msg")}
        for e in error.errors()
    ]
    return error_response(
        422,
        "invalid_request",
        f"{param}: {message}" if param else message,
        param=param,
        details={"errors": problems},
    )


async def _http_error(_request: Request, error: StarletteHTTPException) -> JSONResponse:
    codes = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed"}
    message = "no such route" if error.status_code == 404 else str(error.detail)
    return error_response(
        error.status_code,
        codes.get(error.status_code, "http_error"),
        message,
        headers=getattr(error, "headers", None),
    )


async def _database_unavailable(_request: Request, error: Exception) -> JSONResponse:
    logger.warning("database unavailable: %s", error)
    return error_response(
        503,
        "database_unavailable",
        "the database is unavailable; retry shortly",
        headers={"Retry-After": "5"},
    )


async def _unexpected(_request: Request, error: Exception) -> JSONResponse:
    logger.exception("unhandled error", exc_info=error)
    return error_response(500, "internal_error", "an internal error occurred")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(OperationalError, _database_unavailable)
    app.add_exception_handler(InterfaceError, _database_unavailable)
    # The job reads talk to psycopg directly (`api/job_reads.py`); a pool timeout is one too.
    app.add_exception_handler(psycopg.OperationalError, _database_unavailable)
    app.add_exception_handler(psycopg.InterfaceError, _database_unavailable)
    app.add_exception_handler(Exception, _unexpected)
