"""The one table from errors to RFC 9457 problem+json answers."""

from __future__ import annotations

import logging
import re
from typing import Any

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import Example

from sessionmgr.api.problem_types import CATALOGUE
from sessionmgr.domain.errors import (
    AccessDenied,
    AuthenticationFailed,
    BackendUnavailable,
    ConcurrencyConflict,
    Fenced,
    IdempotencyKeyInFlight,
    IdempotencyKeyReused,
    InvalidInput,
    LeaseExpired,
    MalformedRequest,
    OutboxEntriesParked,
    PayloadTooLarge,
    PreconditionFailed,
    QuotaExceeded,
    RateLimited,
    SessionDormant,
    SessionError,
    SessionNotFound,
    TooManyIdempotencyKeys,
    TooManyStreams,
    VersionRequired,
    WriteContended,
)

log = logging.getLogger(__name__)
PROBLEM_JSON = "application/problem+json"
PROBLEM_TYPES_PATH = "/problems"


class FieldError(msgspec.Struct, frozen=True):
    """One thing wrong with a request: `field` is a JSON pointer into the body (`/patch/id`,
    `/events/0/kind`; `""` is the whole body), or the name of the query parameter or header."""

    field: str
    message: str


class Problem(msgspec.Struct, omit_defaults=True):
    """RFC 9457 problem details, with the extension members this API uses.

    `type` is a URI reference to the explanation of the problem type, served at `/problems`
    (and in docs/problems.md).
    """

    type: str
    title: str
    status: int
    detail: str
    instance: str
    current_version: int | None = None
    backend: str | None = None
    errors: list[FieldError] | None = None
    limit: str | None = None
    quota: int | None = None


_STATUS: list[tuple[type[SessionError], int, str]] = [
    (MalformedRequest, 400, "malformed"),
    (AuthenticationFailed, 401, "unauthenticated"),
    (QuotaExceeded, 403, "quota-exceeded"),
    (AccessDenied, 403, "forbidden"),
    (SessionNotFound, 404, "not-found"),
    (WriteContended, 503, "contended"),  # before its base, ConcurrencyConflict
    (ConcurrencyConflict, 409, "version-conflict"),
    (LeaseExpired, 409, "lease-expired"),
    (Fenced, 409, "fenced"),
    (SessionDormant, 409, "dormant"),
    (PreconditionFailed, 412, "precondition-failed"),
    (IdempotencyKeyInFlight, 409, "idempotency-key-in-flight"),
    (OutboxEntriesParked, 409, "outbox-parked"),
    (PayloadTooLarge, 413, "too-large"),
    (IdempotencyKeyReused, 422, "idempotency-key-reused"),
    (InvalidInput, 422, "invalid-input"),
    (VersionRequired, 428, "version-required"),
    (RateLimited, 429, "rate-limited"),
    (TooManyIdempotencyKeys, 429, "idempotency-keys-exhausted"),
    (TooManyStreams, 429, "too-many-streams"),
    (BackendUnavailable, 503, "backend-unavailable"),
]
_TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    412: "Precondition Failed",
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


def problem_type(slug: str) -> str:
    return f"{PROBLEM_TYPES_PATH}#{slug}"


def _problem(
    status: int, slug: str, detail: str | None, request: Request[Any, Any, Any]
) -> Problem:
    return Problem(
        type=problem_type(slug),
        title=_TITLES.get(status, "Error"),
        status=status,
        detail=detail or _TITLES.get(status, "Error"),
        instance=request.url.path,
    )


def domain_error(request: Request[Any, Any, Any], exc: SessionError) -> Response[Problem]:
    status, slug = next((s, n) for cls, s, n in _STATUS if isinstance(exc, cls))
    problem = _problem(status, slug, str(exc), request)
    headers: dict[str, str] = {}
    if isinstance(exc, WriteContended):
        headers["Retry-After"] = str(exc.retry_after_s)
        log.warning(
            "%s %s answered 503 contended: %s",
            request.method,
            request.url.path,
            exc,
            extra={"session_id": exc.session_id},
        )
        metrics = request.app.state.get("metrics")  # absent in a bare app (unit tests)
        if metrics is not None:
            metrics.write_contended.inc()
    elif isinstance(exc, ConcurrencyConflict):
        problem.current_version = exc.current_version
    elif isinstance(exc, PreconditionFailed):
        problem.current_version = exc.current_version
        headers["ETag"] = f'"{exc.current_version}"'
    elif isinstance(exc, InvalidInput):
        problem.errors = [FieldError(field=_pointer(exc.field), message=str(exc))]
    elif isinstance(exc, QuotaExceeded):
        problem.limit, problem.quota = exc.limit, exc.quota
    elif isinstance(exc, AuthenticationFailed):
        headers["WWW-Authenticate"] = 'Bearer realm="sessionmgr"'
    elif isinstance(exc, RateLimited):
        headers.update(rate_limit_headers(exc))
    elif isinstance(exc, TooManyIdempotencyKeys | TooManyStreams):
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
            problem.errors = [_field_error(e) for e in errors]
            return problem_response(problem)
        detail = "the body is not valid JSON"
        return problem_response(_problem(400, "malformed", detail, request))
    if exc.status_code == 413:
        limit = request.app.request_max_body_size
        detail = f"the body is over the limit of {limit} bytes (SESSIONMGR_MAX_BODY_BYTES)"
        return problem_response(_problem(413, "too-large", detail, request))
    slug = {
        400: "malformed",
        404: "not-found",
        405: "method-not-allowed",
        413: "too-large",
        415: "unsupported-media-type",
    }.get(exc.status_code, "http-error")
    detail = exc.detail
    if exc.status_code == 400 and request.method in {"POST", "PATCH", "PUT"}:
        detail = "the body is not valid JSON"
    return problem_response(_problem(exc.status_code, slug, detail, request), exc.headers)


# Litestar names a parameter by its Python name and the whole body `data`; a client knows
# them as the query parameter and the body.
_PUBLIC_NAMES = {
    "state_filter": "state",
    "lease_token": "Lease-Token",
    "if_match": "If-Match",
    "if_none_match": "If-None-Match",
    "idempotency_key": "Idempotency-Key",
}
# Names of query parameters and headers: every other `field` is a member of the body.
NOT_IN_BODY = frozenset(
    {
        "include",
        "limit",
        "cursor",
        "state",
        "order",
        "Idempotency-Key",
        "If-Match",
        "If-None-Match",
        "Lease-Token",
    }
)
_MSGSPEC_PATH = re.compile(r"^(?P<message>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)
_NAMED_FIELD = re.compile(r"(?:missing required|unknown) field `([^`]*)`")
_PATH_PART = re.compile(r'\.([^.\[]+)|\[(\d+)\]|\["((?:[^"\\]|\\.)*)"\]')


def _field_error(error: Any) -> FieldError:
    """A Litestar validation entry (`{message, key, source}`) as a `FieldError`."""
    if not isinstance(error, dict):
        return FieldError(field="", message="the request does not match the schema")
    key, source = str(error.get("key", "")), error.get("source")
    message = str(error.get("message", ""))
    if source in ("query", "header", "path"):
        return FieldError(field=_PUBLIC_NAMES.get(key, key), message=message)
    if key == "data" and message == "'data'":  # Litestar's words for a body that is not there
        return FieldError(field="", message="a JSON body is required")
    parts = [] if key == "data" else _parts("." + key)
    if named := _NAMED_FIELD.search(message):
        parts.append(named.group(1))
    return FieldError(field=_join(parts), message=message)


def validation_errors(text: str) -> list[FieldError]:
    """msgspec's `Expected `int`, got `str` - at `$.events[0].kind``, as a `FieldError`."""
    match = _MSGSPEC_PATH.match(text)
    message, path = (match.group("message"), match.group("path")) if match else (text, "")
    parts = _parts(path or "")
    if named := _NAMED_FIELD.search(message):
        parts.append(named.group(1))
    return [FieldError(field=_join(parts), message=message)]


def _pointer(field: str | None) -> str:
    """A rule's field name (`patch.acl`, `events[0].kind`) as the client knows it."""
    if field is None:
        return ""
    if field in NOT_IN_BODY or field.startswith("/"):
        return field
    return _join(_parts("." + field))


def _parts(path: str) -> list[str]:
    """`.events[0].kind` (msgspec's and the rules' paths, after `$`) as reference tokens."""
    return [m.group(1) or m.group(2) or m.group(3) for m in _PATH_PART.finditer(path)]


def _join(parts: list[str]) -> str:
    """RFC 6901: each reference token escaped, `~` as `~0` and `/` as `~1`."""
    return "".join("/" + p.replace("~", "~0").replace("/", "~1") for p in parts)


def rate_limit_headers(exc: RateLimited) -> dict[str, str]:
    """Retry-After and the IETF RateLimit fields (draft-ietf-httpapi-ratelimit-headers)."""
    return {
        "Retry-After": str(exc.retry_after_s),
        "RateLimit": f'"{exc.policy}";r=0;t={exc.retry_after_s}',
        "RateLimit-Policy": f'"{exc.policy}";q={exc.quota};w={exc.window_s}',
    }


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


EXAMPLE_SESSION = "/v1/sessions/0f8fad5bd9cb469fa16570867728950e"
_EXAMPLE_MEMBERS: dict[str, dict[str, Any]] = {
    "version-conflict": {
        "detail": "session 0f8fad5bd9cb469fa16570867728950e is at version 8, not the expected one",
        "current_version": 8,
    },
    "precondition-failed": {
        "detail": "session 0f8fad5bd9cb469fa16570867728950e is at version 8, which If-Match "
        "does not name",
        "current_version": 8,
    },
    "invalid-input": {
        "detail": "'acl' cannot be patched",
        "errors": [{"field": "/patch/acl", "message": "'acl' cannot be patched"}],
    },
    "backend-unavailable": {"detail": "redis is unavailable: not reachable", "backend": "redis"},
    "too-large": {"detail": "the body is over the limit of 1048576 bytes"},
    "rate-limited": {"detail": "too many requests; try again in 2 s"},
}


def _example(slug: str, status: int) -> Example:
    value: dict[str, Any] = {
        "type": problem_type(slug),
        "title": _TITLES.get(status, "Error"),
        "status": status,
        "detail": _TITLES.get(status, "Error"),
        "instance": EXAMPLE_SESSION,
        **_EXAMPLE_MEMBERS.get(slug, {}),
    }
    return Example(summary=slug, value=value)


def responses(*statuses: int) -> dict[int, ResponseSpec]:
    """OpenAPI entries for the problem answers a route can give, each with real examples."""
    return {
        status: ResponseSpec(
            data_container=Problem,
            description=_TITLES[status],
            media_type=PROBLEM_JSON,
            generate_examples=False,
            examples=[
                _example(t.slug, status)
                for t in CATALOGUE
                if t.status == status and t.slug != "http-error"
            ]
            or [_example("http-error", status)],
        )
        for status in statuses
    }
