"""Authentication of every `/v1` call: the bearer token becomes the request's `Principal`,
and the principal's rate limit is spent before any handler runs.

A plain ASGI middleware rather than Litestar's `AbstractAuthenticationMiddleware` and a route
guard: this runs on every request, and the generic versions cost a regex match, a
`Headers` object and a copy of the route handler each time (docs/benchmarks.md). What it
raises (`AuthenticationFailed`, `RateLimited`) reaches the app's exception handlers like any
handler's error, as a 401 or 429 problem.
"""

from __future__ import annotations

from litestar.enums import ScopeType
from litestar.types import ASGIApp, Receive, Scope, Send

from sessionmgr.api.auth import TokenVerifier
from sessionmgr.api.lane import admitted
from sessionmgr.api.ratelimit import RateLimiter
from sessionmgr.domain.errors import MalformedRequest

# Probes, scrapes and the API's own description are open; everything else needs a token.
# The inspector's pages (/ui) check their own signed cookie (sessionmgr.ui.access); /static
# holds only the scripts and styles this service ships.
PUBLIC_PREFIXES = ("/health", "/metrics", "/schema", "/problems", "/ui", "/static")
# Every connection that can reach a route (a websocket route, should one come, included).
_AUTHENTICATED = frozenset({ScopeType.HTTP, ScopeType.WEBSOCKET})


def _authorization(scope: Scope) -> str | None:
    """The one Authorization header; two are a 400 (proxies and servers differ on which wins)."""
    found: str | None = None
    for name, value in scope["headers"]:
        if name == b"authorization" or name.lower() == b"authorization":
            if found is not None:
                raise MalformedRequest("send one Authorization header, not several")
            found = value.decode("latin-1")
    return found


def authentication_middleware(app: ASGIApp) -> ASGIApp:
    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] not in _AUTHENTICATED
            or scope["path"].startswith(PUBLIC_PREFIXES)
            or scope.get("method") == "OPTIONS"  # Litestar answers it itself, with no data
        ):
            await app(scope, receive, send)
            return
        if (principal := admitted(scope)) is not None:  # the read lane verified and charged it
            scope["user"] = principal
            scope["auth"] = None
            await app(scope, receive, send)
            return
        resolved = scope["litestar_app"].state.resolved
        verifier: TokenVerifier = resolved["verifier"]
        principal = await verifier.verify(_authorization(scope))
        scope["user"] = principal
        scope["auth"] = None
        limiter: RateLimiter = resolved["rate_limiter"]
        limiter.take(principal.sub, service="service" in principal.roles)
        await app(scope, receive, send)

    return middleware
