"""The hot read lane: a plain read of one session answered without Litestar's request cycle.

Nearly every read a MAD makes is `GET /v1/sessions/{id}` with a token it has used before, no
query string and no `If-None-Match`. For that read Litestar's cycle (its router, the route's
middleware stack, a `Request`, the handler call) costs about as much as the read itself: the
bare floor of `bench/baselines/floor.py` spends half its CPU in it (docs/benchmarks.md). The
lane sits in front of that cycle (`install`) and answers such a read itself, with the same
steps the cycle takes for it, in the same order, through the same objects:

1. the token, from the verifier's cache only (`TokenVerifier.cached`): a token not verified
   before, or no longer trusted, goes the whole way and is verified there;
2. the rate limit, spent only when it admits the call (`RateLimiter.admits`): a refusal goes
   the whole way, which answers and counts it;
3. the log span and trace id of `tracing_middleware` (tracing off: with tracing on every
   request goes the whole way, so that its span is the SDK's);
4. `SessionService.get`, the ETag and the answer of `SessionResponse` (`session_answer`);
   `X-Request-ID` is added by the app's `before_send` hook, as for every answer;
5. the request counted by `metrics_middleware`'s `request_answered`, under the route's
   template.

Anything else goes the whole way before anything is done. A read that fails in step 4 (no
such session, not the caller's, a backend down) goes the whole way too, once: it carries the
principal it was admitted as (`ADMITTED`, so it is neither verified nor charged again) and
the error (`FAILED`, which `_plain_read` raises at once instead of reading again), so that
Litestar's exception handlers answer it as they answer every error, under the lane's trace id.
`tests/integration/test_read_lane.py` holds both ways to the same answers.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

from litestar._asgi.utils import is_valid_host
from litestar.enums import ScopeType
from litestar.types import ASGIApp, HTTPScope, Receive, Scope, Send
from opentelemetry import context, trace

from sessionmgr.api.answer import session_answer
from sessionmgr.api.auth import TokenVerifier
from sessionmgr.api.conditional import etag
from sessionmgr.api.ratelimit import RateLimiter
from sessionmgr.api.tracing import TRACE_ID, _log_span
from sessionmgr.domain.model import Principal
from sessionmgr.metrics import Metrics
from sessionmgr.services.sessions import SessionService
from sessionmgr.telemetry import records

PREFIX = "/v1/sessions/"
ROUTE = "/v1/sessions/{session_id}"  # the route's template, as Litestar names it (path_template)
# In the `state` of a read the lane hands over after admitting it (the module's docstring).
ADMITTED = "sessionmgr.lane.admitted"
FAILED = "sessionmgr.lane.failed"
STARTED = "sessionmgr.lane.started"
_ID_LENGTH = 32
_HEX = frozenset("0123456789abcdef")
_READS = frozenset({"GET", "HEAD"})


def install(app: Any) -> None:
    """Put the lane in front of `app`'s request cycle (a Litestar app, once built)."""
    app.asgi_handler = ReadLane(app.asgi_handler)


def _plain_session_read(scope: Scope) -> str | None:
    """The session id of a GET or HEAD of `/v1/sessions/{id}` with a well-formed id, no query
    string, no If-None-Match and a Host the router accepts (it refuses the others before any
    middleware), served at no root path (the router would strip one); otherwise None."""
    if scope["type"] != ScopeType.HTTP:
        return None
    if scope["method"] not in _READS or scope["query_string"] or scope.get("root_path"):
        return None
    path: str = scope["path"]
    if not path.startswith(PREFIX):
        return None
    session_id = path[len(PREFIX) :]
    if len(session_id) != _ID_LENGTH or not _HEX.issuperset(session_id):
        return None
    for name, value in scope["headers"]:
        lowered = name.lower()
        if lowered == b"if-none-match" or (lowered == b"host" and not is_valid_host(value)):
            return None
    return session_id


def admitted(scope: Scope) -> Principal | None:
    """The principal the lane admitted this request as, when it handed it over; else None.

    Only for the very request the lane matched: a request made inside the app from another's
    state (a relay, say) is verified and charged as any other."""
    handed = scope["state"].get(ADMITTED)
    if handed is None or handed[0] is not scope:
        return None
    principal: Principal = handed[1]
    return principal


def lane_objects(scope: Scope) -> dict[str, Any] | None:
    """The per-request objects (`app.state.resolved`) when a lane may answer: the app has
    started and tracing is off (with it on, every request goes the whole way, so that its span
    is the SDK's); else None."""
    state = scope["litestar_app"].state
    resolved: dict[str, Any] | None = state.get("resolved")
    if resolved is None or records(state.tracer):
        return None
    return resolved


@contextmanager
def lane_span(scope: Scope) -> Iterator[None]:
    """`tracing_middleware`'s log span and trace id, for a request a lane answers."""
    log_span = _log_span(scope)
    scope["state"][TRACE_ID] = f"{log_span.get_span_context().trace_id:032x}"
    token = context.attach(trace.set_span_in_context(log_span))
    try:
        yield
    finally:
        context.detach(token)


def answered(scope: HTTPScope, route: str, status: int, started: float) -> None:
    """Count a request a lane answered, as `metrics_middleware` counts one."""
    metrics: Metrics = scope["litestar_app"].state.metrics
    metrics.request_answered(route, scope["method"], status, time.perf_counter() - started)


def hand_over(scope: Scope, principal: Principal, error: Exception, started: float) -> None:
    """Mark a request a lane admitted and then met `error` on, before the cycle takes it: the
    cycle trusts `principal` (`admitted`), raises `error` at once (`handed_over_error`) and
    times the request from `started`, when the lane took it."""
    scope["state"][ADMITTED] = (scope, principal)
    scope["state"][FAILED] = (scope, error)
    scope["state"][STARTED] = started


def handed_over_error(scope: Scope) -> Exception | None:
    """The error a lane met on this request, taken out of its state (a caught exception
    left there would hold the request's frames in a reference cycle). Only for the very
    request the lane matched, as `admitted`."""
    handed = scope["state"].pop(FAILED, None)
    if handed is None or handed[0] is not scope:
        return None
    failed: Exception = handed[1]
    return failed


def _authorization(scope: Scope) -> str | None:
    """The one Authorization header, or None for none or several (the whole way decides)."""
    found: str | None = None
    for name, value in scope["headers"]:
        if name == b"authorization" or name.lower() == b"authorization":
            if found is not None:
                return None
            found = value.decode("latin-1")
    return found


class ReadLane:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        session_id = _plain_session_read(scope)
        resolved = lane_objects(scope) if session_id is not None else None
        if session_id is None or resolved is None:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        verifier: TokenVerifier = resolved["verifier"]
        principal = verifier.cached(_authorization(scope))
        limiter: RateLimiter = resolved["rate_limiter"]
        if principal is None or not limiter.admits(
            principal.sub, service="service" in principal.roles
        ):
            await self.app(scope, receive, send)
            return
        with lane_span(scope):
            await self._read(
                cast(HTTPScope, scope), receive, send, session_id, principal, resolved, started
            )

    async def _read(
        self,
        scope: HTTPScope,
        receive: Receive,
        send: Send,
        session_id: str,
        principal: Principal,
        resolved: dict[str, Any],
        started: float,
    ) -> None:
        service: SessionService = resolved["sessions"]
        status = 500  # as `metrics_middleware` counts an answer that was never started
        try:
            try:
                session = await service.get(principal, session_id)
                start, body = session_answer(session, 200, {"ETag": etag(session)}, scope["method"])
            except Exception as exc:  # answered the whole way, as every error is
                hand_over(scope, principal, exc, started)
                status = 0  # counted by the cycle
                await self.app(scope, receive, send)
                return
            status = 200  # as `metrics_middleware` notes it: before the start is sent
            await send(start)
            await send(body)
        finally:
            if status:
                answered(scope, ROUTE, status, started)
