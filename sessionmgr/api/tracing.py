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


def _given_request_id(scope: Scope) -> bytes | None:
    for name, value in scope["headers"]:
        if name == b"x-request-id" and _REQUEST_ID.fullmatch(value):
            return value
    return None


def _answering_with(send: Send, request_id: bytes) -> Send:
    """`send`, with `X-Request-ID` added to the answer's headers."""

    async def answer(message: Message) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", ()), (b"x-request-id", request_id)]
        await send(message)

    return answer


def tracing_middleware(app: ASGIApp) -> ASGIApp:
    """A span per request, and every answer says which request it was: `X-Request-ID` echoes
    the caller's, or else carries the trace id (the caller's `traceparent`, or a new one)."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await app(scope, receive, send)
            return
        given = _given_request_id(scope)
        if scope["path"] in UNTRACED_PATHS:
            request_id = given or f"{_log_span(scope).get_span_context().trace_id:032x}".encode()
            await app(scope, receive, _answering_with(send, request_id))
            return
        tracer: Tracer = scope["litestar_app"].state.tracer
        if not records(tracer):
            log_span = _log_span(scope)
            answer = _answering_with(send, given or _trace_id(log_span))
            token = context.attach(trace.set_span_in_context(log_span))
            try:
                await app(scope, receive, answer)
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
            answer = _answering_with(capture, given or _trace_id(span))
            try:
                await app(scope, receive, answer)
            finally:
                span.set_attribute("http.response.status_code", status)
                if status >= 500:  # a 4xx is the client's error, not the server's
                    span.set_status(Status(StatusCode.ERROR))

    return middleware


def _trace_id(span: trace.Span) -> bytes:
    return f"{span.get_span_context().trace_id:032x}".encode()


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
