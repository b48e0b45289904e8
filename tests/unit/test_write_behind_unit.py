"""The write-behind worker on fakeredis streams, carrying real outbox entries to a fake warm store.

fakeredis 2.41 implements the consumer-group commands the worker uses (XREADGROUP, XPENDING,
XAUTOCLAIM with its idle time, XACK, XDEL). The entries are the ones `SessionService` writes,
taken from the in-memory hot store and published as `RedisHotStore` does.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import fakeredis
import msgspec
import pytest

from sessionmgr.container import RedisWriteBehindWorker as WriteBehindWorker
from sessionmgr.domain.errors import BackendUnavailable, WriteContended
from sessionmgr.domain.model import NewEvent
from sessionmgr.services import write_behind
from sessionmgr.services.ports import WriteDiverged
from sessionmgr.services.write_behind import running
from sessionmgr.storage import outbox
from sessionmgr.storage.hot import DEAD_LETTER_STREAM, OUTBOX_STREAM, OutboxEntry
from sessionmgr.storage.outbox import GROUP
from tests.unit.factories import principal
from tests.unit.fakes import InMemoryWarmStore, World, world

ALICE = principal("alice")


@pytest.fixture
async def redis() -> AsyncIterator[Any]:
    client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    yield client
    await client.aclose()


@pytest.fixture
def w() -> World:
    return world()


async def publish(redis: Any, entries: list[OutboxEntry]) -> list[bytes]:
    """XADD each entry to the outbox the way `RedisHotStore` does inside its MULTI."""
    return [
        await redis.xadd(OUTBOX_STREAM, {"entry": msgspec.json.encode(entry)}) for entry in entries
    ]


async def session_history(w: World) -> tuple[str, list[OutboxEntry]]:
    """A session at version 4 with three events; returns its id and its outbox entries."""
    created = await w.service.create(ALICE, work_in_progress={"v": 1})
    await w.service.update(
        ALICE, created.id, expected_version=1, patch={"work_in_progress": {"v": 2}}
    )
    await w.service.append(ALICE, created.id, [NewEvent(kind="a"), NewEvent(kind="b")])
    await w.service.append(ALICE, created.id, [NewEvent(kind="c")])
    entries, w.hot.outbox = w.hot.outbox, []
    return created.id, entries


def worker_for(redis: Any, warm: InMemoryWarmStore, **options: Any) -> WriteBehindWorker:
    options = {"consumer": "me", "block_ms": 1, "claim_idle_ms": 60_000, **options}
    return WriteBehindWorker(redis, warm, **options)


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 3.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def test_entries_reach_the_warm_store_and_leave_the_outbox(redis: Any, w: World) -> None:
    session_id, entries = await session_history(w)
    await publish(redis, entries)
    worker = worker_for(redis, w.warm)
    await worker.ensure_group()
    assert await worker.pending() == 3

    assert await worker.step() == 3

    stored = w.warm.sessions[session_id]
    assert (stored.version, stored.work_in_progress, stored.timeline_seq) == (4, {"v": 2}, 3)
    assert [e.kind for e in await w.warm.all_events(session_id)] == ["a", "b", "c"]
    assert w.warm.applied == [(session_id, 2), (session_id, 3), (session_id, 4)]
    assert await redis.xlen(OUTBOX_STREAM) == 0
    assert await worker.pending() == 0
    assert worker.delivered == 3


async def test_ensure_group_can_run_twice(redis: Any, w: World) -> None:
    worker = worker_for(redis, w.warm)
    await worker.ensure_group()
    await worker.ensure_group()
    assert [g["name"] for g in await redis.xinfo_groups(OUTBOX_STREAM)] == [GROUP.encode()]


async def test_entries_wait_out_a_mongodb_outage_and_then_arrive(redis: Any, w: World) -> None:
    session_id, entries = await session_history(w)
    await publish(redis, entries)
    worker = worker_for(redis, w.warm)
    await worker.ensure_group()

    w.warm.down = True
    with pytest.raises(Exception, match="mongodb"):
        await worker.step()
    assert await redis.xlen(OUTBOX_STREAM) == 3
    assert await worker.pending() == 3
    assert w.warm.sessions[session_id].version == 1

    w.warm.down = False
    await worker.step()  # its own pending entries, without waiting for claim_idle_ms

    assert w.warm.sessions[session_id].version == 4
    assert len(await w.warm.all_events(session_id)) == 3
    assert await redis.xlen(OUTBOX_STREAM) == 0


async def test_the_run_loop_backs_off_during_an_outage_and_recovers(redis: Any, w: World) -> None:
    session_id, entries = await session_history(w)
    await publish(redis, entries)
    w.warm.down = True
    worker = worker_for(redis, w.warm)
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    await asyncio.sleep(0.3)
    assert w.warm.sessions[session_id].version == 1
    assert not task.done()

    w.warm.down = False

    async def delivered() -> bool:
        return w.warm.sessions[session_id].version == 4

    await eventually(delivered)
    stop.set()
    await asyncio.wait_for(task, 5)


async def test_the_run_loop_survives_an_unexpected_error(redis: Any, w: World) -> None:
    session_id, entries = await session_history(w)
    await publish(redis, entries)
    worker = worker_for(redis, w.warm, claim_idle_ms=1000)
    real_claim = worker.claim_stale
    calls: list[int] = []

    async def claim_that_fails_once() -> int:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a bug")
        return await real_claim()

    worker.claim_stale = claim_that_fails_once  # type: ignore[method-assign]
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))

    async def delivered() -> bool:
        return w.warm.sessions[session_id].version == 4

    await eventually(delivered)
    stop.set()
    await asyncio.wait_for(task, 5)
    assert len(calls) >= 1


async def test_an_entry_is_never_parked_while_every_entry_fails_alike(redis: Any, w: World) -> None:
    """MongoDB refusing every write the same way is an outage, whatever the error says."""
    ids = []
    for _ in range(3):
        session_id, entries = await session_history(w)
        w.warm.apply_errors[session_id] = ValueError("not authorized on sessionmgr")
        ids.append(session_id)
        await publish(redis, entries)
    worker = worker_for(redis, w.warm, max_deliveries=2, park_after_s=0, refused_retry_s=0)
    await worker.ensure_group()

    for _ in range(10):
        await worker.step()

    assert worker.parked == 0
    assert await redis.xlen(DEAD_LETTER_STREAM) == 0
    assert await worker.pending() == 9
    del w.warm.apply_errors[ids[0]], w.warm.apply_errors[ids[1]], w.warm.apply_errors[ids[2]]
    await worker.step()
    assert await worker.pending() == 0
    assert all(w.warm.sessions[i].version == 4 for i in ids)


async def test_a_refused_entry_is_not_parked_before_park_after(redis: Any, w: World) -> None:
    bad_id, bad_entries = await session_history(w)
    _, good_entries = await session_history(w)
    w.warm.apply_errors[bad_id] = ValueError("document fails validation")
    await publish(redis, bad_entries[:1])
    await publish(redis, good_entries)
    worker = worker_for(redis, w.warm, max_deliveries=2, park_after_s=3600, refused_retry_s=0)
    await worker.ensure_group()

    for _ in range(10):
        await worker.step()

    assert worker.parked == 0, "attempts must spread over park_after_s, not pile up in seconds"
    assert await worker.pending() == 1


async def test_a_failing_entry_is_parked_after_max_deliveries(redis: Any, w: World) -> None:
    bad_id, bad_entries = await session_history(w)
    good_id, good_entries = await session_history(w)
    w.warm.apply_errors[bad_id] = ValueError("document too large")
    [first_bad, *_] = await publish(redis, bad_entries[:1])
    await publish(redis, good_entries)
    worker = worker_for(redis, w.warm, max_deliveries=3, park_after_s=0, refused_retry_s=0)
    await worker.ensure_group()

    await worker.step()
    assert w.warm.sessions[good_id].version == 4  # one bad entry holds nothing else up
    assert await redis.xlen(DEAD_LETTER_STREAM) == 0
    assert await worker.pending() == 1

    for _ in range(2):
        await worker.step()

    [(_, dead)] = await redis.xrange(DEAD_LETTER_STREAM)
    assert dead[b"id"] == first_bad
    assert b"document too large" in dead[b"error"]
    assert msgspec.json.decode(dead[b"entry"], type=OutboxEntry) == bad_entries[0]
    assert await redis.xlen(OUTBOX_STREAM) == 0
    assert await worker.pending() == 0
    assert worker.parked == 1


@pytest.mark.parametrize(
    "fields", [{"entry": b"{not json"}, {"something": b"else"}, {"entry": b'{"record": 1}'}]
)
async def test_an_undecodable_entry_is_parked_at_once(
    redis: Any, w: World, fields: dict[str, bytes]
) -> None:
    session_id, entries = await session_history(w)
    junk = await redis.xadd(OUTBOX_STREAM, fields)
    await publish(redis, entries)
    worker = worker_for(redis, w.warm)
    await worker.ensure_group()

    await worker.step()

    [(_, dead)] = await redis.xrange(DEAD_LETTER_STREAM)
    assert dead[b"id"] == junk
    assert dead[b"error"].startswith(b"undecodable entry")
    assert w.warm.sessions[session_id].version == 4
    assert await redis.xlen(OUTBOX_STREAM) == 0


async def test_an_entry_for_a_deleted_session_is_dropped_not_parked(redis: Any, w: World) -> None:
    session_id, entries = await session_history(w)
    await w.warm.delete(session_id)
    await publish(redis, entries)
    worker = worker_for(redis, w.warm)
    await worker.ensure_group()

    await worker.step()

    assert session_id not in w.warm.sessions  # no resurrection
    assert await redis.xlen(OUTBOX_STREAM) == 0
    assert await redis.xlen(DEAD_LETTER_STREAM) == 0


async def test_entries_a_dead_consumer_left_pending_are_claimed_once_idle(
    redis: Any, w: World
) -> None:
    session_id, entries = await session_history(w)
    await publish(redis, entries)
    worker = worker_for(redis, w.warm, claim_idle_ms=200)
    await worker.ensure_group()
    taken = await redis.xreadgroup(GROUP, "crashed", {OUTBOX_STREAM: ">"}, count=10)
    assert len(taken[0][1]) == 3  # ...and it never acknowledges them

    await worker.step()
    assert w.warm.sessions[session_id].version == 1  # not idle long enough yet

    await asyncio.sleep(0.3)
    await worker.step()

    assert w.warm.sessions[session_id].version == 4
    assert await worker.pending() == 0
    assert await redis.xlen(OUTBOX_STREAM) == 0


async def test_running_delivers_in_the_background_and_stops_cleanly(redis: Any, w: World) -> None:
    worker = worker_for(redis, w.warm, block_ms=20)
    async with running(worker):
        session_id, entries = await session_history(w)
        await publish(redis, entries)

        async def delivered() -> bool:
            return w.warm.sessions[session_id].version == 4

        await eventually(delivered)
    assert worker.delivered == 3
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("write-behind")]


class RaisingReconciler:
    """A reconciler whose `settle` raises `error` its first `times` calls, then lands."""

    def __init__(self, error: Exception, times: int = 1_000_000) -> None:
        self.error, self.times, self.calls = error, times, 0

    async def settle(self, diverged: WriteDiverged) -> bool:
        self.calls += 1
        if self.calls <= self.times:
            raise self.error
        return True


async def diverging_entry(redis: Any, w: World) -> bytes:
    """Publish a session's last entry, which MongoDB holds another write for; its id."""
    session_id, entries = await session_history(w)
    record = entries[-1].record
    w.warm.apply_errors[session_id] = WriteDiverged(
        record, [], None, version_clash=True, stored=record, stored_seq=record.timeline_seq
    )
    [published] = await publish(redis, entries[-1:])
    return published


async def others_go_through(redis: Any, w: World) -> None:
    """Another session's writes, published to go through meanwhile (parking asks for it)."""
    await publish(redis, (await session_history(w))[1])


async def test_a_rebase_lost_to_writers_keeps_its_entry_pending_without_counting_toward_parking(
    redis: Any, w: World
) -> None:
    """The divergence is kept, but re-basing the session loses to its writers: nothing is
    wrong with the entry, so it stays pending, is never parked however often that happens
    (while other entries go through, which parking also asks), waits `refused_retry_s`
    between tries, and is acknowledged once the re-base lands."""
    await diverging_entry(redis, w)
    reconciler = RaisingReconciler(WriteContended("s", 8, 0.1, "re-base"), times=5)
    worker = worker_for(
        redis, w.warm, max_deliveries=1, park_after_s=0, refused_retry_s=0.3, reconciler=reconciler
    )
    await worker.ensure_group()

    await worker.step()
    await worker.step()
    assert reconciler.calls == 1, "its next try waits refused_retry_s"
    assert await worker.pending() == 1
    (entry_id,) = worker._failures
    for _ in range(5):
        await others_go_through(redis, w)
        await asyncio.sleep(0.31)
        await worker.step()
        if reconciler.calls < 6:
            assert worker._failures[entry_id].attempts == 0, "no attempt counted"
    assert worker._last_applied > 0, "others went through"
    assert worker.parked == 0, "a lost re-base is not a refusal: it never parks the entry"
    assert await redis.xlen(DEAD_LETTER_STREAM) == 0
    assert reconciler.calls == 6, "tried until the re-base landed"
    assert await worker.pending() == 0, "acknowledged once it did"


async def test_a_divergence_that_cannot_be_kept_is_retried_and_then_parked(
    redis: Any, w: World
) -> None:
    """Keeping the divergence fails for its content: the entry is refused like any other
    (retried, then parked with the error while others go through), not left to fail the
    worker's every step."""
    bad = await diverging_entry(redis, w)
    refusing = RaisingReconciler(ValueError("conflict document refused"))
    options = {"park_after_s": 0, "refused_retry_s": 0, "reconciler": refusing}
    worker = worker_for(redis, w.warm, max_deliveries=2, **options)
    await worker.ensure_group()
    for _ in range(3):
        await others_go_through(redis, w)
        await worker.step()
    [(_, dead)] = await redis.xrange(DEAD_LETTER_STREAM)
    assert dead[b"id"] == bad
    assert b"conflict document refused" in dead[b"error"]
    assert await worker.pending() == 0


async def test_an_outage_while_keeping_a_divergence_is_an_outage(redis: Any, w: World) -> None:
    """MongoDB or Redis out while the divergence is kept: the step fails as for any outage
    (the run loop backs off), the entry stays pending, and no attempt counts toward parking
    however long it lasts."""
    await diverging_entry(redis, w)
    out = RaisingReconciler(BackendUnavailable("mongodb", "connection refused"))
    options = {"park_after_s": 0, "refused_retry_s": 0, "reconciler": out}
    worker = worker_for(redis, w.warm, max_deliveries=1, **options)
    await worker.ensure_group()
    for _ in range(3):
        await others_go_through(redis, w)
        with pytest.raises(BackendUnavailable):
            await worker.step()
    assert worker.parked == 0
    assert not worker._failures, "no attempt counted"
    assert await worker.pending() >= 1


def counting_batches(w: World) -> list[int]:
    """The size of each batch the worker hands the warm store."""
    sizes: list[int] = []
    real = w.warm.apply_many

    async def apply_many(entries: Any) -> list[int]:
        sizes.append(len(entries))
        return await real(entries)

    w.warm.apply_many = apply_many  # type: ignore[method-assign]
    return sizes


async def test_a_backlog_is_read_page_by_page_and_written_a_batch_at_a_time(
    redis: Any, w: World
) -> None:
    """1 050 entries waiting, a batch of 1 000: the round reads pages (`READ_PAGE` asked,
    more from partitions with a backlog, as `RedisOutbox.read` gives) until it holds a
    batch, and MongoDB gets the batch whole, then the rest."""
    entries: list[OutboxEntry] = []
    for _ in range(350):  # 3 entries each
        entries += (await session_history(w))[1]
    await publish(redis, entries)
    sizes = counting_batches(w)
    worker = worker_for(redis, w.warm, batch=1000)
    await worker.ensure_group()
    reads: list[int] = []
    real_read = worker._outbox.read

    async def read(*args: Any, **kwargs: Any) -> Any:
        found = await real_read(*args, **kwargs)
        reads.append(len(found))
        return found

    worker._outbox.read = read  # type: ignore[method-assign]
    while await worker.pending():
        await worker.step()
    assert sizes[0] == 1000 and sum(sizes) == 1050
    assert max(reads) <= write_behind.READ_PAGE * (outbox.BUSY_BATCHES + 1), "pages, not 1000"


async def test_a_batch_stops_at_its_bytes(
    redis: Any, w: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Large entries: a batch (and a round's reading) stops at `BATCH_BYTES`, whatever its
    count, so what the worker holds stays bounded."""
    entries: list[OutboxEntry] = []
    for _ in range(14):
        entries += (await session_history(w))[1]
    entries = entries[:40]
    await publish(redis, entries)
    sizes = counting_batches(w)
    one = len(msgspec.json.encode(entries[0]))
    monkeypatch.setattr(write_behind, "BATCH_BYTES", 5 * one)
    worker = worker_for(redis, w.warm, batch=1000)
    await worker.ensure_group()
    while await worker.pending():
        await worker.step()
    assert sum(sizes) == 40
    assert max(sizes) <= 6 and len(sizes) >= 7, "cut by bytes, not by the batch of 1000"
