"""`SESSIONMGR_METRICS_PORT`: `/metrics` moves off the API onto a listener of its own."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import msgspec

from sessionmgr.container import build_container
from sessionmgr.settings import Settings
from tests.integration.conftest import serving
from tests.integration.session_api import create_session
from tests.support.redis_server import free_port

Headers = Callable[..., dict[str, str]]


async def test_with_a_metrics_port_the_registry_is_served_there_only(
    settings: Settings, auth: Headers
):
    port = free_port()
    container = build_container(msgspec.structs.replace(settings, metrics_port=port))
    async with serving(container) as api:
        await create_session(api, auth())
        assert (await api.get("/metrics")).status_code == 404
        schema = (await api.get("/schema/openapi.json")).json()
        assert "/metrics" not in schema["paths"]

        async with httpx.AsyncClient() as scraper:
            r = await scraper.get(f"http://127.0.0.1:{port}/metrics")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/plain")
        line = 'sessionmgr_http_requests_total{method="POST",route="/v1/sessions",status="201"} 1.0'
        assert line in r.text.splitlines()

    # The listener closes with the app.
    async with httpx.AsyncClient() as scraper:
        try:
            await scraper.get(f"http://127.0.0.1:{port}/metrics", timeout=2)
        except httpx.ConnectError:
            pass
        else:
            raise AssertionError("the metrics port still answers after the app stopped")


async def test_without_a_metrics_port_the_api_serves_metrics(
    api: httpx.AsyncClient, settings: Settings
):
    assert settings.metrics_port is None
    r = await api.get("/metrics")
    assert r.status_code == 200
    assert "sessionmgr_http_requests_total" in r.text
