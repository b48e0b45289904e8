"""Every problem answer as a typed exception, chosen by the problem `type`, else the status."""

from __future__ import annotations

import email.utils
import time

import httpx
import msgspec

from sessionmgr_client._models import Problem

MAX_RETRY_AFTER_S = 30.0  # a Retry-After longer than this is waited for only this long


class SessionMgrError(Exception):
    """Anything this client raises on purpose."""


class ProblemError(SessionMgrError):
    """An error answer (4xx/5xx); `problem` is its body, `status` its status."""

    def __init__(self, problem: Problem, *, retry_after: float | None = None) -> None:
        super().__init__(f"{problem.status} {problem.type}: {problem.detail or problem.title}")
        self.problem = problem
        self.status = problem.status
        self.retry_after = retry_after


class Malformed(ProblemError):
    """400 malformed: the body was not JSON."""


class Unauthenticated(ProblemError):
    """401: no token, or one that does not verify."""


class Forbidden(ProblemError):
    """403 forbidden: not the owner, not in the ACL, not admin (or not allowed this call)."""


class QuotaExceeded(ProblemError):
    """403 quota-exceeded: `problem.limit` names the quota, `problem.quota` its value."""


class NotFound(ProblemError):
    """404: no such session or participant."""


class Conflict(ProblemError):
    """409 version-conflict: `problem.current_version` says where the session is."""


class IdempotencyKeyInFlight(ProblemError):
    """409: a request with the same Idempotency-Key is still running (retried by itself)."""


class LeaseLost(ProblemError):
    """The lease that lets a MAD write is gone: LeaseExpired or Fenced."""


class LeaseExpired(LeaseLost):
    """409 lease-expired: no live lease; rejoin."""


class Fenced(LeaseLost):
    """409 fenced: another holder of the name rejoined since; stop writing."""


class Dormant(ProblemError):
    """409 dormant: resume the session before joining or renewing."""


class OutboxParked(ProblemError):
    """409 outbox-parked: archive refused until an operator clears the dead letters."""


class MethodNotAllowed(ProblemError):
    """405: the route does not have this method."""


class RequestTimeout(ProblemError):
    """408: the request did not arrive in time (the connection was closed)."""


class HeadTooLarge(ProblemError):
    """431: the request line and headers are too large."""


class PreconditionFailed(ProblemError):
    """412: If-Match names no version the session is at; `problem.current_version` does."""


class TooLarge(ProblemError):
    """413: the body or one field is over a limit."""


class UnsupportedMediaType(ProblemError):
    """415."""


class InvalidInput(ProblemError):
    """422 invalid-input: `problem.errors` lists each field and what is wrong with it."""


class IdempotencyKeyReused(ProblemError):
    """422: the same Idempotency-Key came with another request."""


class VersionRequired(ProblemError):
    """428: a PATCH without expected_version or If-Match."""


class RateLimited(ProblemError):
    """429 rate-limited: `retry_after` says when to try again (retried by itself)."""


class IdempotencyKeysExhausted(ProblemError):
    """429: the caller holds as many live Idempotency-Keys as it may."""


class InternalError(ProblemError):
    """500: a fault in sessionmgr, logged under the answer's X-Request-ID."""


class Unavailable(ProblemError):
    """503: a backend is down, the replica is full, or other writers of the session kept
    beating the write (retried by itself)."""


BY_SLUG: dict[str, type[ProblemError]] = {
    "malformed": Malformed,
    "unauthenticated": Unauthenticated,
    "forbidden": Forbidden,
    "quota-exceeded": QuotaExceeded,
    "not-found": NotFound,
    "method-not-allowed": MethodNotAllowed,
    "request-timeout": RequestTimeout,
    "version-conflict": Conflict,
    "idempotency-key-in-flight": IdempotencyKeyInFlight,
    "lease-expired": LeaseExpired,
    "fenced": Fenced,
    "dormant": Dormant,
    "outbox-parked": OutboxParked,
    "precondition-failed": PreconditionFailed,
    "too-large": TooLarge,
    "unsupported-media-type": UnsupportedMediaType,
    "invalid-input": InvalidInput,
    "idempotency-key-reused": IdempotencyKeyReused,
    "version-required": VersionRequired,
    "head-too-large": HeadTooLarge,
    "rate-limited": RateLimited,
    "idempotency-keys-exhausted": IdempotencyKeysExhausted,
    "internal": InternalError,
    "backend-unavailable": Unavailable,
    "too-many-connections": Unavailable,
    "contended": Unavailable,
}

BY_STATUS: dict[int, type[ProblemError]] = {
    400: Malformed,
    401: Unauthenticated,
    403: Forbidden,
    404: NotFound,
    405: MethodNotAllowed,
    408: RequestTimeout,
    409: Conflict,
    412: PreconditionFailed,
    413: TooLarge,
    415: UnsupportedMediaType,
    422: InvalidInput,
    428: VersionRequired,
    431: HeadTooLarge,
    429: RateLimited,
    500: InternalError,
    503: Unavailable,
}

_PROBLEM = msgspec.json.Decoder(Problem)


def retry_after(response: httpx.Response) -> float | None:
    """Seconds the `Retry-After` header asks for (delta or HTTP date), capped; None if absent."""
    raw = response.headers.get("Retry-After")
    if raw is None:
        return None
    raw = raw.strip()
    if raw.isdigit():
        seconds = float(raw)
    else:
        when = email.utils.parsedate_to_datetime(raw) if raw else None
        if when is None:
            return None
        seconds = when.timestamp() - time.time()
    return max(0.0, min(seconds, MAX_RETRY_AFTER_S))


def problem_of(response: httpx.Response) -> Problem:
    """The answer's problem body; an answer that is not one (a proxy's page) gets a stand-in."""
    detail = response.text[:200]
    if "json" in response.headers.get("content-type", ""):
        try:
            return _PROBLEM.decode(response.content)
        except msgspec.DecodeError as exc:
            detail = f"an error answer that is not a problem document ({exc})"
    return Problem(
        type="about:blank",
        title=response.reason_phrase,
        status=response.status_code,
        detail=detail,
        instance=response.request.url.path,
    )


def error_for(response: httpx.Response) -> ProblemError:
    """The typed exception for an error answer (status >= 400)."""
    problem = problem_of(response)
    cls = BY_SLUG.get(problem.slug) or BY_STATUS.get(response.status_code, ProblemError)
    if problem.status != response.status_code:
        problem = msgspec.structs.replace(problem, status=response.status_code)
    return cls(problem, retry_after=retry_after(response))
