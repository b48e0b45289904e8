"""Regressions found where the cold tier meets the breakers and retries (a review after the merge).

Each reproduces a lost reply or an open breaker around an archive step and shows the step
still ends right: no fence left behind under a token nobody holds, no finished archive
reported as a conflict, no archive outcome replaced by a failed fence release.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from fakeredis import FakeAsyncRedis
from mongomock_motor import AsyncMongoMockClient
from pymongo.errors import AutoReconnect
from redis.asyncio.client import Pipeline
from redis.exceptions import ConnectionError as RedisConnectionError

from sessionmgr.domain.errors import BackendUnavailable
from sessionmgr.domain.model import SessionRecord, SessionState, TimelineEvent
from sessionmgr.metrics import Metrics
from sessionmgr.services.archive import Archivist, sweep
from sessionmgr.services.resilience import Breaker, Guarded, RetryPolicy
from sessionmgr.storage.hot import RedisHotStore, fence_key
from sessionmgr.storage.warm import MongoWarmStore


def lose_first_reply(monkeypatch: pytest.MonkeyPatch) -> dict[str, bool]:
    """The first pipeline EXEC runs on the server, then its reply is lost."""
    original = Pipeline.execute
    state = {"lost": False}

    async def execute(self, *a, **k):
        result = await original(self, *a, **k)
        if not state["lost"]:
            state["lost"] = True
            raise RedisConnectionError("reply lost")
        return result

    monkeypatch.setattr(Pipeline, "execute", execute)
    return state


async def test_a_fence_whose_reply_was_lost_is_released_not_left_for_its_ttl(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    redis = FakeAsyncRedis()
    hot = Guarded(RedisHotStore(redis), Breaker("redis"), RetryPolicy(), Metrics())
    lose_first_reply(monkeypatch)
    with pytest.raises(BackendUnavailable) as info:
        await hot.fence("s1", 300)  # applied, reply lost: not retried, our fence released
    assert info.value.backend == "redis"
    assert not info.value.retryable
    assert await redis.exists(fence_key("s1")) == 0
    token = await hot.fence("s1", 300)  # the archive runs again and takes it
    assert token is not None
    assert (await redis.get(fence_key("s1"))).decode() == token


class MemCold:
    def __init__(self):
        self.objects = {}

    async def ping(self):
        pass

    async def put(self, key, body):
        self.objects[key] = body

    async def get(self, key):
        return self.objects.get(key)

    async def size(self, key):
        b = self.objects.get(key)
        return None if b is None else len(b)

    async def delete(self, key):
        self.objects.pop(key, None)


def _record(sid: str) -> SessionRecord:
    old = datetime.now(UTC).replace(microsecond=0) - timedelta(days=30)
    return SessionRecord(
        id=sid,
        version=1,
        state=SessionState.DORMANT,
        owner_id="alice",
        acl=[],
        created_at=old,
        last_active=old,
        participants={},
        work_in_progress={"a": 1},
        context_summary={},
        timeline_seq=1,
    )


async def _stack(redis):
    metrics = Metrics()
    policy = RetryPolicy()
    raw_warm = MongoWarmStore(AsyncMongoMockClient(tz_aware=True), "t")
    hot = Guarded(RedisHotStore(redis), Breaker("redis"), policy, metrics)
    warm = Guarded(raw_warm, Breaker("mongodb"), policy, metrics)
    cold = Guarded(MemCold(), Breaker("s3"), policy, metrics)
    return raw_warm, Archivist(hot, warm, cold, metrics)


async def test_a_stub_write_whose_reply_was_lost_counts_as_done() -> None:
    raw_warm, archivist = await _stack(FakeAsyncRedis())
    rec = _record("b" * 32)
    await raw_warm.insert(rec)
    ev = TimelineEvent(seq=1, at=rec.created_at, actor="alice", kind="k", data={})
    await raw_warm.apply(rec, [ev])
    original = raw_warm._sessions.replace_one
    lost = {"done": False}

    async def replace_one(*a, **k):
        result = await original(*a, **k)
        if not lost["done"]:
            lost["done"] = True
            raise AutoReconnect("reply lost")
        return result

    raw_warm._sessions.replace_one = replace_one
    lines = []
    result = await sweep(archivist, timedelta(days=1), limit=10, dry_run=False, report=lines.append)
    stored = await raw_warm.stored(rec.id)
    assert lost["done"]
    assert stored is not None and stored.archive is not None and not stored.purge_pending
    assert (result.archived, result.skipped, result.failed) == (1, 0, []), lines
    assert not await raw_warm.all_events(rec.id)  # the archive finished: events purged


async def test_an_open_redis_breaker_at_the_fence_release_does_not_fail_the_archive() -> None:
    redis = FakeAsyncRedis()
    metrics, policy = Metrics(), RetryPolicy()
    raw_warm = MongoWarmStore(AsyncMongoMockClient(tz_aware=True), "t")
    rbreaker = Breaker("redis")
    cold = MemCold()
    real_put = cold.put

    async def put(key, body):
        await real_put(key, body)
        rbreaker._cb.open()  # other traffic trips the Redis breaker meanwhile (5 s)

    cold.put = put
    archivist = Archivist(
        Guarded(RedisHotStore(redis), rbreaker, policy, metrics),
        Guarded(raw_warm, Breaker("mongodb"), policy, metrics),
        Guarded(cold, Breaker("s3"), policy, metrics),
        metrics,
    )
    rec = _record("c" * 32)
    await raw_warm.insert(rec)
    await raw_warm.apply(
        rec, [TimelineEvent(seq=1, at=rec.created_at, actor="a", kind="k", data={})]
    )
    done = await archivist.archive(rec.id)  # the release fails fast: logged, not raised
    assert done.by_us
    stored = await raw_warm.stored(rec.id)
    assert stored is not None and stored.archive is not None
    assert 0 < await redis.ttl(fence_key(rec.id)) <= 300  # released by its TTL instead
