"""Prometheus metrics: request rate, errors and latency per route, on `/metrics`."""

from __future__ import annotations

import time

from litestar import Response, get
from litestar.datastructures import State
from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)


class HttpMetrics:
    """Request metrics in their own registry, so each app (and test) starts from zero."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.requests = Counter(
            "sessionmgr_http_requests",
            "HTTP requests answered, by route template, method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "sessionmgr_http_request_duration_seconds",
            "Time to answer an HTTP request, by route template and method.",
            ["route", "method"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=self.registry,
        )


def metrics_middleware(app: ASGIApp) -> ASGIApp:
    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await app(scope, receive, send)
            return
        status = 500
        started = time.perf_counter()

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await app(scope, receive, capture)
        finally:
            metrics: HttpMetrics = scope["litestar_app"].state.metrics
            route = scope.get("path_template") or "unmatched"
            method = scope["method"]
            metrics.requests.labels(route, method, str(status)).inc()
            metrics.latency.labels(route, method).observe(time.perf_counter() - started)

    return middleware


@get("/metrics", include_in_schema=True, tags=["operations"], cache=False)
async def metrics_endpoint(state: State) -> Response[bytes]:
    """Prometheus text format."""
    # Litestar appends the charset itself; prometheus_client's constant already has one.
    media_type = CONTENT_TYPE_LATEST.split("; charset=")[0]
    return Response(generate_latest(state.metrics.registry), media_type=media_type)
