"""`/ui/changes/{id}`: the session's change feed, for a page signed in by cookie.

A browser's EventSource sends cookies, not an Authorization header. The route checks the
cookie like every `/ui` route (sessionmgr.ui.access), then hands the request to the API's own
`GET /v1/sessions/{id}/changes` with the cookie's token as a bearer token, so the feed's rules
(access, rate limit) apply unchanged and its answer (the event stream, or a 404 where the
service has no feed) reaches the page as it is. On anything but a stream the page polls.
"""

from __future__ import annotations

from typing import Any, cast

from litestar.response.base import ASGIResponse
from litestar.types import HTTPScope, Message, Receive, Scope, Send

_KEPT = ("type", "asgi", "http_version", "method", "scheme", "server", "client", "root_path")
_PASSED_HEADERS = frozenset({b"host", b"last-event-id", b"user-agent", b"traceparent"})


class FeedRelay(ASGIResponse):
    """Answers with whatever the app answers to the feed's own URL, as `token`'s bearer."""

    def __init__(self, session_id: str, token: str) -> None:
        self._path = f"/v1/sessions/{session_id}/changes"
        self._token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        inner: dict[str, Any] = {k: scope.get(k) for k in _KEPT if k in scope}
        inner.update(
            method="GET",
            path=self._path,
            raw_path=self._path.encode(),
            query_string=b"",
            headers=[
                *((k, v) for k, v in scope["headers"] if k in _PASSED_HEADERS),
                (b"authorization", f"Bearer {self._token}".encode()),
                (b"accept", b"text/event-stream"),
            ],
        )

        async def relay(message: Message) -> None:
            if message["type"] == "http.response.start":  # the outer request adds its own id
                headers = [(k, v) for k, v in message["headers"] if k.lower() != b"x-request-id"]
                message = {**message, "headers": headers}
            await send(message)

        await scope["litestar_app"](cast("HTTPScope", inner), receive, relay)
