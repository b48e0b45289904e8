"""The idle sweep on a real redis-server: idle sessions are suspended through the ordinary
suspend (MongoDB gets everything, outbox backlog included), leased or recently written ones
stay hot, and two sweepers never run at once."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import httpx
import msgspec
import pytest
from mongomock_motor import AsyncMongoMockClient
from redis.asyncio import Redis

from sessionmgr import cli
from sessionmgr.api.bridge import resolve
from sessionmgr.container import Container, build_container
from sessionmgr.domain.model import NewEvent, Principal, SessionState
from sessionmgr.metrics import Metrics
from sessionmgr.services.idle import IdleSweeper
from sessionmgr.services.sessions import SessionService
from sessionmgr.settings import Settings, load_settings
from sessionmgr.storage import warm as warm_module
from sessionmgr.storage.hot import IDLE_INDEX, OUTBOX_STREAM, hot_key
from sessionmgr.storage.idle import SWEEP_LOCK, RedisIdleIndex, RedisSweepLock
from sessionmgr.storage.warm import MongoWarmStore
from tests.conftest import JWT_SECRET
from tests.integration.conftest import serving

OWNER = Principal(sub="alice")
IDLE_S = 1.0
WIP = {"notes": "x" * 2000, "step": 3}


async def _wired(container: Container) -> tuple[SessionService, IdleSweeper, MongoWarmStore]:
    return (
        await resolve(container.sessions),
        await resolve(container.idle_sweeper),
        await resolve(container.warm),
    )


async def _busy_session(sessions: SessionService) -> str:
    session = await sessions.create(OWNER, work_in_progress={"first": True})
    sid = session.id
    await sessions.update(OWNER, sid, expected_version=1, patch={"work_in_progress": WIP})
    await sessions.append(OWNER, sid, [NewEvent(kind="note", data={"n": i}) for i in range(25)])
    return sid


async def test_idle_sessions_are_suspended_with_everything_in_mongodb(
    manual_api: httpx.AsyncClient, manual_container: Container, manual_redis: Redis
) -> None:
    sessions, sweeper, warm = await _wired(manual_container)
    ids = [await _busy_session(sessions) for _ in range(3)]
    # No write-behind runs here: MongoDB gets these writes only through the suspend's flush.
    assert await manual_redis.xlen(OUTBOX_STREAM) == 6  # the update and the append
    assert await manual_redis.zcard(IDLE_INDEX) == 3
    await asyncio.sleep(IDLE_S + 0.2)

    result = await sweeper.sweep(idle_after_s=IDLE_S)

    assert result.ran and sorted(result.suspended) == sorted(ids), result
    assert result.failed == [] and result.examined == 3
    for sid in ids:
        assert not await manual_redis.exists(hot_key(sid))
        stored = await warm.get(sid)
        assert stored is not None
        assert (stored.state, stored.version, stored.work_in_progress) == (
            SessionState.DORMANT,
            3,
            WIP,
        )
        events = await warm.all_events(sid)
        assert [e.data["n"] for e in events] == list(range(25))
    assert await manual_redis.zcard(IDLE_INDEX) == 0  # suspended sessions leave the index
    metrics: Metrics = await resolve(manual_container.metrics)
    assert metrics.registry.get_sample_value("sessionmgr_idle_suspended_total") == 3
    assert metrics.registry.get_sample_value("sessionmgr_idle_sweep_duration_seconds_count") == 1
    # A read brings one back, and it is as it was.
    got = await sessions.resume(OWNER, ids[0])
    assert (got.version, got.work_in_progress, len(got.recent_timeline)) == (3, WIP, 20)


async def test_a_leased_or_recently_written_session_stays_hot(
    manual_api: httpx.AsyncClient, manual_container: Container, manual_redis: Redis
) -> None:
    sessions, sweeper, warm = await _wired(manual_container)
    leased = await _busy_session(sessions)
    await sessions.add_participant(OWNER, leased, "planner")  # a live lease (30 s)
    written = await _busy_session(sessions)
    idle = await _busy_session(sessions)
    await asyncio.sleep(IDLE_S + 0.2)
    # The lease is older than IDLE_S but alive; `written` is written again just now.
    await sessions.update(OWNER, written, expected_version=3, patch={"context_summary": {"a": 1}})

    result = await sweeper.sweep(idle_after_s=IDLE_S)

    assert result.suspended == [idle], result
    assert result.in_use == 1  # the leased one (the written one is not even a candidate)
    assert await manual_redis.exists(hot_key(leased), hot_key(written)) == 2
    assert not await manual_redis.exists(hot_key(idle))
    stored = await warm.get(leased)
    assert stored is not None and stored.state is SessionState.ACTIVE
    # Postponed, not forgotten: the leased session is looked at again IDLE_S from now.
    assert await manual_redis.zscore(IDLE_INDEX, leased) is not None
    again = await sweeper.sweep(idle_after_s=IDLE_S)
    assert again.examined == 0


async def test_a_write_after_the_session_was_found_idle_keeps_it_hot(
    manual_api: httpx.AsyncClient, manual_container: Container, manual_redis: Redis
) -> None:
    """The check runs again under the suspend's WATCH: a write that lands after the sweep
    looked at the session (but before its suspend) wins."""
    sessions, sweeper, _ = await _wired(manual_container)
    sid = await _busy_session(sessions)
    await asyncio.sleep(IDLE_S + 0.2)
    hot = await resolve(manual_container.traced_hot)
    real_load = hot.load

    async def load_then_write(session_id: str) -> Any:
        view = await real_load(session_id)
        await sessions.update(OWNER, sid, expected_version=3, patch={"context_summary": {"b": 2}})
        return view

    sweeper._hot = type("Hot", (), {"load": staticmethod(load_then_write)})()
    result = await sweeper.sweep(idle_after_s=IDLE_S)

    assert result.suspended == [] and result.in_use == 1, result
    assert await manual_redis.exists(hot_key(sid))


async def test_a_backfill_indexes_sessions_hot_before_the_index_existed(
    manual_api: httpx.AsyncClient, manual_container: Container, manual_redis: Redis
) -> None:
    sessions, sweeper, _ = await _wired(manual_container)
    ids = [await _busy_session(sessions) for _ in range(3)]
    assert await manual_redis.zscore(IDLE_INDEX, ids[0]) is not None
    await manual_redis.zrem(IDLE_INDEX, ids[1], ids[2])  # hot before the upgrade
    await asyncio.sleep(IDLE_S + 0.2)
    assert (await sweeper.sweep(idle_after_s=IDLE_S)).suspended == [ids[0]]

    assert await sweeper.backfill() == 2

    for sid in ids[1:]:
        record = await sessions.get(OWNER, sid)
        assert await manual_redis.zscore(IDLE_INDEX, sid) == record.last_active.timestamp()
    result = await sweeper.sweep(idle_after_s=IDLE_S)
    assert sorted(result.suspended) == sorted(ids[1:])
    assert await sweeper.backfill() == 0  # nothing hot is left unindexed


async def test_two_sweepers_never_run_at_once(
    manual_api: httpx.AsyncClient, manual_container: Container, manual_redis: Redis
) -> None:
    sessions, _, _ = await _wired(manual_container)
    ids = [await _busy_session(sessions) for _ in range(4)]
    await asyncio.sleep(IDLE_S + 0.2)
    hot = await resolve(manual_container.traced_hot)

    def sweeper() -> IdleSweeper:  # as two replicas build theirs
        return IdleSweeper(
            hot=hot,
            suspend=sessions.suspend_unattended,
            index=RedisIdleIndex(manual_redis),
            lock=RedisSweepLock(manual_redis),
            idle_after_s=IDLE_S,
            batch=2,
        )

    first, second = await asyncio.gather(sweeper().sweep(), sweeper().sweep())

    assert sorted([first.ran, second.ran]) == [False, True]
    winner = first if first.ran else second
    assert sorted(winner.suspended) == sorted(ids)
    assert not await manual_redis.exists(SWEEP_LOCK)  # released once done
    assert (await sweeper().sweep()).ran


async def test_the_lock_is_released_and_extended_only_by_its_holder(
    manual_redis: Redis,
) -> None:
    lock, other = RedisSweepLock(manual_redis), RedisSweepLock(manual_redis)
    token = await lock.acquire(5_000)
    assert token is not None
    assert await other.acquire(5_000) is None
    await other.release("not-the-token")
    assert not await other.extend("not-the-token", 60_000)
    assert await manual_redis.get(SWEEP_LOCK) == token.encode()
    assert await lock.extend(token, 60_000)
    assert 5_000 < await manual_redis.pttl(SWEEP_LOCK) <= 60_000
    await lock.release(token)
    assert await other.acquire(5_000) is not None


async def test_a_dry_run_lists_and_changes_nothing(
    manual_api: httpx.AsyncClient, manual_container: Container, manual_redis: Redis
) -> None:
    sessions, sweeper, _ = await _wired(manual_container)
    ids = [await _busy_session(sessions) for _ in range(3)]
    await asyncio.sleep(IDLE_S + 0.2)
    lines: list[str] = []

    result = await sweeper.sweep(dry_run=True, idle_after_s=IDLE_S, report=lines.append)

    assert sorted(result.suspended) == sorted(ids)
    assert sorted(lines) == sorted(f"would suspend {sid}" for sid in ids)
    assert await manual_redis.exists(*[hot_key(sid) for sid in ids]) == 3
    assert await manual_redis.zcard(IDLE_INDEX) == 3


def _tuned(settings: Settings, **changes: Any) -> Settings:
    return msgspec.structs.replace(settings, **changes)


async def test_the_background_sweep_runs_in_each_replica(settings: Settings) -> None:
    container = build_container(_tuned(settings, idle_suspend_after=1, idle_sweep_interval_s=0.2))
    async with serving(container):
        assert isinstance(await resolve(container.idle_sweep), IdleSweeper)
        sessions, _, warm = await _wired(container)
        sid = await _busy_session(sessions)
        stored = None
        for _ in range(50):
            await asyncio.sleep(0.1)
            stored = await warm.get(sid)
            if stored is not None and stored.state is SessionState.DORMANT:
                break
        assert stored is not None and stored.state is SessionState.DORMANT
        redis: Redis = await resolve(container.redis)
        assert not await redis.exists(hot_key(sid))


async def test_the_background_sweep_can_be_turned_off(settings: Settings) -> None:
    off = _tuned(settings, idle_sweep=False, idle_suspend_after=1, idle_sweep_interval_s=0.1)
    container = build_container(off)
    async with serving(container):
        assert await resolve(container.idle_sweep) is None
        sessions, _, _ = await _wired(container)
        sid = await _busy_session(sessions)
        await asyncio.sleep(1.5)
        redis: Redis = await resolve(container.redis)
        assert await redis.exists(hot_key(sid))


@pytest.fixture
def cli_environment(monkeypatch: pytest.MonkeyPatch, redis_url: str) -> None:
    for name in list(os.environ):
        if name.startswith("SESSIONMGR_"):
            monkeypatch.delenv(name)
    for name, value in {
        "SESSIONMGR_REDIS_URL": redis_url,
        "SESSIONMGR_MONGODB_URI": "mongomock://",
        "SESSIONMGR_JWT_SECRET": JWT_SECRET,
        "SESSIONMGR_IDLE_SUSPEND_AFTER": "1s",
    }.items():
        monkeypatch.setenv(name, value)
    shared = AsyncMongoMockClient(tz_aware=True)
    monkeypatch.setattr(warm_module, "mongo_client", lambda settings: shared)


async def test_the_cli_sweeps_once(
    cli_environment: None, capsys: pytest.CaptureFixture[str]
) -> None:
    container = build_container(load_settings(), write_behind=False)
    try:
        sessions, _, warm = await _wired(container)
        ids = [await _busy_session(sessions) for _ in range(2)]
    finally:
        await container.shutdown_resources()  # type: ignore[misc]
    await asyncio.sleep(IDLE_S + 0.2)

    assert await asyncio.to_thread(cli.main, ["idle-sweep", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dry run: 2 session(s) would be suspended" in out
    assert all(f"would suspend {sid}" in out for sid in ids)

    assert await asyncio.to_thread(cli.main, ["idle-sweep", "--backfill"]) == 0
    out = capsys.readouterr().out
    assert "backfill: 0 hot session(s) added to the index" in out, out
    assert "done: 2 suspended, 0 in use, 0 gone, 0 failed" in out, out
    for sid in ids:
        stored = await warm.get(sid)
        assert stored is not None and stored.state is SessionState.DORMANT
