"""The authentication middleware guards every connection that can reach a route: HTTP, and
websockets too (there is no websocket route today; one added later must not be open)."""

from __future__ import annotations

from typing import Any

import pytest
from litestar import Litestar, WebSocket, get, websocket
from litestar.exceptions import WebSocketDisconnect
from litestar.testing import TestClient

from sessionmgr.api.ratelimit import RateLimiter
from sessionmgr.api.security import _authorization, authentication_middleware
from sessionmgr.domain.errors import AuthenticationFailed, MalformedRequest
from sessionmgr.domain.model import Principal


class _Verifier:
    async def verify(self, authorization: str | None) -> Principal:
        if authorization != "Bearer good":
            raise AuthenticationFailed("token signature is invalid")
        return Principal(sub="alice", roles=frozenset())


@websocket("/v1/sessions/events")
async def events(socket: WebSocket[Principal, None, None]) -> None:
    await socket.accept()
    await socket.send_text(f"events for {socket.user.sub}")
    await socket.close()


@get("/health/live", sync_to_thread=False)
def live() -> str:
    return "ok"


def _app() -> Litestar:
    app = Litestar([events, live], middleware=[authentication_middleware])
    app.state.resolved = {"verifier": _Verifier(), "rate_limiter": RateLimiter(0, 1)}
    return app


def test_a_websocket_without_a_good_token_is_refused() -> None:
    with TestClient(_app()) as client:
        for headers in ({}, {"Authorization": "Bearer bad"}):
            with (
                pytest.raises(WebSocketDisconnect),
                client.websocket_connect("/v1/sessions/events", headers=headers) as socket,
            ):
                socket.receive_text()


def test_a_websocket_with_a_good_token_gets_its_principal() -> None:
    with (
        TestClient(_app()) as client,
        client.websocket_connect(
            "/v1/sessions/events", headers={"Authorization": "Bearer good"}
        ) as socket,
    ):
        assert socket.receive_text() == "events for alice"


def test_public_paths_need_no_token() -> None:
    with TestClient(_app()) as client:
        assert client.get("/health/live").text == "ok"


def test_two_authorization_headers_are_refused_whichever_comes_first() -> None:
    # The test client joins repeated headers into one; the ASGI scope a server builds does not
    # (tests/e2e/test_http_limits.py sends two on a real socket).
    for pair in ([b"Bearer good", b"Bearer bad"], [b"Bearer bad", b"Bearer good"]):
        scope: Any = {"headers": [(b"host", b"t"), *((b"authorization", v) for v in pair)]}
        with pytest.raises(MalformedRequest, match="one Authorization header"):
            _authorization(scope)
    one: Any = {"headers": [(b"Authorization", b"Bearer good")]}
    assert _authorization(one) == "Bearer good"
