"""The container → Litestar bridge: what a request needs is taken from the container once.

The container's resources open in the app's lifespan; right after, `resolve_at_startup` puts
the objects every request uses (singletons: the session service, the token verifier, the rate
limiter) in `app.state.resolved`, so a request neither calls a provider nor goes through
Litestar's dependency injection to get them."""

from __future__ import annotations

import gc
import inspect
import logging
from typing import Any

from litestar import Litestar
from litestar.connection import ASGIConnection

log = logging.getLogger(__name__)
PER_REQUEST = ("sessions", "verifier", "rate_limiter", "feed")


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


async def freeze_startup_heap(app: Litestar) -> None:
    """An `on_startup` hook, last: move what start-up built out of the collector's reach.

    A replica starts with 185 000-195 000 long-lived objects (the app, its routes and schemas,
    the modules, the AWS SDK's service models), and CPython's full collection walks all of
    them: about 95 ms in which no request is answered (`python -m bench.heap`), and often
    enough under load to cost a third of a hot GET's CPU (docs/benchmarks.md). `gc.freeze()`
    puts them in the permanent generation, so a full collection walks only what the service
    allocated since. `SESSIONMGR_GC_FREEZE=false` turns it off (the tests do: they build
    hundreds of apps in one process).
    """
    if not app.state.container.settings().gc_freeze:
        return
    gc.collect()  # start-up's own garbage first, so that none of it is kept for good
    gc.freeze()
    log.info("start-up heap frozen: %d objects out of the collector's reach", gc.get_freeze_count())


async def forget_at_shutdown(app: Litestar) -> None:
    app.state.pop("resolved", None)


def resolved(connection: ASGIConnection[Any, Any, Any, Any], name: str) -> Any:
    """The container's `name` object, as taken at start-up."""
    return connection.app.state.resolved[name]
