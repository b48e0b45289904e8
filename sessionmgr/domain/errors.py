"""Domain errors. The API maps each to one HTTP status in `api/problems.py`."""

from __future__ import annotations


class SessionError(Exception):
    """Base of every error sessionmgr raises on purpose."""


class SessionNotFound(SessionError):
    def __init__(self, session_id: str) -> None:
        super().__init__(f"session {session_id} not found")
        self.session_id = session_id


class ParticipantNotFound(SessionNotFound):
    def __init__(self, session_id: str, mad_name: str) -> None:
        SessionError.__init__(self, f"{mad_name} is not a participant of session {session_id}")
        self.session_id = session_id


class AccessDenied(SessionError):
    def __init__(self, reason: str = "you may not access this session") -> None:
        super().__init__(reason)


class ConcurrencyConflict(SessionError):
    """The session moved on since the caller read it; carries the version it is at now.
    `behind`: the version the caller named is below it, so no later write can make it match."""

    def __init__(
        self, session_id: str, current_version: int | None, *, behind: bool = False
    ) -> None:
        super().__init__(
            f"session {session_id} is at version {current_version}, not the expected one"
        )
        self.session_id = session_id
        self.current_version = current_version
        self.behind = behind


class WriteContended(ConcurrencyConflict):
    """A write lost the race to other writers of the session each time it was tried, or
    waited for its turn, for longer than it may (HTTP 503 with Retry-After). It did not take
    effect: the same request again is safe, keyed or not."""

    retry_after_s = 1

    def __init__(self, session_id: str, tries: int, seconds: float, what: str = "write") -> None:
        why = (
            f"lost the race {tries} times in {seconds:.1f} s"
            if tries
            else f"waited {seconds:.1f} s for this replica's other writes of it"
        )
        super().__init__(session_id, None)  # no version was stale: none to name
        self.args = (
            f"session {session_id} is written by others so often that this {what} {why}; "
            "it did not take effect: send it again",
        )


class LeaseExpired(SessionError):
    """A MAD wrote (or renewed) without a live lease on the session (HTTP 409)."""

    def __init__(self, session_id: str, mad_name: str) -> None:
        super().__init__(
            f"mad:{mad_name} holds no live lease on session {session_id}; rejoin with "
            f'POST /v1/sessions/{session_id}/participants {{"mad_name": "{mad_name}"}} '
            "(it grants a new Lease-Token) and renew it with "
            f"PUT /v1/sessions/{session_id}/participants/{mad_name}/lease before it lapses"
        )
        self.session_id = session_id
        self.mad_name = mad_name


class Fenced(SessionError):
    """A MAD sent a Lease-Token that is not its newest grant: another holder took over."""

    def __init__(self, session_id: str, mad_name: str, token: int) -> None:
        super().__init__(
            f"Lease-Token {token} is not the newest lease granted to mad:{mad_name} on session "
            f"{session_id}: a later grant replaced it; rejoin to get a new token"
        )
        self.session_id = session_id
        self.mad_name = mad_name


class SessionDormant(SessionError):
    """A lease was asked of a session that is not hot; it is not woken up for it (HTTP 409)."""

    def __init__(self, session_id: str) -> None:
        super().__init__(
            f"session {session_id} is dormant: resume it first "
            f"(POST /v1/sessions/{session_id}/resume), then join or renew"
        )
        self.session_id = session_id


class PreconditionFailed(SessionError):
    """An `If-Match` names no version the session is at (HTTP 412); carries the current one.
    `behind`: every version it names is below it, so no later write can make one match."""

    def __init__(self, session_id: str, current_version: int, *, behind: bool = False) -> None:
        super().__init__(
            f"session {session_id} is at version {current_version}, which If-Match does not name"
        )
        self.session_id = session_id
        self.current_version = current_version
        self.behind = behind


class VersionRequired(SessionError):
    def __init__(self) -> None:
        super().__init__("send expected_version in the body or an If-Match header")


class InvalidInput(SessionError):
    """A body that is well-formed JSON but breaks a rule of the model."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class PayloadTooLarge(SessionError):
    pass


class IdempotencyKeyReused(SessionError):
    def __init__(self, reason: str = "this Idempotency-Key was already used with another request"):
        super().__init__(reason)


class IdempotencyKeyInFlight(SessionError):
    def __init__(self) -> None:
        super().__init__("a request with this Idempotency-Key is still running; retry shortly")


class BackendUnavailable(SessionError):
    """A backend failed or its answer was lost; the caller may retry (with its Idempotency-Key).

    `retryable` says whether sessionmgr itself may try again at once: false when a write may
    have been applied and nothing (no idempotency record) would make a second try harmless.
    `outage` says whether it counts toward the backend's circuit breaker: false when the
    backend answered but refused this one request (an S3 object it will not serve), which
    says nothing about the other sessions.
    """

    outage = True

    def __init__(
        self,
        backend: str,
        detail: str = "",
        retry_after_s: int = 1,
        *,
        retryable: bool = True,
        message: str | None = None,
    ) -> None:
        super().__init__(message or f"{backend} is unavailable{': ' + detail if detail else ''}")
        self.backend = backend
        self.retry_after_s = retry_after_s
        self.retryable = retryable


class CircuitOpen(BackendUnavailable):
    """The backend's circuit breaker is open: the call failed fast, the backend was not asked."""

    def __init__(self, backend: str, retry_after_s: int = 1) -> None:
        super().__init__(
            backend, "failing fast after repeated errors", retry_after_s, retryable=False
        )


class ReadOnlyMode(CircuitOpen):
    """Redis' breaker is open: reads come from MongoDB, writes wait until Redis answers."""

    def __init__(self, retry_after_s: int = 2) -> None:
        BackendUnavailable.__init__(  # not CircuitOpen's: its own detail
            self,
            "redis",
            "sessionmgr is read-only until Redis answers again",
            retry_after_s,
            retryable=False,
        )


class RateLimited(SessionError):
    """The caller spent its request budget (HTTP 429); it may try again after `retry_after_s`."""

    def __init__(
        self, retry_after_s: int, *, quota: int = 0, window_s: int = 1, policy: str = "default"
    ) -> None:
        super().__init__(f"too many requests; try again in {retry_after_s} s")
        self.retry_after_s = retry_after_s
        self.quota = quota  # requests the policy allows per `window_s`
        self.window_s = window_s
        self.policy = policy


class AuthenticationFailed(SessionError):
    """No token, or a token that does not verify (HTTP 401)."""


class QuotaExceeded(SessionError):
    """A quota would be passed (HTTP 403 `quota-exceeded`); `limit` names its setting."""

    def __init__(self, what: str, limit: str, quota: int) -> None:
        super().__init__(f"{what}: the quota is {quota} ({limit})")
        self.limit = limit
        self.quota = quota


class MalformedRequest(SessionError):
    """A request no handler should see, such as two Authorization headers (HTTP 400)."""


class ArchiveInProgress(BackendUnavailable):
    """The session is being archived right now; a retry in a moment finds it in S3 or back."""

    def __init__(self, session_id: str) -> None:
        # Not retried in-process: the fence was already waited on; the client retries later.
        super().__init__(
            "s3",
            retryable=False,
            message=f"session {session_id} is being archived; retry shortly",
        )
        self.session_id = session_id


class ArchiveUnreadable(BackendUnavailable):
    """The S3 copy of an archived session is missing or fails its checksum; MongoDB keeps the
    stub untouched, so the session comes back once the object does (from a backup, say)."""

    def __init__(self, session_id: str, reason: str) -> None:
        super().__init__(  # not retried: the same bytes come back
            "s3",
            retry_after_s=60,
            retryable=False,
            message=f"s3 holds no readable archive of session {session_id}: {reason}",
        )
        self.session_id = session_id


class OutboxEntriesParked(SessionError):
    """Writes of this session sit on the outbox's dead-letter stream, not in MongoDB: archiving
    now would archive a session without them. An operator replays or drops them first."""

    def __init__(self, session_id: str, parked: int) -> None:
        super().__init__(
            f"session {session_id} has {parked} write(s) parked on the outbox's dead-letter "
            "stream; an operator must replay or drop them (`sessionmgr outbox status`) before "
            "it can be archived"
        )
        self.session_id = session_id
        self.parked = parked


class TooManyIdempotencyKeys(SessionError):
    """The caller holds as many live Idempotency-Keys as it may (each keeps a record)."""

    def __init__(self, cap: int, ttl_s: int) -> None:
        super().__init__(
            f"quota exceeded: at most {cap} Idempotency-Keys per caller within {ttl_s} s "
            "(SESSIONMGR_IDEMPOTENCY_MAX_KEYS_PER_CALLER); reuse a key only for a retry"
        )
        self.cap = cap
        self.retry_after_s = 60


def describe(exc: BaseException) -> str:
    """A short, stable line for logs and dead letters: the class, the code, the message."""
    code = getattr(exc, "code", None)
    text = str(exc).splitlines()[0][:300] if str(exc) else ""
    return f"{type(exc).__name__}{f' (code {code})' if code is not None else ''}: {text}"


class TooManyStreams(SessionError):
    """The caller has as many change feeds open on this replica as it may (HTTP 429)."""

    def __init__(self, cap: int) -> None:
        super().__init__(
            f"at most {cap} open change feeds per caller (SESSIONMGR_FEED_MAX_STREAMS_PER_"
            "PRINCIPAL); close one before opening another"
        )
        self.cap = cap
        self.retry_after_s = 5


_SHARED = "_sessionmgr_shared_failure"


def share(copy: BaseException, failure: BaseException) -> None:
    """Mark `copy` as one request's copy of `failure`, which several requests share (one round
    trip carried them all, storage/turn_batch.py): a circuit breaker counts it once."""
    setattr(copy, _SHARED, failure)


def shared_failure(exc: BaseException) -> BaseException | None:
    """The failure `exc`, or one of its causes, shares with other requests; None if none."""
    seen: BaseException | None = exc
    for _ in range(8):  # an error, its copy, the store's translation: a short chain
        if seen is None:
            return None
        found = getattr(seen, _SHARED, None)
        if found is not None:
            return found  # type: ignore[no-any-return]
        seen = seen.__cause__
    return None
