"""`/metrics` and the middleware that counts every request (families in sessionmgr.metrics)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

from litestar import Response, get
from litestar.datastructures import State
from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest, start_http_server

from sessionmgr.api.lane import STARTED
from sessionmgr.metrics import Metrics
from sessionmgr.settings import Settings

log = logging.getLogger(__name__)
METRICS_HOST = "0.0.0.0"  # noqa: S104 - Prometheus scrapes the pod's address


def metrics_middleware(app: ASGIApp) -> ASGIApp:
    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await app(scope, receive, send)
            return
        status = 500
        # A read the read lane handed over started there (sessionmgr/api/lane.py).
        started = scope["state"].get(STARTED) or time.perf_counter()

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await app(scope, receive, capture)
        finally:
            metrics: Metrics = scope["litestar_app"].state.metrics
            metrics.request_answered(
                scope.get("path_template") or "unmatched",
                scope["method"],
                status,
                time.perf_counter() - started,
            )

    return middleware


@get(
    "/metrics",
    include_in_schema=True,
    tags=["operations"],
    cache=False,
    operation_id="getMetrics",
    summary="Prometheus metrics",
)
async def metrics_endpoint(state: State) -> Response[bytes]:
    """Prometheus text format."""
    # Litestar appends the charset itself; prometheus_client's constant already has one.
    media_type = CONTENT_TYPE_LATEST.split("; charset=")[0]
    return Response(generate_latest(state.metrics.registry), media_type=media_type)


def serve_metrics(settings: Settings, metrics: Metrics) -> Iterator[int | None]:
    """With `SESSIONMGR_METRICS_PORT` set, serve the registry on that port for the app's life.

    prometheus_client's own server, on a thread: it shares nothing with the API's event loop,
    so a scrape still answers while the API is busy. Yields the port, or None when unset.
    """
    if settings.metrics_port is None:
        yield None
        return
    server, thread = start_http_server(
        settings.metrics_port, addr=METRICS_HOST, registry=metrics.registry
    )
    log.info("metrics on port %d", server.server_port)
    try:
        yield server.server_port
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
