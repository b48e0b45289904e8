"""The change feed's shared reader on a real redis-server: one Redis connection for hundreds of
subscribers, a slow subscriber gets `reset` in place of what it could not keep (never a gap)
while a fast one on the same session gets everything, and a drain ends every stream."""

from __future__ import annotations

import asyncio
import gc
import secrets
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from sessionmgr.domain.errors import TooManyStreams
from sessionmgr.metrics import Metrics
from sessionmgr.storage import feed
from sessionmgr.storage.feed_hub import FeedHub, FeedItem, Subscription


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def hub(redis_url: str, redis: Redis) -> AsyncIterator[FeedHub]:
    reader = Redis.from_url(redis_url, socket_timeout=5)
    hub = FeedHub(redis, reader, Metrics(), block_ms=500, queue_size=5, heartbeat_s=0.2)
    yield hub
    await hub.stop()
    await reader.aclose()


async def _commit(redis: Redis, sid: str, version: int) -> str:
    async with redis.pipeline(transaction=True) as pipe:
        feed.queue(pipe, sid, [feed.entry(sid, version, "patched", fields=["x"])], 1000)
        (entry_id,) = await pipe.execute()
    return str(entry_id.decode())


async def _take(hub: FeedHub, sub: Subscription, first: list[FeedItem], n: int) -> list[FeedItem]:
    got: list[FeedItem] = []
    stream = hub.events(sub, first)
    try:
        async with asyncio.timeout(5):
            async for item in stream:
                if item is not None:
                    got.append(item)
                if len(got) == n:
                    break
    except TimeoutError:
        raise AssertionError(f"{len(got)} of {n}: {got}") from None
    await stream.aclose()
    return got


async def test_many_subscribers_share_one_reader_connection(hub: FeedHub, redis: Redis) -> None:
    before = len(await redis.client_list())
    subs = []
    for _ in range(200):
        sid = secrets.token_hex(16)
        subs.append((sid, *await hub.open(sid, f"p-{sid}", None, 0)))
    await asyncio.sleep(0.2)
    await _commit(redis, subs[-1][0], 1)
    got = await _take(hub, subs[-1][1], subs[-1][2], 1)
    assert [i.kind for i in got] == ["patched"]
    # the reader's one connection, and at most one pooled connection for the opens
    assert len(await redis.client_list()) - before <= 3
    for _, sub, _ in subs:
        hub.close(sub)


async def test_a_slow_subscriber_gets_reset_never_a_gap(hub: FeedHub, redis: Redis) -> None:
    sid = secrets.token_hex(16)
    slow, slow_first = await hub.open(sid, "slow", None, 0)
    fast, fast_first = await hub.open(sid, "fast", None, 0)
    fast_task = asyncio.create_task(_take(hub, fast, fast_first, 20))
    ids = []
    for version in range(1, 21):  # 20 > the queue's 5; one at a time, as the fast one reads
        ids.append(await _commit(redis, sid, version))
        await asyncio.sleep(0.02)
    everything = await fast_task
    assert [i.id for i in everything] == ids  # the fast one: all, in order, once
    await asyncio.sleep(0.3)  # the reader has handed all 20 to the slow one's queue by now
    stream = hub.events(slow, slow_first)
    reset = await _next(stream)
    assert reset.kind == "reset"
    assert reset.data == feed.entry(sid, 20, "reset", reason="overflow")["d"]
    assert reset.id == ids[-1]  # it stands for everything up to here: resume after it
    later = await _commit(redis, sid, 21)
    after = await _next(stream)
    assert (after.id, after.kind) == (later, "patched")  # and what follows comes next
    await stream.aclose()


async def _next(stream: AsyncIterator[FeedItem | None]) -> FeedItem:
    async with asyncio.timeout(5):
        while (item := await anext(stream)) is None:
            pass
    return item


async def test_a_drain_ends_every_stream_and_refuses_new_ones(hub: FeedHub) -> None:
    sid = secrets.token_hex(16)
    sub, first = await hub.open(sid, "p", None, 0)
    stream = hub.events(sub, first)
    hub.drain()
    async with asyncio.timeout(5):
        rest = [item async for item in stream]
    assert all(item is None for item in rest)  # at most a heartbeat, then the end
    with pytest.raises(Exception, match="stopping"):
        await hub.open(sid, "p", None, 0)


async def test_a_stream_dropped_unstarted_gives_its_place_back(hub: FeedHub) -> None:
    """A client gone before its first byte: the iterator is dropped without ever running."""
    sid = secrets.token_hex(16)
    subs = [await hub.open(sid, "p", None, 0) for _ in range(16)]  # the cap (16)
    with pytest.raises(TooManyStreams):
        await hub.open(sid, "p", None, 0)
    stream = hub.events(*subs[0])
    del stream
    gc.collect()
    sub, _ = await hub.open(sid, "p", None, 0)  # its place was given back
    hub.close(sub)


async def test_concurrent_opens_cannot_pass_the_cap(hub: FeedHub) -> None:
    sid = secrets.token_hex(16)
    opened = await asyncio.gather(
        *(hub.open(sid, "q", None, 0) for _ in range(20)), return_exceptions=True
    )
    refused = [o for o in opened if isinstance(o, TooManyStreams)]
    assert len(refused) == 4
