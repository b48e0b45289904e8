"""The container → Litestar bridge: what a request needs is taken from the container once.

The container's resources open in the app's lifespan; right after, `resolve_at_startup` puts
the objects every request uses (singletons: the session service, the token verifier, the rate
limiter) in `app.state.resolved`, so a request neither calls a provider nor goes through
Litestar's dependency injection to get them."""

from __future__ import annotations

import inspect
from typing import Any

from litestar import Litestar
from litestar.connection import ASGIConnection

PER_REQUEST = ("sessions", "verifier", "rate_limiter")


async def resolve(provider: Any) -> Any:
    """Call a provider; those that depend on an async resource return an awaitable."""
    result = provider()
    if inspect.isawaitable(result):
        result = await result
    return result


async def resolve_at_startup(app: Litestar) -> None:
    """An `on_startup` hook: runs after the lifespan has opened the container's resources."""
    container = app.state.container
    app.state.resolved = {name: await resolve(getattr(container, name)) for name in PER_REQUEST}


async def forget_at_shutdown(app: Litestar) -> None:
    app.state.pop("resolved", None)


def resolved(connection: ASGIConnection[Any, Any, Any, Any], name: str) -> Any:
    """The container's `name` object, as taken at start-up."""
    return connection.app.state.resolved[name]
