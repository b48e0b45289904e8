"""The partitioned key layout on one redis-server, at the default of 256 partitions: the
write-behind and the operator's outbox commands over every partition, the idle index merged
across partitions, the layout recorded and enforced, and the move from the old layout."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import msgspec
import pytest
import redis as redis_sync
from redis.asyncio import Redis

from sessionmgr import container as container_module
from sessionmgr.api.auth import issue_token
from sessionmgr.container import build_container
from sessionmgr.domain.errors import BackendUnavailable
from sessionmgr.settings import Settings
from sessionmgr.storage import keys
from sessionmgr.storage.hot import OutboxEntry, RedisHotStore, hot_key, lease_key
from sessionmgr.storage.idle import RedisIdleIndex
from sessionmgr.storage.migrate import migrate_layout, new_name
from sessionmgr.storage.outbox import OutboxAdmin, RedisOutbox
from sessionmgr.storage.warm import MongoWarmStore
from tests.conftest import JWT_SECRET
from tests.integration.conftest import serving
from tests.integration.session_api import create_session, eventually, get_session, patch_session
from tests.unit.factories import SessionRecordFactory

Headers = dict[str, str]
PARTITIONS = keys.DEFAULT_PARTITIONS
PATCH = {"expected_version": 2, "patch": {"work_in_progress": {"v": 2}}}


@pytest.fixture
def partitioned(settings: Settings) -> Iterator[Settings]:
    keys.configure(PARTITIONS)
    yield msgspec.structs.replace(settings, redis_partitions=PARTITIONS)
    # The shared redis-server now holds another layout: leave it empty for the next test
    # (the `serve` processes of other suites use it without flushing it first).
    with redis_sync.Redis.from_url(settings.redis_url) as client:
        client.flushall()


@pytest.fixture
async def app(partitioned: Settings) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    container = build_container(partitioned)
    async with serving(container) as http:
        yield http, container


async def start_refused(settings: Settings) -> str:
    """Why the replica refuses this Redis: at start, or (when Redis did not answer its check
    in time at start, as happens on a loaded machine) at its first write, a 503."""
    try:
        async with serving(build_container(settings)) as api:
            created = await api.post("/v1/sessions", json={}, headers=_anyone())
            assert created.status_code == 503, created.text
            return str(created.json()["detail"])
    except BaseException as exc:
        found = _find(exc)
        if found is None:
            raise
        return str(found)


def _anyone() -> Headers:
    return {"Authorization": f"Bearer {issue_token(JWT_SECRET, 'layout-check')}"}


def _find(exc: BaseException) -> keys.LayoutMismatch | None:
    if isinstance(exc, keys.LayoutMismatch):
        return exc
    for inner in [*getattr(exc, "exceptions", ()), exc.__cause__, exc.__context__]:
        if inner is not None and (found := _find(inner)) is not None:
            return found
    return None


async def test_writes_to_many_partitions_all_reach_mongodb(
    app: tuple[httpx.AsyncClient, Any], auth: Callable[..., Headers]
) -> None:
    api, container = app
    owner = auth()
    sids = [(await create_session(api, owner))["id"] for _ in range(40)]
    assert len({keys.partition_of(s) for s in sids}) > 30
    for sid in sids:
        await patch_session(api, owner, sid, 1, work_in_progress={"n": sid})
    redis: Redis = await container.redis()
    warm: MongoWarmStore = await container.warm()
    outbox = RedisOutbox(redis)
    assert await eventually(outbox.pending, lambda n: n == 0, timeout_s=10) == 0
    for sid in sids:
        stored = await warm.get(sid)
        assert stored is not None and stored.version == 2, sid
        assert stored.work_in_progress == {"n": sid}
    assert await RedisIdleIndex(redis).size() == 40


async def test_entries_of_a_dead_consumer_are_claimed_in_every_partition(
    redis_url: str, partitioned: Settings
) -> None:
    redis = Redis.from_url(redis_url)
    outbox = RedisOutbox(redis, poll_ms=10)
    await outbox.ensure_group()
    sids = [uuid.uuid4().hex for _ in range(12)]
    for sid in sids:
        await redis.xadd(keys.outbox(keys.partition_of(sid)), {"sid": sid, "entry": b"{}"})
    taken = await outbox.read("crashed", ">", 100, block_ms=10)
    assert len(taken) == 12
    assert {d.id.split(b"/")[0] for d in taken} == {
        str(keys.partition_of(s)).encode() for s in sids
    }
    assert {c.name: c.pending for c in await outbox.consumers()} == {"crashed": 12}
    await asyncio.sleep(0.05)
    cursor, claimed = await outbox.claim("survivor", 10, "0-0", 100)
    assert cursor == "0-0"
    assert sorted(d.id for d in claimed) == sorted(d.id for d in taken)
    pending_again = await outbox.read("survivor", "0", 5)
    assert len(pending_again) == 5  # its pending list, paged across partitions
    rest = await outbox.read("survivor", pending_again[-1].id, 100)
    assert len(rest) == 7 and not {d.id for d in rest} & {d.id for d in pending_again}
    for delivery in claimed:
        await outbox.ack(delivery.id)
    assert await outbox.pending() == 0
    await redis.aclose()


async def test_dead_letters_of_several_partitions_are_listed_replayed_and_dropped(
    redis_url: str, partitioned: Settings
) -> None:
    redis = Redis.from_url(redis_url)
    outbox = RedisOutbox(redis)
    await outbox.ensure_group()
    sids: list[str] = []
    while len(sids) < 3:  # three sessions, three partitions
        sid = uuid.uuid4().hex
        if keys.partition_of(sid) not in {keys.partition_of(s) for s in sids}:
            sids.append(sid)
    for sid in sids:
        await redis.xadd(keys.outbox(keys.partition_of(sid)), {"sid": sid, "junk": b"x"})
    for delivery in await outbox.read("w", ">", 10):
        await outbox.park(delivery, "undecodable", 1)
    assert await outbox.dead_letters() == 3 and await outbox.pending() == 0

    admin = OutboxAdmin(redis)
    status = await admin.status()
    assert status.dead_letters == 3
    assert {d.session_id for d in status.dead} == set(sids)
    first, second, third = status.dead
    assert [d.id for d in await admin.replay([first.id])] == [first.id]
    assert await outbox.pending() == 1 and await outbox.dead_letters() == 2
    dropped = await admin.drop(second.id)
    assert dropped is not None and dropped.session_id == second.session_id
    assert await admin.drop("999999/0-1") is None and await admin.drop("nonsense") is None
    assert [d.id for d in (await admin.status()).dead] == [third.id]
    await redis.aclose()


async def test_the_idle_index_is_oldest_first_across_partitions(
    redis_url: str, partitioned: Settings
) -> None:
    redis = Redis.from_url(redis_url)
    index = RedisIdleIndex(redis)
    sids = [uuid.uuid4().hex for _ in range(30)]
    for age, sid in enumerate(sids):
        await redis.zadd(keys.idle_index(keys.partition_of(sid)), {sid: 1000 + age})
    assert await index.size() == 30
    assert [s for s, _ in await index.older_than(1019, 10)] == sids[:10]
    assert [s for s, _ in await index.older_than(1019, 10, offset=10)] == sids[10:20]
    assert await index.older_than(1019, 10, offset=20) == []
    await redis.aclose()


async def test_a_replica_refuses_a_redis_laid_out_otherwise(
    redis_url: str, settings: Settings, partitioned: Settings, auth: Callable[..., Headers]
) -> None:
    async with serving(build_container(partitioned)) as api:
        await create_session(api, auth())
    assert await Redis.from_url(redis_url).get(keys.LAYOUT_KEY) == b"v2 partitions=256"
    other = msgspec.structs.replace(settings, redis_partitions=64)
    refused = await start_refused(other)
    assert "fixed for the life of a deployment" in str(refused)


async def test_a_replica_that_started_blind_refuses_to_write(
    redis_url: str, settings: Settings, partitioned: Settings, auth: Callable[..., Headers]
) -> None:
    """Redis did not answer when the replica started (so it could not check the layout):
    its first write checks it, and a replica of another count writes nothing."""
    await Redis.from_url(redis_url).set(keys.LAYOUT_KEY, "v2 partitions=64")
    hot = RedisHotStore(Redis.from_url(redis_url))
    record = SessionRecordFactory.build(version=1)
    with pytest.raises(BackendUnavailable, match="fixed for the life of a deployment"):
        await hot.create(record, None, b"{}")
    assert not await Redis.from_url(redis_url).exists(hot_key(record.id))


async def test_the_old_layout_is_refused_then_moved(
    redis_url: str, partitioned: Settings, auth: Callable[..., Headers]
) -> None:
    """Sessions as sessionmgr < 0.2 left them (keys tagged with the session id, one outbox
    stream, one idle index): refused at start, moved by `migrate_layout`, then served."""
    owner = auth()
    async with serving(build_container(partitioned, write_behind=False)) as api:
        sid = (await create_session(api, owner, work_in_progress={"v": 1}))["id"]
        await api.post(f"/v1/sessions/{sid}/participants", json={"mad_name": "m"}, headers=owner)
        keyed = {**owner, "Idempotency-Key": "k1"}
        r = await api.patch(f"/v1/sessions/{sid}", json=PATCH, headers=keyed)
        assert r.status_code == 200, r.text
    redis = Redis.from_url(redis_url)
    await _as_the_old_layout(redis, sid)
    assert "sessionmgr redis migrate-layout" in str(await start_refused(partitioned))

    done = await migrate_layout(redis)
    assert done.keys >= 4 and done.outbox_entries >= 1 and done.idle_entries == 1
    assert await redis.get(keys.LAYOUT_KEY) == keys.expected_layout().encode()
    assert await redis.exists(hot_key(sid), lease_key(sid, "m")) == 2
    container = build_container(partitioned)
    async with serving(container) as api:
        session = await get_session(api, owner, sid)
        assert session["work_in_progress"] == {"v": 2}
        assert list(session["participants"]) == ["m"]
        replay = await api.patch(f"/v1/sessions/{sid}", json=PATCH, headers=keyed)
        assert replay.headers.get("Idempotent-Replayed") == "true", "its record moved too"
        moved = RedisOutbox(await container.redis())
        assert await eventually(moved.pending, lambda n: n == 0, timeout_s=10) == 0
        assert await moved.dead_letters() == 0
    await redis.aclose()


async def _as_the_old_layout(redis: Redis, sid: str) -> None:
    """Rename every key of the session back to `<prefix>:{<id>}[:rest]`, and fold the
    partitioned streams and idle index into the old single ones."""
    async for raw in redis.scan_iter(match=f"*}}:{sid}*"):
        key = raw.decode()
        prefix, rest = key.split(":", 1)
        suffix = rest.split(f"{sid}", 1)[1]
        old = f"{prefix}:{{{sid}}}{suffix}"
        if prefix == "session_idem_keys":
            members = await redis.zrange(key, 0, -1, withscores=True)
            olds = {}
            for member, score in members:
                m = member.decode()
                if m.startswith("session_idem:"):
                    digest = m.rsplit(":", 1)[1]
                    olds[f"session_idem:{{{sid}}}:{digest}"] = score
                else:
                    olds[m] = score
            await redis.delete(key)
            await redis.zadd(old, olds)
            continue
        await redis.rename(key, old)
    assert new_name(f"session_hot:{{{sid}}}") == hot_key(sid)
    p = keys.partition_of(sid)
    for _, fields in await redis.xrange(keys.outbox(p)):
        entry = msgspec.json.decode(fields[b"entry"], type=OutboxEntry)
        assert entry.record.id == sid
        await redis.xadd(keys.LEGACY_OUTBOX, fields)
    await redis.delete(keys.outbox(p))
    for member, score in await redis.zrange(keys.idle_index(p), 0, -1, withscores=True):
        await redis.zadd(keys.LEGACY_IDLE_INDEX, {member: score})
    await redis.delete(keys.idle_index(p), keys.LAYOUT_KEY)


async def test_a_busy_partition_drains_in_batches_and_starves_no_other(
    redis_url: str, partitioned: Settings
) -> None:
    """One session with a backlog: a few entries in the first read, then batches; an entry of
    another partition written meanwhile is read in the very next round."""
    redis = Redis.from_url(redis_url)
    outbox = RedisOutbox(redis)
    await outbox.ensure_group()
    busy, other = uuid.uuid4().hex, uuid.uuid4().hex
    while keys.partition_of(other) == keys.partition_of(busy):
        other = uuid.uuid4().hex
    for _ in range(200):
        await redis.xadd(keys.outbox(keys.partition_of(busy)), {"sid": busy, "entry": b"{}"})
    reads = [len(await outbox.read("w", ">", 10))]
    await redis.xadd(keys.outbox(keys.partition_of(other)), {"sid": other, "entry": b"{}"})
    second = await outbox.read("w", ">", 10)
    assert other.encode() in [d.raw[b"sid"] for d in second], "the other partition is read too"
    reads.append(len(second))
    while (taken := len(await outbox.read("w", ">", 10))) and len(reads) < 50:
        reads.append(taken)
    assert reads[0] == 4  # a few from each partition at first
    # never more than BUSY_BATCHES batches from the busy one, plus the few of every round
    assert max(reads) <= 10 * 4 + 4 + 1
    assert sum(reads) == 201 and len(reads) <= 8, reads
    await redis.aclose()


async def test_a_replica_whose_start_up_check_found_no_redis_refuses_its_first_write(
    redis_url: str, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The start-up check is skipped when Redis does not answer in time; the replica starts
    (read-only until Redis answers) and its first write checks the layout instead."""
    await Redis.from_url(redis_url).set(keys.LAYOUT_KEY, "v2 partitions=64")

    async def unreachable(_client: object) -> None:
        return None

    monkeypatch.setattr(container_module, "checked_layout", unreachable)
    detail = await start_refused(msgspec.structs.replace(settings, redis_partitions=8))
    assert "fixed for the life of a deployment" in detail
    assert await Redis.from_url(redis_url).get(keys.LAYOUT_KEY) == b"v2 partitions=64"
