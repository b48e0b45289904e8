"""The hot read script runs by its digest (EVALSHA), on redis-server and on fakeredis with Lua,
and still answers when Redis has forgotten it (a restart or SCRIPT FLUSH)."""

from __future__ import annotations

from redis.asyncio import Redis

from sessionmgr.services.ports import HotView
from sessionmgr.storage.hot import _READ_SHA, RedisHotStore
from tests.unit.factories import SessionRecordFactory


async def test_a_read_loads_the_script_once_and_survives_a_flush(store_redis: Redis) -> None:
    store = RedisHotStore(store_redis)
    record = SessionRecordFactory.build()
    await store.create(record, None, b"{}")

    await store_redis.script_flush()
    assert await store_redis.script_exists(_READ_SHA) == [False]
    view = await store.load(record.id)  # NOSCRIPT: sent once as EVAL
    assert view is not None and view.record.id == record.id
    assert await store_redis.script_exists(_READ_SHA) == [True]
    again = await store.load(record.id)  # by digest from now on
    assert again is not None and again.record == view.record
    assert await store.load("0" * 32) is None


async def test_an_update_reads_through_the_script_after_a_flush(store_redis: Redis) -> None:
    store = RedisHotStore(store_redis)
    record = SessionRecordFactory.build()
    await store.create(record, None, b"{}")
    await store_redis.script_flush()
    seen: list[int] = []

    def decide(view: HotView) -> None:
        seen.append(view.record.version)
        # nothing to write: no change

    assert await store.transact(record.id, decide, None) is None
    assert seen == [record.version]
