"""The parts that read across partitions, on a real Redis Cluster: the change feed's reader
(it polls each slot: no XREAD spans slots), the outbox's operator view, the idle index, and
what `sessionmgr check` says of the Cluster."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest

from sessionmgr.metrics import Metrics
from sessionmgr.settings import Settings
from sessionmgr.storage import feed, keys
from sessionmgr.storage.feed_hub import FeedHub
from sessionmgr.storage.hot import redis_client
from sessionmgr.storage.idle import RedisIdleIndex
from sessionmgr.storage.outbox import OutboxAdmin, RedisOutbox
from sessionmgr.storage.redis_nodes import SessionmgrCluster, nodes_of
from sessionmgr.storage.redis_report import describe


@pytest.fixture
async def cluster(settings: Settings) -> AsyncIterator[SessionmgrCluster]:
    client = redis_client(settings, socket_timeout_s=5)
    assert isinstance(client, SessionmgrCluster)
    yield client
    await client.aclose()


def spread(n: int) -> list[str]:
    """`n` session ids, each in a partition of its own."""
    found: dict[int, str] = {}
    while len(found) < n:
        sid = uuid.uuid4().hex
        found.setdefault(keys.partition_of(sid), sid)
    return list(found.values())


async def test_the_feed_reader_follows_sessions_on_every_master(
    cluster: SessionmgrCluster, settings: Settings
) -> None:
    reader = redis_client(settings, socket_timeout_s=5)
    hub = FeedHub(cluster, reader, Metrics(), queue_size=50, heartbeat_s=5)
    sids = spread(6)
    subs = [await hub.open(sid, f"p{i}", None, 0) for i, sid in enumerate(sids)]
    for version in (1, 2):
        for sid in sids:
            node = await nodes_of(cluster).of(keys.feed(sid))
            async with node.pipeline(transaction=True) as pipe:
                feed.queue(pipe, sid, [feed.entry(sid, version, "patched", fields=[])], 100)
                await pipe.execute()
    for sid, (sub, first) in zip(sids, subs, strict=True):
        got = []
        stream = hub.events(sub, first)
        async with asyncio.timeout(5):
            async for item in stream:
                if item is not None:
                    got.append(item)
                if len(got) == 2:
                    break
        await stream.aclose()
        assert [(i.kind, sid in i.data.decode()) for i in got] == [("patched", True)] * 2
    await hub.stop()
    await reader.aclose()


async def test_dead_letters_on_several_masters_are_listed_and_replayed(
    cluster: SessionmgrCluster,
) -> None:
    outbox = RedisOutbox(cluster, poll_ms=10)
    await outbox.ensure_group()
    sids = spread(6)
    for sid in sids:
        await cluster.xadd(keys.outbox(keys.partition_of(sid)), {"sid": sid, "junk": b"x"})
    taken = await outbox.read("w", ">", 10, block_ms=10)
    assert len(taken) == 6
    for delivery in taken:
        await outbox.park(delivery, "undecodable", 1)
    admin = OutboxAdmin(cluster)
    status = await admin.status()
    assert status.pending == 0 and status.dead_letters == 6
    assert {d.session_id for d in status.dead} == set(sids)
    assert len(await admin.replay()) == 6
    assert await outbox.pending() == 6 and await outbox.dead_letters() == 0


async def test_the_idle_index_reads_every_master(cluster: SessionmgrCluster) -> None:
    index = RedisIdleIndex(cluster)
    sids = spread(9)
    for age, sid in enumerate(sids):
        await cluster.zadd(keys.idle_index(keys.partition_of(sid)), {sid: 100 + age})
    assert await index.size() == 9
    assert [s for s, _ in await index.older_than(105, 4)] == sids[:4]
    assert await index.forget(sids[0], 105)
    assert await index.size() == 8


async def test_check_describes_the_cluster(cluster: SessionmgrCluster, settings: Settings) -> None:
    await keys.check_layout(cluster)
    note, _warnings = await describe(cluster, settings)
    assert "redis cluster ok" in note
    assert "3 master(s), 3 replica(s)" in note
    assert "16384 of 16384 slots served" in note
    assert f"key layout {keys.expected_layout()}" in note
