"""`BoundedPool` on a real redis-server: never more than `max_connections`, a caller waits
for a free one up to `timeout`, and a wake-up is never lost to a caller that left."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from sessionmgr.settings import Settings
from sessionmgr.storage.hot import redis_client
from sessionmgr.storage.redis_pool import BoundedPool


@pytest.fixture
async def pool(redis_url: str) -> AsyncIterator[BoundedPool]:
    pool = BoundedPool.from_url(redis_url, max_connections=2, timeout=0.3)
    yield pool
    await pool.aclose()


async def test_the_service_client_uses_it_with_the_configured_size(settings: Settings) -> None:
    client = redis_client(settings)
    try:
        assert isinstance(client.connection_pool, BoundedPool)
        assert client.connection_pool.max_connections == settings.redis_pool_size
        assert await client.ping()
    finally:
        await client.aclose()


async def test_many_concurrent_commands_share_at_most_max_connections(
    pool: BoundedPool,
) -> None:
    client = Redis(connection_pool=pool)
    in_use: list[int] = []

    async def one(i: int) -> bytes | None:
        await client.set(f"k{i}", i)
        in_use.append(len(pool._in_use_connections))
        return await client.get(f"k{i}")  # type: ignore[no-any-return]

    answers = await asyncio.gather(*(one(i) for i in range(50)))

    assert answers == [str(i).encode() for i in range(50)]
    assert max(in_use) <= 2
    assert len(pool._available_connections) + len(pool._in_use_connections) <= 2
    assert not pool._in_use_connections


async def test_a_caller_waits_for_a_release_then_gets_the_connection(pool: BoundedPool) -> None:
    held = [await pool.get_connection(), await pool.get_connection()]
    waiting = asyncio.create_task(pool.get_connection())
    await asyncio.sleep(0.05)
    assert not waiting.done()

    await pool.release(held[0])
    got = await asyncio.wait_for(waiting, 1)

    assert got is held[0]
    for connection in (got, held[1]):
        await pool.release(connection)


async def test_a_full_pool_answers_no_connection_after_the_timeout(pool: BoundedPool) -> None:
    held = [await pool.get_connection(), await pool.get_connection()]
    loop = asyncio.get_running_loop()
    started = loop.time()

    with pytest.raises(RedisConnectionError, match="No connection available"):
        await pool.get_connection()

    assert 0.25 <= loop.time() - started < 1.0
    for connection in held:
        await pool.release(connection)
    assert not pool._waiters or all(w.done() for w in pool._waiters)


async def test_a_wake_up_for_a_caller_that_left_goes_to_the_next_one(pool: BoundedPool) -> None:
    held = [await pool.get_connection(), await pool.get_connection()]
    first = asyncio.create_task(pool.get_connection())
    second = asyncio.create_task(pool.get_connection())
    await asyncio.sleep(0.05)

    await pool.release(held[0])  # wakes `first` ...
    first.cancel()  # ... which leaves before it runs
    got = await asyncio.wait_for(second, 1)

    assert got is held[0]
    with pytest.raises(asyncio.CancelledError):
        await first
    for connection in (got, held[1]):
        await pool.release(connection)


async def test_a_connection_that_reconnects_on_release_still_counts_until_it_is_back(
    pool: BoundedPool,
) -> None:
    """Found in review: release() used to take it out of use before disconnecting it, so a
    caller could open one more meanwhile and the pool handed out max + 1."""
    first, second = await pool.get_connection(), await pool.get_connection()
    first.mark_for_reconnect()
    releasing = asyncio.create_task(pool.release(first))
    await asyncio.sleep(0)  # the release is now disconnecting `first`
    taker = asyncio.create_task(pool.get_connection())
    await releasing
    taken = await asyncio.wait_for(taker, 1)

    assert taken is first
    assert len(pool._in_use_connections) == 2
    with pytest.raises(RedisConnectionError, match="No connection available"):
        await pool.get_connection()
    for connection in (taken, second):
        await pool.release(connection)


async def test_a_cancelled_release_still_returns_the_connection_and_wakes_a_waiter(
    pool: BoundedPool,
) -> None:
    first, second = await pool.get_connection(), await pool.get_connection()
    waiting = asyncio.create_task(pool.get_connection())
    await asyncio.sleep(0.05)
    first.mark_for_reconnect()
    releasing = asyncio.create_task(pool.release(first))
    await asyncio.sleep(0)
    releasing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await releasing

    got = await asyncio.wait_for(waiting, 1)
    assert got is first
    for connection in (got, second):
        await pool.release(connection)


async def test_during_redis_py_maintenance_a_checkout_waits_for_the_pool_lock(
    pool: BoundedPool,
) -> None:
    """redis-py's MOVING handling rewrites the lists under the pool's lock, with the pool
    told it is in maintenance: a checkout then waits for that lock."""
    async with pool._lock:
        pool.set_in_maintenance(True)
        checkout = asyncio.create_task(pool.get_connection())
        await asyncio.sleep(0.05)
        assert not checkout.done()
        pool.set_in_maintenance(False)
    connection = await asyncio.wait_for(checkout, 1)
    await pool.release(connection)
    assert not pool._in_use_connections
