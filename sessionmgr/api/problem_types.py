"""Every problem `type` this API answers with, explained: served at `/problems` (one anchor per
type, which is what each `type` URI points to) and kept in docs/problems.md."""

from __future__ import annotations

import html

import msgspec
from litestar import Response, get
from litestar.enums import MediaType


class ProblemType(msgspec.Struct, frozen=True):
    slug: str
    status: int
    title: str
    when: str
    fix: str


CATALOGUE: tuple[ProblemType, ...] = (
    ProblemType(
        "malformed",
        400,
        "Bad Request",
        "The body is not JSON, or not UTF-8.",
        "Send a JSON document encoded as UTF-8.",
    ),
    ProblemType(
        "unauthenticated",
        401,
        "Unauthorized",
        "No bearer token, or one that does not verify (expired, wrong signature, audience or "
        "issuer). The answer carries `WWW-Authenticate: Bearer`.",
        "Send `Authorization: Bearer <JWT>` with a valid token.",
    ),
    ProblemType(
        "forbidden",
        403,
        "Forbidden",
        "The token is valid, but the caller is not the owner, not in the session's ACL and not "
        "`admin` (archive and delete: not the owner or `admin`).",
        "Ask the owner to add you as a participant, or use a token with the right role.",
    ),
    ProblemType(
        "quota-exceeded",
        403,
        "Forbidden",
        "A quota would be passed: `limit` names it (`max_sessions_per_owner`, "
        "`max_participants`, `max_timeline_events`) and `quota` gives its value for this "
        "caller. Nothing was changed.",
        "Delete or archive what is no longer needed, or ask an operator for a higher quota.",
    ),
    ProblemType(
        "request-timeout",
        408,
        "Request Timeout",
        "The request head or body did not arrive in time (`SESSIONMGR_HEADER_TIMEOUT_S`, "
        "`SESSIONMGR_BODY_TIMEOUT_S`, `SESSIONMGR_BODY_MIN_RATE_BPS`); the connection is closed.",
        "Send the whole request promptly.",
    ),
    ProblemType(
        "not-found",
        404,
        "Not Found",
        "No such session (also for ids that cannot be one), no such participant, or no such route.",
        "Check the id; a deleted session does not come back.",
    ),
    ProblemType(
        "method-not-allowed",
        405,
        "Method Not Allowed",
        "The route does not have this method; `Allow` lists those it has.",
        "Use one of the methods in `Allow`.",
    ),
    ProblemType(
        "version-conflict",
        409,
        "Conflict",
        "The session is not at the `expected_version` the body names; `current_version` says "
        "where it is. Nothing was changed.",
        "Read the session again, redo the change on the new state, send it with the new version.",
    ),
    ProblemType(
        "idempotency-key-in-flight",
        409,
        "Conflict",
        "A request with the same `Idempotency-Key` is still running.",
        "Retry shortly with the same key: you then get its answer.",
    ),
    ProblemType(
        "lease-expired",
        409,
        "Conflict",
        "A MAD (`mad:<name>`) wrote or renewed without a live lease on the session (it lapsed, "
        "or the session is at rest). `detail` says how to rejoin. Nothing was changed.",
        'Rejoin (`POST .../participants {"mad_name": ...}`): it grants a new lease and '
        "`Lease-Token`; renew it before it lapses.",
    ),
    ProblemType(
        "fenced",
        409,
        "Conflict",
        "The `Lease-Token` sent is not the MAD's newest grant: another holder of the name "
        "rejoined since, and its work must not be overwritten. Nothing was changed.",
        "Stop writing with the old token: rejoin if this instance should go on.",
    ),
    ProblemType(
        "dormant",
        409,
        "Conflict",
        "A join or a lease renewal on a dormant (or archived) session: leases are granted only "
        "on an active session, and this call does not wake it.",
        "`POST .../resume` first, then join.",
    ),
    ProblemType(
        "outbox-parked",
        409,
        "Conflict",
        "Archive refused: writes of this session sit on the write-behind's dead-letter stream "
        "(MongoDB refused them for their content), so MongoDB lacks them.",
        "An operator runs `sessionmgr outbox status`, fixes the cause, then `sessionmgr outbox "
        "replay` (or, deliberately, `drop`); archive again.",
    ),
    ProblemType(
        "precondition-failed",
        412,
        "Precondition Failed",
        "`If-Match` names no version the session is at. `current_version` and the `ETag` "
        "header say where it is. Nothing was changed.",
        "Read the session again (GET gives the ETag), redo the change, send the new ETag.",
    ),
    ProblemType(
        "too-large",
        413,
        "Content Too Large",
        "The body is over `SESSIONMGR_MAX_BODY_BYTES`, or one field (`work_in_progress`, an "
        "event's `data`, ...) over `SESSIONMGR_MAX_FIELD_BYTES` as JSON, or over twice that "
        "as MongoDB stores it (BSON, where each array element carries its index); `detail` "
        "names the limit.",
        "Send less: keep large material in `full_context` or outside the session.",
    ),
    ProblemType(
        "unsupported-media-type",
        415,
        "Unsupported Media Type",
        "A JSON body sent with a content type other than `application/json` (or `...+json`).",
        "Send `Content-Type: application/json`.",
    ),
    ProblemType(
        "invalid-input",
        422,
        "Unprocessable Content",
        "The request breaks the schema or a rule: `errors` lists each `{field, message}`, "
        "`field` being a JSON pointer into the body (`/patch/id`, `/events/0/kind`; empty for "
        "the whole body) or the name of the query parameter or header (`limit`, `If-Match`).",
        "Fix what each entry of `errors` names.",
    ),
    ProblemType(
        "idempotency-key-reused",
        422,
        "Unprocessable Content",
        "The same `Idempotency-Key` was used before with another request.",
        "Use a new key for a new request; repeat a request only with its own key.",
    ),
    ProblemType(
        "version-required",
        428,
        "Precondition Required",
        "A PATCH with neither `expected_version` in the body nor an `If-Match` header.",
        "Send the version you read, either way.",
    ),
    ProblemType(
        "rate-limited",
        429,
        "Too Many Requests",
        "The caller (its token's `sub`) is over its request rate on this replica. "
        "`Retry-After`, `RateLimit` and `RateLimit-Policy` say when to retry and what the "
        "limit is.",
        "Wait `Retry-After` seconds; spread requests out.",
    ),
    ProblemType(
        "head-too-large",
        431,
        "Request Header Fields Too Large",
        "The request line and headers are over `SESSIONMGR_MAX_HEAD_BYTES`, or there are more "
        "than `SESSIONMGR_MAX_HEADERS` header lines.",
        "Send fewer or smaller headers.",
    ),
    ProblemType(
        "idempotency-keys-exhausted",
        429,
        "Too Many Requests",
        "The caller holds as many live `Idempotency-Key`s as it may "
        "(`SESSIONMGR_IDEMPOTENCY_MAX_KEYS_PER_CALLER` within `SESSIONMGR_IDEMPOTENCY_TTL_S`).",
        "Use a new key per logical request only, and reuse it for that request's retries.",
    ),
    ProblemType(
        "too-many-streams",
        429,
        "Too Many Requests",
        "The caller already has as many change feeds (`GET /v1/sessions/{id}/changes`) open "
        "on this replica as it may (`SESSIONMGR_FEED_MAX_STREAMS_PER_PRINCIPAL`).",
        "Close a feed you no longer read, or watch fewer sessions at once; retry after "
        "`Retry-After` seconds.",
    ),
    ProblemType(
        "internal",
        500,
        "Internal Server Error",
        "A fault in sessionmgr itself; it is logged with the request's trace id (the "
        "`X-Request-ID` of the answer).",
        "Report it with the `X-Request-ID`.",
    ),
    ProblemType(
        "backend-unavailable",
        503,
        "Service Unavailable",
        "Redis, MongoDB or S3 is down or too slow (`backend` names it); writes while Redis is "
        "down (read-only mode). `Retry-After` says when to retry.",
        "Retry after `Retry-After` seconds, with the same `Idempotency-Key` for a write.",
    ),
    ProblemType(
        "contended",
        503,
        "Service Unavailable",
        "Other writers of the session beat this write each time it was tried, or kept it "
        "waiting for its turn, for longer than it may (about 2 s; `detail` says how long). "
        "Also a suspend beaten 8 times, and an archive, a read of an archived session or a "
        "write waking a dormant one that the session moved under 3 times. It did not take "
        "effect, and no version it named was stale. `Retry-After` says when to retry.",
        "Send the same request again after `Retry-After` seconds (with the same "
        "`Idempotency-Key`, if it had one). Seen often, many writers are taking turns on one "
        "session: spread their writes out, or batch events into fewer appends.",
    ),
    ProblemType(
        "too-many-connections",
        503,
        "Service Unavailable",
        "This replica holds `SESSIONMGR_MAX_CONNECTIONS` open connections already; the "
        "connection is closed. `Retry-After` says when to retry.",
        "Retry after `Retry-After` seconds (another replica may take it); reuse connections.",
    ),
    ProblemType(
        "http-error",
        400,
        "Error",
        "Any other HTTP error the framework answers; `status` tells which.",
        "Read `detail`.",
    ),
)


def render_html() -> str:
    sections = "\n".join(
        f'<section id="{t.slug}"><h2>{t.slug}</h2><p><b>{t.status} {html.escape(t.title)}'
        f"</b></p><p>{html.escape(t.when)}</p><p>What to do: {html.escape(t.fix)}</p></section>"
        for t in CATALOGUE
    )
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        "<title>sessionmgr problem types</title></head><body><h1>sessionmgr problem types</h1>"
        "<p>Every error answer is <code>application/problem+json</code> (RFC 9457); its "
        "<code>type</code> points at one of these sections.</p>"
        f"{sections}</body></html>"
    )


def render_markdown() -> str:
    """docs/problems.md: `python -m sessionmgr.api.problem_types > docs/problems.md`."""
    parts = [
        "# Problem types\n",
        "Every error answer of sessionmgr is `application/problem+json` (RFC 9457) with `type`,",
        "`title`, `status`, `detail` and `instance`, and `errors: [{field, message}]` for",
        "validation errors. `type` is `/problems#<name>`, resolved against the service's URL:",
        "the running service serves this page at `/problems`, one anchor per type.",
        "This file is generated from `sessionmgr/api/problem_types.py`.\n",
    ]
    for t in CATALOGUE:
        parts += [
            f"## {t.slug}\n",
            f"**{t.status} {t.title}.** {t.when}\n",
            f"What to do: {t.fix}\n",
        ]
    return "\n".join(parts)


@get(
    "/problems",
    media_type=MediaType.HTML,
    tags=["operations"],
    security=[],
    operation_id="listProblemTypes",
    summary="What each problem type means",
    sync_to_thread=False,
)
def problem_types_page() -> Response[str]:
    """The page each problem's `type` points into: one section (anchor) per type."""
    return Response(render_html(), media_type=MediaType.HTML)


if __name__ == "__main__":
    print(render_markdown())
