"""A server span per request, named by route template, continuing the caller's `traceparent`."""

from __future__ import annotations

import random
import re
from typing import Any

from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from opentelemetry import context, propagate, trace
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import (
    INVALID_SPAN_ID,
    INVALID_TRACE_ID,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    Tracer,
)

from sessionmgr.storage.traced import SESSION_ID
from sessionmgr.telemetry import records

# Kubernetes probes and Prometheus scrapes every few seconds would bury the real traces.
UNTRACED_PATHS = frozenset({"/health/live", "/health/ready", "/metrics"})
_REQUEST_ID = re.compile(rb"[\x21-\x7e]{1,200}")  # echoed as given: visible ASCII only
TRACE_ID = "sessionmgr.trace_id"


class _HeaderGetter(Getter[list[tuple[bytes, bytes]]]):
    def get(self, carrier: list[tuple[bytes, bytes]], key: str) -> list[str] | None:
        wanted = key.lower().encode()
        values = [v.decode("latin-1") for k, v in carrier if k.lower() == wanted]
        return values or None

    def keys(self, carrier: list[tuple[bytes, bytes]]) -> list[str]:
        return [k.decode("latin-1") for k, _ in carrier]


_HEADERS = _HeaderGetter()


def _headers(scope: Scope) -> list[tuple[bytes, bytes]]:
    return list(scope["headers"])


def tracing_middleware(app: ASGIApp) -> ASGIApp:
    """A span per request; its trace id becomes the request's id (`add_request_id`)."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP or scope["path"] in UNTRACED_PATHS:
            await app(scope, receive, send)
            return
        tracer: Tracer = scope["litestar_app"].state.tracer
        if TRACE_ID in scope["state"]:  # handed over by the read lane, under its log span
            await app(scope, receive, send)
            return
        if not records(tracer):
            log_span = _log_span(scope)
            _note_trace_id(scope, log_span)
            token = context.attach(trace.set_span_in_context(log_span))
            try:
                await app(scope, receive, send)
            finally:
                context.detach(token)
            return
        route = scope.get("path_template") or "unmatched"
        attributes: dict[str, Any] = {
            "http.request.method": scope["method"],
            "http.route": route,
            "url.path": scope["path"],
        }
        if session_id := scope.get("path_params", {}).get("session_id"):
            attributes[SESSION_ID] = str(session_id)
        status = 500

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        with tracer.start_as_current_span(
            f"{scope['method']} {route}",
            context=propagate.extract(_headers(scope), getter=_HEADERS),
            kind=SpanKind.SERVER,
            attributes=attributes,
        ) as span:
            _note_trace_id(scope, span)
            try:
                await app(scope, receive, capture)
            finally:
                span.set_attribute("http.response.status_code", status)
                if status >= 500:  # a 4xx is the client's error, not the server's
                    span.set_status(Status(StatusCode.ERROR))

    return middleware


def _note_trace_id(scope: Scope, span: trace.Span) -> None:
    scope.setdefault("state", {})[TRACE_ID] = f"{span.get_span_context().trace_id:032x}"


async def add_request_id(message: Message, scope: Scope) -> None:
    """A `before_send` hook: every answer, errors and unmatched routes included, carries
    `X-Request-ID`: the caller's own (visible ASCII, up to 200 characters), else the trace id
    of the request (its `traceparent`'s, or a new one).

    A coroutine function, though it awaits nothing: Litestar runs a plain function given as a
    hook in its thread pool (`sync_to_thread`), a thread hand-off for every message of every
    answer (issue 16: 4 per request, a sixth of a hot GET's CPU)."""
    if message["type"] != "http.response.start" or scope["type"] != ScopeType.HTTP:
        return
    request_id = next(
        (v for k, v in scope["headers"] if k == b"x-request-id" and _REQUEST_ID.fullmatch(v)),
        None,
    )
    if request_id is None:
        trace_id = scope.get("state", {}).get(TRACE_ID)
        if trace_id is None:  # not traced (health, metrics, no such route)
            trace_id = f"{_log_span(scope).get_span_context().trace_id:032x}"
        request_id = trace_id.encode()
    message["headers"] = [*message.get("headers", ()), (b"x-request-id", request_id)]


def _log_span(scope: Scope) -> NonRecordingSpan:
    """Tracing off: a span that only gives the request's log lines a trace id, the caller's
    (`traceparent`) or a fresh one, for a fraction of what the SDK spends on a span it drops."""
    trace_id = INVALID_TRACE_ID
    if any(k == b"traceparent" for k, _ in scope["headers"]):
        parent = propagate.extract(_headers(scope), getter=_HEADERS)
        trace_id = trace.get_current_span(parent).get_span_context().trace_id
    while trace_id == INVALID_TRACE_ID:
        trace_id = random.getrandbits(128)
    span_id = INVALID_SPAN_ID
    while span_id == INVALID_SPAN_ID:
        span_id = random.getrandbits(64)
    return NonRecordingSpan(SpanContext(trace_id, span_id, is_remote=False))
