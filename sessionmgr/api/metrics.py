"""`/metrics` and the middleware that counts every request (families in sessionmgr.metrics)."""

from __future__ import annotations

import time

from litestar import Response, get
from litestar.datastructures import State
from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from sessionmgr.metrics import Metrics


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
            metrics: Metrics = scope["litestar_app"].state.metrics
            route = scope.get("path_template") or "unmatched"
            method = scope["method"]
            metrics.http_requests.labels(route, method, str(status)).inc()
            metrics.http_latency.labels(route, method).observe(time.perf_counter() - started)

    return middleware


@get("/metrics", include_in_schema=True, tags=["operations"], cache=False)
async def metrics_endpoint(state: State) -> Response[bytes]:
    """Prometheus text format."""
    # Litestar appends the charset itself; prometheus_client's constant already has one.
    media_type = CONTENT_TYPE_LATEST.split("; charset=")[0]
    return Response(generate_latest(state.metrics.registry), media_type=media_type)
