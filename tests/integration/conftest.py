"""Integration fixtures: the app on a real redis-server, and handles on its Redis and MongoDB.

Litestar's `AsyncTestClient` (the shared `client` fixture) hands every request to a blocking
portal on another thread, so requests sent with `asyncio.gather` still run one at a time
and the app's clients live on the portal's event loop. These tests need real concurrency
and want to read the app's Redis and MongoDB themselves, so they run the app in the test's
own event loop: `Litestar.lifespan()` opens the container's resources, and an
`httpx.AsyncClient` on `httpx.ASGITransport` sends the requests.

`api`/`redis`/`warm` serve an app with its in-process write-behind worker; the `manual_*`
fixtures serve one without it, so a test can drive `WriteBehindWorker`s by hand.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import fakeredis
import httpx
import msgspec
import pytest
from redis.asyncio import Redis

from sessionmgr.api.bridge import resolve
from sessionmgr.app import create_app
from sessionmgr.container import Container, build_container
from sessionmgr.settings import Settings
from sessionmgr.storage.warm import MongoWarmStore


@asynccontextmanager
async def serving(container: Container) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan open, behind an in-loop HTTP client.

    The lifespan runs in a task of its own: anyio's task groups inside it must be left by the
    task that entered them, and pytest-asyncio may tear a fixture down from another task.
    """
    app = create_app(container)
    started, stop = asyncio.Event(), asyncio.Event()

    async def hold_lifespan() -> None:
        async with app.lifespan():
            started.set()
            await stop.wait()

    lifespan = asyncio.create_task(hold_lifespan(), name="app-lifespan")
    waiter = asyncio.create_task(started.wait())
    await asyncio.wait([lifespan, waiter], return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    if not started.is_set():
        await lifespan  # start-up failed: raise its error here
        raise RuntimeError("the app's lifespan ended during start-up")
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver.local") as c:
            yield c
    finally:
        stop.set()
        await _shut_down(lifespan)


# Generous: a shutdown drains the write-behind for at most its own grace period.
SHUTDOWN_BOUND_S = 60.0


async def _shut_down(lifespan: asyncio.Task[None]) -> None:
    """Wait for the app's shutdown, but never for ever: a shutdown that hangs fails the test
    with where it hung, instead of holding the whole run until CI's limit."""
    done, _ = await asyncio.wait([lifespan], timeout=SHUTDOWN_BOUND_S)
    if done:
        lifespan.result()
        return
    where = io.StringIO()
    lifespan.print_stack(file=where)
    lifespan.cancel()
    raise AssertionError(
        f"the app's shutdown took over {SHUTDOWN_BOUND_S:.0f} s; it was at:\n{where.getvalue()}"
    )


@pytest.fixture
def app_container(settings: Settings) -> Container:
    return build_container(settings)


@pytest.fixture
async def api(app_container: Container) -> AsyncIterator[httpx.AsyncClient]:
    async with serving(app_container) as http:
        yield http


@pytest.fixture
def limited(settings: Settings) -> Container:
    """A rate limit: five requests at once per principal, then one every 100 s (none refills
    in a test)."""
    return build_container(
        msgspec.structs.replace(settings, rate_limit_per_s=0.01, rate_limit_burst=5)
    )


@pytest.fixture
async def limited_api(limited: Container) -> AsyncIterator[httpx.AsyncClient]:
    async with serving(limited) as http:
        yield http


@pytest.fixture
async def redis(api: httpx.AsyncClient, app_container: Container) -> Redis:
    """The app's own Redis client (the container's resources are open once `api` is)."""
    return await resolve(app_container.redis)


@pytest.fixture
async def warm(api: httpx.AsyncClient, app_container: Container) -> MongoWarmStore:
    return await resolve(app_container.warm)


@pytest.fixture
def manual_container(settings: Settings) -> Container:
    return build_container(settings, write_behind=False)


@pytest.fixture
async def manual_api(manual_container: Container) -> AsyncIterator[httpx.AsyncClient]:
    async with serving(manual_container) as http:
        yield http


@pytest.fixture
async def manual_redis(manual_api: httpx.AsyncClient, manual_container: Container) -> Redis:
    return await resolve(manual_container.redis)


@pytest.fixture
async def manual_warm(manual_api: httpx.AsyncClient, manual_container: Container) -> MongoWarmStore:
    return await resolve(manual_container.warm)


@pytest.fixture(params=["redis-server", "fakeredis"])
async def store_redis(request: pytest.FixtureRequest, redis_url: str) -> AsyncIterator[Redis]:
    """A client for tests of `RedisHotStore` itself: the private redis-server, then fakeredis
    with Lua (the scripts run on both)."""
    if request.param == "fakeredis":
        redis: Redis = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    else:
        redis = Redis.from_url(redis_url)
    yield redis
    await redis.aclose()
