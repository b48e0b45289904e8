"""`Idempotent-Replayed: true` on an answer that repeats an Idempotency-Key's first answer.

Only requests that can carry a key (not GET, HEAD or OPTIONS) pass through the wrapper; the
service marks a replay in `sessionmgr.services.replays`.
"""

from __future__ import annotations

from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from sessionmgr.services.replays import REPLAYED

_READS = frozenset({"GET", "HEAD", "OPTIONS"})
HEADER = (b"idempotent-replayed", b"true")


def replayed_middleware(app: ASGIApp) -> ASGIApp:
    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP or scope["method"] in _READS:
            await app(scope, receive, send)
            return
        token = REPLAYED.set(False)

        async def marking(message: Message) -> None:
            if message["type"] == "http.response.start" and REPLAYED.get():
                message = {**message, "headers": [*message.get("headers", []), HEADER]}
            await send(message)

        try:
            await app(scope, receive, marking)
        finally:
            REPLAYED.reset(token)

    return middleware
