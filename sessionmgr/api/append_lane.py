"""The append lane: `POST /v1/sessions/{id}/timeline` answered without Litestar's request cycle.

Appends are most of what MADs write, and for an append the cycle (its router, the middleware
stack, a `Request`, the arguments extracted and the body decoded twice, the answer encoded
again) costs about a third of the request's CPU (docs/benchmarks.md). Like the read lane
(api/lane.py), this lane sits in front of that cycle and answers an append itself, with the
steps the cycle takes for it, in its order, through the same objects:

1. the shape: a POST of `/v1/sessions/{32 hex}/timeline`, no query string, no root path, a
   Host the router accepts, `Content-Type: application/json`, a Content-Length within
   `max_body_bytes`, no Transfer-Encoding and no Expect, and at most one of each header the
   lane reads (`_READ_ONCE`);
2. the token, from the verifier's cache only (`TokenVerifier.cached`);
3. the body, read whole and decoded strictly into `AppendBody` (what `_strict` does after the
   cycle's lenient pass); Idempotency-Key, Lease-Token and If-Match read by the handlers' own
   functions (api/write_headers.py, `conditional.if_match`);
4. the rate limit, spent only when it admits the call (`RateLimiter.admits`);
5. the log span and trace id of `tracing_middleware` (tracing off only), `Idempotent-Replayed`
   as `replayed_middleware` marks it;
6. `SessionService.append`, answered as the cycle answers an `AppendResult` (200, JSON);
   `X-Request-ID` is added by the app's `before_send` hook, as for every answer;
7. the request counted under the route's template, as `metrics_middleware` counts it.

A request that fails one of steps 1-4 goes the whole way, its body handed on as the lane read
it and timed from when the lane took it: nothing was done, and the cycle answers it as it
answers any request (a bad body's 400 or 422, a refused token's 401, a 429), verifying and
charging it itself. An append that
fails in step 6 has been admitted and charged, and may have been applied (an outcome-unknown
503): it goes the whole way once, with its principal (`ADMITTED`) and its error (`FAILED`,
which the route's `before_request` hook raises at once, so it is never appended again), under
the lane's trace id, so that the exception handlers answer it as they answer every error.
`tests/integration/test_append_lane.py` holds both ways to the same answers.
"""

from __future__ import annotations

import time
from typing import Any, cast

import msgspec
from litestar._asgi.utils import is_valid_host
from litestar.enums import ScopeType
from litestar.types import ASGIApp, HTTPScope, Receive, ReceiveMessage, Scope, Send

from sessionmgr.api import conditional
from sessionmgr.api.auth import TokenVerifier
from sessionmgr.api.lane import PREFIX, STARTED, answered, hand_over, lane_objects, lane_span
from sessionmgr.api.ratelimit import RateLimiter
from sessionmgr.api.replayed import HEADER as REPLAYED_HEADER
from sessionmgr.api.schemas import AppendBody
from sessionmgr.api.write_headers import idempotency, lease_token
from sessionmgr.domain.errors import InvalidInput
from sessionmgr.domain.model import Principal
from sessionmgr.services.replays import REPLAYED
from sessionmgr.services.sessions import SessionService

ROUTE = "/v1/sessions/{session_id}/timeline"  # the route's template, as Litestar names it
SUFFIX = "/timeline"
_ID_LENGTH = 32
_PATH_LENGTH = len(PREFIX) + _ID_LENGTH + len(SUFFIX)
_HEX = frozenset("0123456789abcdef")
_JSON = b"application/json"
_MAX_LENGTH_DIGITS = 18  # any body the lane may take (`max_body_bytes`) says so in fewer
# The headers the lane reads, each at most once; another copy of one sends the request the
# whole way, where the cycle decides what several mean.
_READ_ONCE = frozenset(
    {
        b"authorization",
        b"idempotency-key",
        b"if-match",
        b"lease-token",
        b"content-type",
        b"content-length",
    }
)
_decode_body = msgspec.json.Decoder(AppendBody).decode
_encode = msgspec.json.Encoder().encode


def install(app: Any, max_body: int) -> None:
    """Put the lane in front of `app`'s request cycle (a Litestar app, once built, that
    refuses bodies over `max_body` bytes)."""
    app.asgi_handler = AppendLane(app.asgi_handler, max_body)


def _plain_append(scope: Scope, max_body: int) -> tuple[str, dict[str, str]] | None:
    """The session id and the read headers (latin-1, by lowercase name) of an append the lane
    can take (step 1 of the module's docstring); otherwise None."""
    if scope["type"] != ScopeType.HTTP or scope["method"] != "POST":
        return None
    path: str = scope["path"]
    if (
        len(path) != _PATH_LENGTH
        or not path.startswith(PREFIX)
        or not path.endswith(SUFFIX)
        or scope["query_string"]
        or scope.get("root_path")
    ):
        return None
    session_id = path[len(PREFIX) : len(PREFIX) + _ID_LENGTH]
    if not _HEX.issuperset(session_id):
        return None
    found: dict[str, str] = {}
    for name, value in scope["headers"]:
        lowered = name.lower()
        if lowered == b"host":
            if not is_valid_host(value):
                return None
            continue
        if lowered in (b"transfer-encoding", b"expect"):
            return None  # a body without a length, or one sent only once asked for
        if lowered not in _READ_ONCE:
            continue
        read = lowered.decode("latin-1")
        if read in found:
            return None
        found[read] = value.decode("latin-1")
    if found.get("content-type", "").encode("latin-1") != _JSON:
        return None
    length = found.get("content-length", "")
    if not (length.isascii() and length.isdigit() and len(length) <= _MAX_LENGTH_DIGITS):
        return None  # the cycle answers what a server let through
    if int(length) > max_body:
        return None
    return session_id, found


class _Replay:
    """The request's messages the lane read, then the server's own `receive`: what the whole
    way reads of a request the lane handed on is what the lane read of it, in order."""

    def __init__(self, read: list[ReceiveMessage], receive: Receive) -> None:
        self._read = read
        self._receive = receive

    async def __call__(self) -> ReceiveMessage:
        if self._read:
            return self._read.pop(0)
        return await self._receive()


async def _read_body(receive: Receive, read: list[ReceiveMessage], limit: int) -> bytes | None:
    """The whole body, each message kept in `read`; None when the client went away or sent
    more than `limit` bytes (the whole way answers that)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        read.append(message)
        if message["type"] != "http.request":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


class AppendLane:
    def __init__(self, app: ASGIApp, max_body: int) -> None:
        self.app = app
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        plain = _plain_append(scope, self.max_body)
        resolved = lane_objects(scope) if plain is not None else None
        if plain is None or resolved is None:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        session_id, headers = plain
        verifier: TokenVerifier = resolved["verifier"]
        principal = verifier.cached(headers.get("authorization"))
        if principal is None:
            await self.app(scope, receive, send)
            return
        read: list[ReceiveMessage] = []
        arguments = await self._arguments(scope, receive, read, principal, headers)
        limiter: RateLimiter = resolved["rate_limiter"]
        if arguments is None or not limiter.admits(
            principal.sub, service="service" in principal.roles
        ):
            scope["state"][STARTED] = started  # the cycle's metrics time the body's upload too
            await self.app(scope, _Replay(read, receive), send)
            return
        with lane_span(scope):
            await self._append(
                cast(HTTPScope, scope),
                _Replay(read, receive),
                send,
                session_id,
                principal,
                arguments,
                resolved,
                started,
            )

    async def _arguments(
        self,
        scope: Scope,
        receive: Receive,
        read: list[ReceiveMessage],
        principal: Principal,
        headers: dict[str, str],
    ) -> dict[str, Any] | None:
        """`SessionService.append`'s arguments as the handler would pass them (step 3), or None
        when the body or a header is not one the handler would take."""
        body = await _read_body(receive, read, int(headers["content-length"]))
        if body is None:
            return None
        try:
            data = _decode_body(body)
            if_match = headers.get("if-match")
            return {
                "events": data.events,
                "expected_version": data.expected_version,
                "idem": idempotency(
                    principal.sub,
                    headers.get("idempotency-key"),
                    "POST",
                    scope["path"],
                    if_match or "",
                    data,
                ),
                "lease_token": lease_token(headers.get("lease-token")),
                "if_match": conditional.if_match(if_match),
            }
        except (msgspec.DecodeError, RecursionError, InvalidInput):  # the whole way answers it
            return None

    async def _append(
        self,
        scope: HTTPScope,
        receive: Receive,
        send: Send,
        session_id: str,
        principal: Principal,
        arguments: dict[str, Any],
        resolved: dict[str, Any],
        started: float,
    ) -> None:
        service: SessionService = resolved["sessions"]
        status = 500  # as `metrics_middleware` counts an answer that was never started
        replayed = REPLAYED.set(False)
        try:
            try:
                result = await service.append(principal, session_id, **arguments)
            except Exception as exc:  # answered the whole way, as every error is
                hand_over(scope, principal, exc, started)
                status = 0  # counted by the cycle
                await self.app(scope, receive, send)
                return
            body = _encode(result)
            headers = [
                (b"content-type", _JSON),
                (b"content-length", b"%d" % len(body)),
            ]
            if REPLAYED.get():
                headers.append(REPLAYED_HEADER)
            status = 200  # as `metrics_middleware` notes it: before the start is sent
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": body, "more_body": False})
        finally:
            REPLAYED.reset(replayed)
            if status:
                answered(scope, ROUTE, status, started)
