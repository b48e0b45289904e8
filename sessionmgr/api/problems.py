"""The one table from errors to RFC 9457 problem+json answers."""

from __future__ import annotations

import logging
from typing import Any

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import Example

from sessionmgr.domain.errors import (
    AccessDenied,
    AuthenticationFailed,
    BackendUnavailable,
    ConcurrencyConflict,
    IdempotencyKeyInFlight,
    IdempotencyKeyReused,
    InvalidInput,
    MalformedRequest,
    PayloadTooLarge,
    QuotaExceeded,
    RateLimited,
    SessionError,
    SessionNotFound,
    VersionRequired,
)

log = logging.getLogger(__name__)
PROBLEM_JSON = "application/problem+json"


class Problem(msgspec.Struct, omit_defaults=True):
    """RFC 9457 problem details, with the extension members this API uses."""

    type: str
    title: str
    status: int
    detail: str | None = None
    instance: str | None = None
    current_version: int | None = None
    backend: str | None = None
    field: str | None = None
    errors: list[dict[str, Any]] | None = None
    limit: str | None = None
    quota: int | None = None


_STATUS: list[tuple[type[SessionError], int, str]] = [
    (MalformedRequest, 400, "malformed"),
    (AuthenticationFailed, 401, "unauthenticated"),
    (QuotaExceeded, 403, "quota-exceeded"),
    (AccessDenied, 403, "forbidden"),
    (SessionNotFound, 404, "not-found"),
    (ConcurrencyConflict, 409, "version-conflict"),
    (IdempotencyKeyInFlight, 409, "idempotency-key-in-flight"),
    (PayloadTooLarge, 413, "too-large"),
    (IdempotencyKeyReused, 422, "idempotency-key-reused"),
    (InvalidInput, 422, "invalid-input"),
    (VersionRequired, 428, "version-required"),
    (RateLimited, 429, "rate-limited"),
    (BackendUnavailable, 503, "backend-unavailable"),
]
_TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    422: "Unprocessable Content",
    428: "Precondition Required",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def problem_response(problem: Problem, headers: dict[str, str] | None = None) -> Response[Problem]:
    return Response(
        content=problem, status_code=problem.status, media_type=PROBLEM_JSON, headers=headers
    )


def _problem(
    status: int, slug: str, detail: str | None, request: Request[Any, Any, Any]
) -> Problem:
    return Problem(
        type=f"https://sessionmgr.dev/problems/{slug}",
        title=_TITLES.get(status, "Error"),
        status=status,
        detail=detail,
        instance=request.url.path,
    )


def domain_error(request: Request[Any, Any, Any], exc: SessionError) -> Response[Problem]:
    status, slug = next((s, n) for cls, s, n in _STATUS if isinstance(exc, cls))
    problem = _problem(status, slug, str(exc), request)
    headers: dict[str, str] = {}
    if isinstance(exc, ConcurrencyConflict):
        problem.current_version = exc.current_version
    elif isinstance(exc, InvalidInput):
        problem.field = exc.field
    elif isinstance(exc, QuotaExceeded):
        problem.limit, problem.quota = exc.limit, exc.quota
    elif isinstance(exc, AuthenticationFailed):
        headers["WWW-Authenticate"] = 'Bearer realm="sessionmgr"'
    elif isinstance(exc, RateLimited):
        headers["Retry-After"] = str(exc.retry_after_s)
    elif isinstance(exc, BackendUnavailable):
        problem.backend = exc.backend
        headers["Retry-After"] = str(exc.retry_after_s)
        metrics = request.app.state.get("metrics")  # absent in a bare app (unit tests)
        if metrics is not None:
            metrics.backend_errors.labels(exc.backend).inc()
        log.warning(
            "%s %s answered 503: %s (%r)",
            request.method,
            request.url.path,
            exc,
            exc.__cause__,
            extra={"session_id": request.path_params.get("session_id")},
        )
    return problem_response(problem, headers)


def http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Problem]:
    if isinstance(exc, ValidationException):
        # Litestar fills `extra` when JSON decoded but broke the schema; none means bad JSON.
        if exc.extra:
            problem = _problem(
                422, "invalid-input", "the request does not match the schema", request
            )
            errors = exc.extra if isinstance(exc.extra, list) else [exc.extra]
            problem.errors = [_public_names(e) for e in errors]
            return problem_response(problem)
        detail = f"the body is not valid JSON: {exc.detail}"
        return problem_response(_problem(400, "malformed", detail, request))
    slug = {
        400: "malformed",
        404: "not-found",
        405: "method-not-allowed",
        413: "too-large",
        415: "unsupported-media-type",
    }.get(exc.status_code, "http-error")
    detail = exc.detail
    if exc.status_code == 400 and request.method in {"POST", "PATCH", "PUT"}:
        detail = f"the body is not valid JSON: {detail}"  # the decoder's words alone are terse
    return problem_response(_problem(exc.status_code, slug, detail, request), exc.headers)


# Litestar names a parameter by its Python name and the whole body `data`; a client knows
# them as the query parameter and the body.
_PUBLIC_NAMES = {"state_filter": "state", "data": "body"}


def _public_names(error: Any) -> Any:
    if isinstance(error, dict) and error.get("key") in _PUBLIC_NAMES:
        return {**error, "key": _PUBLIC_NAMES[error["key"]]}
    return error


def undecodable_body(request: Request[Any, Any, Any], exc: ValueError) -> Response[Problem]:
    """Bytes that are not UTF-8 JSON never reach a handler; they are the client's to fix."""
    return problem_response(_problem(400, "malformed", "the body is not valid UTF-8 JSON", request))


def too_deep(request: Request[Any, Any, Any], exc: RecursionError) -> Response[Problem]:
    """The JSON decoder stops at the interpreter's recursion limit; far past any real body."""
    problem = _problem(422, "invalid-input", "the body is nested too deeply", request)
    return problem_response(problem)


def unexpected_error(request: Request[Any, Any, Any], exc: Exception) -> Response[Problem]:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return problem_response(
        _problem(500, "internal", "an unexpected error; it has been logged", request)
    )


EXCEPTION_HANDLERS: dict[Any, Any] = {
    SessionError: domain_error,
    HTTPException: http_error,
    UnicodeDecodeError: undecodable_body,
    msgspec.DecodeError: undecodable_body,
    RecursionError: too_deep,
    Exception: unexpected_error,
}


def responses(*statuses: int) -> dict[int, ResponseSpec]:
    """OpenAPI entries for the problem answers a route can give."""
    return {
        status: ResponseSpec(
            data_container=Problem,
            description=_TITLES[status],
            media_type=PROBLEM_JSON,
            examples=[Example(summary=_TITLES[status], value={"status": status})],
        )
        for status in statuses
    }
