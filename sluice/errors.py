"""The one JSON error shape of every Sluice API, and FastAPI handlers that produce it.

``{"error": {"code": "...", "message": "...", "details": {...}}}`` with the right
HTTP status. Validation errors, unknown routes and unexpected exceptions all come out
in this shape; a traceback never reaches a client; a 405 names every allowed method in
``Allow``. ``error_responses`` documents these answers in an operation's OpenAPI
(``ErrorBody``), so the document says which errors each operation gives, in which shape.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.routing import Match

log = logging.getLogger(__name__)

_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid",
    429: "too_many_requests",
    500: "internal",
    502: "bad_gateway",
    503: "unavailable",
    504: "timeout",
}


class ApiError(Exception):
    """An error with an HTTP status, a stable code, a message and optional details."""

    def __init__(self, status: int, message: str, code: str | None = None, **details: Any):
        super().__init__(message)
        self.status = status
        self.code = code or _CODES.get(status, "error")
        self.message = message
        self.details = details


class ErrorDetail(BaseModel):
    """What went wrong: a stable code, a sentence for people, and structured details."""

    code: str
    message: str
    details: dict[str, Any] = Field(default_factory=dict)


class ErrorBody(BaseModel):
    """Every API error's body (OpenAPI documentation; the handlers write it with orjson)."""

    error: ErrorDetail


#: what each error status means when an operation does not say more
_MEANINGS = {
    400: "the body cannot be read (not JSON, not UTF-8, or not the declared encoding)",
    401: "no valid token",
    403: "the token's scopes do not allow this",
    404: "no such resource",
    405: "method not allowed (the Allow header lists the allowed ones)",
    409: "conflicts with the current state",
    413: "request body over the limit",
    415: "unsupported content type",
    422: "the request does not validate (details list the problems)",
    429: "overloaded: retry later (Retry-After)",
    500: "internal error",
    502: "an upstream service answered something unusable",
    503: "a service this call needs is unavailable",
    504: "an upstream service timed out",
}


def error_responses(*statuses: int, **descriptions: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for error statuses, each with the project's error body:
    ``error_responses(404, 422, s409="the pipeline exists")`` (``s<status>=`` overrides
    the default description)."""
    return {
        status: {"model": ErrorBody, "description": descriptions.get(f"s{status}", _MEANINGS.get(status, "error"))}
        for status in statuses
    }


def error_body(code: str, message: str, details: dict[str, Any] | None = None) -> bytes:
    return orjson.dumps({"error": {"code": code, "message": message, "details": details or {}}})


def error_response(status: int, message: str, code: str | None = None, **details: Any) -> Response:
    return Response(
        error_body(code or _CODES.get(status, "error"), message, details),
        status_code=status,
        media_type="application/json",
    )


#: the methods a 405's ``Allow`` may name
_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def allowed_methods(request: Request) -> list[str]:
    """Every method some route takes on the request's path (Starlette's own 405 names only
    the first route's, though several routes may share a path). Each method is tried
    against every route, so routes of included routers count as the app's own do."""
    routes = request.app.router.routes
    return [m for m in _METHODS if any(r.matches({**request.scope, "method": m})[0] == Match.FULL for r in routes)]


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> Response:
        return error_response(exc.status, exc.message, exc.code, **exc.details)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> Response:
        problems = [
            {"loc": [str(p) for p in e.get("loc", ())], "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in exc.errors()
        ]
        first = problems[0] if problems else {"loc": [], "msg": "invalid request"}
        where = ".".join(p for p in first["loc"] if p != "body") or "body"
        return error_response(422, f"{where}: {first['msg']}", "invalid", problems=problems)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        response = error_response(exc.status_code, str(exc.detail))
        for key, value in (exc.headers or {}).items():
            response.headers[key] = value
        if exc.status_code == 405:  # RFC 9110: Allow lists every method the path takes
            response.headers["Allow"] = ", ".join(allowed_methods(request))
        return response

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal error", "internal", type=type(exc).__name__)
