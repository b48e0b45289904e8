"""Write-behind crash safety on a real redis-server: nothing acknowledged is ever lost.

The app runs without its own worker (`manual_*` fixtures); each test drives
`WriteBehindWorker`s by hand and kills them where a replica could die: before its MongoDB
write, between that write and the XACK, on a poison entry, while MongoDB is down.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import httpx
import msgspec
import pytest
from redis.asyncio import Redis

from sessionmgr.container import RedisWriteBehindWorker as WriteBehindWorker
from sessionmgr.domain.errors import BackendUnavailable
from sessionmgr.domain.model import ContextUpdate, SessionRecord, TimelineEvent
from sessionmgr.services.write_behind import running
from sessionmgr.storage.hot import DEAD_LETTER_STREAM, OUTBOX_STREAM, OutboxEntry, timeline_key
from sessionmgr.storage.outbox import GROUP, RedisOutbox
from sessionmgr.storage.warm import MongoWarmStore
from tests.integration.session_api import (
    append_events,
    create_session,
    eventually,
    hot_record,
    patch_session,
)

CLAIM_IDLE_MS = 100
Headers = dict[str, str]
_decode_entry = msgspec.json.Decoder(OutboxEntry).decode
_decode_event = msgspec.json.Decoder(TimelineEvent).decode


class ProcessDied(BaseException):
    """The replica's process ends here: none of the worker's own code runs after it."""


class FaultyWarm:
    """The real warm store, with a fault that can strike before or after it writes.

    `batches`: the worker's batches reach the real `apply_many`, the fault striking before
    or after the whole batch (`before`/`after` are called for each of its records). Without,
    `apply_many` leaves every entry to `apply` (as the port allows), and a fault strikes
    between the entries of a batch: both ways of dying are tested.
    """

    def __init__(
        self,
        real: MongoWarmStore,
        *,
        before: Callable[[SessionRecord], None] = lambda _r: None,
        after: Callable[[SessionRecord], None] = lambda _r: None,
        batches: bool = False,
    ) -> None:
        self._real = real
        self._before = before
        self._after = after
        self.batches = batches
        self.attempts: dict[int, int] = {}  # `apply` calls by version
        self.batch_attempts = 0
        self.batch_sizes: list[int] = []

    async def total_attempts(self) -> int:
        return sum(self.attempts.values()) + self.batch_attempts

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    async def apply(
        self,
        record: SessionRecord,
        events: list[TimelineEvent],
        context: ContextUpdate | None = None,
    ) -> bool:
        self.attempts[record.version] = self.attempts.get(record.version, 0) + 1
        self._before(record)
        written = await self._real.apply(record, events, context)
        self._after(record)
        return written

    async def apply_many(self, entries: Sequence[OutboxEntry]) -> list[int]:
        if not self.batches:
            return list(range(len(entries)))
        self.batch_attempts += 1
        self.batch_sizes.append(len(entries))
        for entry in entries:
            self._before(entry.record)
        left = await self._real.apply_many(entries)
        for entry in entries:
            self._after(entry.record)
        return left


@pytest.fixture(params=[True, False], ids=["batches", "one-by-one"])
def batches(request: pytest.FixtureRequest) -> bool:
    """Whether a `FaultyWarm` takes the worker's batches whole (see there)."""
    return bool(request.param)


class MongoSwitch:
    """MongoDB as the worker sees it during an outage: every write fails until it is back."""

    def __init__(self) -> None:
        self.down = True

    def fail_if_down(self, _record: SessionRecord) -> None:
        if self.down:
            raise BackendUnavailable("mongodb", "ServerSelectionTimeoutError")


def die(_record: SessionRecord) -> None:
    raise ProcessDied


def die_at(version: int) -> Callable[[SessionRecord], None]:
    def fault(record: SessionRecord) -> None:
        if record.version == version:
            raise ProcessDied

    return fault


def worker(redis: Redis, warm: Any, name: str, **options: Any) -> WriteBehindWorker:
    options.setdefault("claim_idle_ms", CLAIM_IDLE_MS)
    options.setdefault("block_ms", 10)
    return WriteBehindWorker(redis, warm, consumer=name, **options)


async def make_history(api: httpx.AsyncClient, owner: Headers) -> tuple[str, int]:
    """A session taken to version 6 by five writes, the last an append; returns (id, 6)."""
    session = await create_session(api, owner, work_in_progress={"step": 0})
    sid = session["id"]
    await patch_session(api, owner, sid, 1, work_in_progress={"step": 1})
    await append_events(api, owner, sid, *({"kind": "note", "data": {"n": n}} for n in (1, 2, 3)))
    response = await api.post(
        f"/v1/sessions/{sid}/participants", json={"mad_name": "planner"}, headers=owner
    )
    assert response.status_code == 200, response.text
    await patch_session(
        api, owner, sid, 4, context_summary={"topic": "crash"}, full_context={"doc": "x" * 500}
    )
    await append_events(api, owner, sid, *({"kind": "note", "data": {"n": n}} for n in (4, 5, 6)))
    return sid, 6


async def pending(redis: Redis) -> dict[str, Any]:
    info: dict[str, Any] = await redis.xpending(OUTBOX_STREAM, GROUP)
    return info


async def assert_converged(redis: Redis, warm: MongoWarmStore, sid: str, version: int) -> None:
    """MongoDB holds exactly what Redis acknowledged, every event once, and the outbox is empty."""
    stored = await warm.get(sid)
    assert stored is not None
    assert stored.version == version
    assert stored == await hot_record(redis, sid)
    hot_events = [_decode_event(e) for e in await redis.lrange(timeline_key(sid), 0, -1)]  # type: ignore[misc]
    warm_events = await warm.all_events(sid)
    assert [e.seq for e in warm_events] == list(range(1, stored.timeline_seq + 1))
    assert warm_events == hot_events
    assert (await pending(redis))["pending"] == 0
    assert await redis.xlen(OUTBOX_STREAM) == 0


async def test_entries_of_a_worker_that_died_before_writing_are_claimed(
    batches: bool,
    manual_api: httpx.AsyncClient,
    auth: Callable[..., Headers],
    manual_redis: Redis,
    manual_warm: MongoWarmStore,
) -> None:
    sid, latest = await make_history(manual_api, auth())
    a = worker(manual_redis, FaultyWarm(manual_warm, before=die, batches=batches), "A")
    await a.ensure_group()

    with pytest.raises(ProcessDied):
        await a.step(block_ms=10)

    info = await pending(manual_redis)
    assert info["pending"] == latest - 1
    assert [(c["name"], c["pending"]) for c in info["consumers"]] == [(b"A", latest - 1)]
    stored = await manual_warm.get(sid)
    assert stored is not None
    assert stored.version == 1
    b = worker(manual_redis, manual_warm, "B", claim_idle_ms=1000)
    assert await b.step(block_ms=10) == 0, "B took A's entries before they were idle"

    claimed = await eventually(b.claim_stale, lambda n: n > 0, timeout_s=5)

    assert claimed == latest - 1
    await assert_converged(manual_redis, manual_warm, sid, latest)


@pytest.mark.parametrize("dies_after", ["first", "last"])
async def test_entries_of_a_worker_that_died_before_its_ack_are_reapplied_once(
    batches: bool,
    dies_after: str,
    manual_api: httpx.AsyncClient,
    auth: Callable[..., Headers],
    manual_redis: Redis,
    manual_warm: MongoWarmStore,
) -> None:
    sid, latest = await make_history(manual_api, auth())
    version = 2 if dies_after == "first" else latest
    a = worker(manual_redis, FaultyWarm(manual_warm, after=die_at(version), batches=batches), "A")
    await a.ensure_group()

    with pytest.raises(ProcessDied):
        await a.step(block_ms=10)

    # One by one, A died after writing `version`; with batches, after writing the whole batch.
    written = latest if batches else version
    stored = await manual_warm.get(sid)
    assert stored is not None
    assert stored.version == written, "A wrote MongoDB before it died"
    left = latest - 1 if batches else latest - version + 1
    assert (await pending(manual_redis))["pending"] == left
    b = worker(manual_redis, manual_warm, "B")

    claimed = await eventually(b.claim_stale, lambda n: n > 0, timeout_s=5)

    assert claimed == left
    await assert_converged(manual_redis, manual_warm, sid, latest)


async def test_replaying_the_whole_outbox_changes_nothing(
    manual_api: httpx.AsyncClient,
    auth: Callable[..., Headers],
    manual_redis: Redis,
    manual_warm: MongoWarmStore,
) -> None:
    sid, latest = await make_history(manual_api, auth())
    raw = await manual_redis.xrange(OUTBOX_STREAM)
    entries = [_decode_entry(fields[b"entry"]) for _id, fields in raw]
    assert [e.record.version for e in entries] == list(range(2, latest + 1))
    w = worker(manual_redis, manual_warm, "W")
    await w.ensure_group()
    assert await w.step(block_ms=10) == len(entries)
    await assert_converged(manual_redis, manual_warm, sid, latest)
    snapshot = (await manual_warm.get(sid), await manual_warm.all_events(sid))

    for replay in (entries, entries[::-1]):
        for entry in replay:
            assert await manual_warm.apply(entry.record, entry.events, entry.context)
        assert (await manual_warm.get(sid), await manual_warm.all_events(sid)) == snapshot

    # The same through the worker, as a redelivery of entries whose ack was lost would be.
    for _id, fields in reversed(raw):
        await manual_redis.xadd(OUTBOX_STREAM, fields)
    assert await w.step(block_ms=10) == len(entries)
    await assert_converged(manual_redis, manual_warm, sid, latest)
    assert (await manual_warm.get(sid), await manual_warm.all_events(sid)) == snapshot


async def test_an_undecodable_entry_is_parked_and_the_rest_delivered(
    manual_api: httpx.AsyncClient,
    auth: Callable[..., Headers],
    manual_redis: Redis,
    manual_warm: MongoWarmStore,
) -> None:
    owner = auth()
    session = await create_session(manual_api, owner)
    sid = session["id"]
    await patch_session(manual_api, owner, sid, 1, work_in_progress={"a": 1})
    garbage = await manual_redis.xadd(OUTBOX_STREAM, {"entry": b"{not json"})
    fieldless = await manual_redis.xadd(OUTBOX_STREAM, {"other": b"x"})
    await patch_session(manual_api, owner, sid, 2, work_in_progress={"a": 2})
    await append_events(manual_api, owner, sid, {"kind": "note"})
    w = worker(manual_redis, manual_warm, "W")
    await w.ensure_group()

    assert await w.step(block_ms=10) == 3

    assert w.parked == 2
    dead = await manual_redis.xrange(DEAD_LETTER_STREAM)
    assert [fields[b"id"] for _id, fields in dead] == [garbage, fieldless]
    assert all(b"undecodable" in fields[b"error"] for _id, fields in dead)
    await assert_converged(manual_redis, manual_warm, sid, 4)


async def test_an_entry_that_keeps_failing_is_parked_after_max_deliveries(
    batches: bool,
    manual_api: httpx.AsyncClient,
    auth: Callable[..., Headers],
    manual_redis: Redis,
    manual_warm: MongoWarmStore,
) -> None:
    sid, latest = await make_history(manual_api, auth())

    def bug_at_version_2(record: SessionRecord) -> None:
        if record.version == 2:
            raise ValueError("a bug in this entry's write")

    faulty = FaultyWarm(manual_warm, before=bug_at_version_2, batches=batches)
    w = worker(manual_redis, faulty, "W", max_deliveries=3, park_after_s=0, refused_retry_s=0)
    await w.ensure_group()
    poison_id = (await manual_redis.xrange(OUTBOX_STREAM, count=1))[0][0]

    for _ in range(20):
        await w.step(block_ms=10)
        if w.parked:
            break

    assert w.parked == 1
    assert faulty.attempts[2] == 3
    dead = await manual_redis.xrange(DEAD_LETTER_STREAM)
    assert len(dead) == 1
    fields = dead[0][1]
    assert fields[b"id"] == poison_id
    assert b"ValueError" in fields[b"error"]
    assert _decode_entry(fields[b"entry"]).record.version == 2
    # Later entries carry the whole record, so MongoDB still reaches the latest version.
    await assert_converged(manual_redis, manual_warm, sid, latest)


async def test_entries_wait_while_mongodb_is_down_and_drain_when_it_is_back(
    batches: bool,
    manual_api: httpx.AsyncClient,
    auth: Callable[..., Headers],
    manual_redis: Redis,
    manual_warm: MongoWarmStore,
) -> None:
    owner = auth()
    sid, latest = await make_history(manual_api, owner)
    mongodb = MongoSwitch()

    w = worker(
        manual_redis,
        FaultyWarm(manual_warm, before=mongodb.fail_if_down, batches=batches),
        "W",
        max_deliveries=2,
    )
    await w.ensure_group()
    for _ in range(5):
        with pytest.raises(BackendUnavailable):
            await w.step(block_ms=10)
        await asyncio.sleep(CLAIM_IDLE_MS / 1000)  # let claims and re-reads happen too
    # Writes go on while MongoDB is down: Redis is the source of truth.
    await patch_session(manual_api, owner, sid, latest, work_in_progress={"step": "offline"})
    latest += 1
    with pytest.raises(BackendUnavailable):
        await w.step(block_ms=10)

    assert w.parked == 0
    assert await manual_redis.xlen(DEAD_LETTER_STREAM) == 0
    assert await w.pending() == latest - 1
    stored = await manual_warm.get(sid)
    assert stored is not None
    assert stored.version == 1

    mongodb.down = False
    left = await eventually(lambda: _step_and_count(w), lambda n: n == 0, timeout_s=5)

    assert left == 0
    assert w.parked == 0
    await assert_converged(manual_redis, manual_warm, sid, latest)


async def _step_and_count(w: WriteBehindWorker) -> int:
    await w.step(block_ms=10)
    return await w.pending()


async def test_the_running_worker_catches_up_within_seconds_after_a_mongodb_outage(
    batches: bool,
    manual_api: httpx.AsyncClient,
    auth: Callable[..., Headers],
    manual_redis: Redis,
    manual_warm: MongoWarmStore,
) -> None:
    """With the production claim time (30 s), the worker's own pending entries still drain."""
    owner = auth()
    sid, latest = await make_history(manual_api, owner)
    mongodb = MongoSwitch()

    faulty = FaultyWarm(manual_warm, before=mongodb.fail_if_down, batches=batches)
    w = worker(manual_redis, faulty, "W", claim_idle_ms=30_000, block_ms=100)
    await w.ensure_group()
    async with running(w):
        tries = await eventually(faulty.total_attempts, lambda n: n >= 1, timeout_s=5)
        assert tries >= 1, "the worker never tried while MongoDB was down"
        mongodb.down = False
        stored = await eventually(
            lambda: manual_warm.get(sid),
            lambda r: r is not None and r.version == latest,
            timeout_s=5,
        )

    assert stored is not None
    assert stored.version == latest
    await assert_converged(manual_redis, manual_warm, sid, latest)


async def test_consumers_of_departed_replicas_are_forgotten(
    manual_redis: Redis, manual_warm: MongoWarmStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    gone = worker(manual_redis, manual_warm, "gone")
    await gone.ensure_group()
    await gone.step(block_ms=10)  # registers the consumer, holds nothing
    alive = worker(manual_redis, manual_warm, "alive")
    monkeypatch.setattr("sessionmgr.services.write_behind.DEPARTED_AFTER_MS", 50)
    await asyncio.sleep(0.1)
    assert await alive.forget_departed() == 1
    names = {c["name"] for c in await manual_redis.xinfo_consumers(OUTBOX_STREAM, GROUP)}
    assert b"gone" not in names and "gone" not in names


async def test_a_batch_is_written_in_one_call_and_acknowledged_at_once(
    manual_api: httpx.AsyncClient,
    auth: Callable[..., Headers],
    manual_redis: Redis,
    manual_warm: MongoWarmStore,
) -> None:
    owner = auth()
    histories = [await make_history(manual_api, owner) for _ in range(3)]
    counting = FaultyWarm(manual_warm, batches=True)
    w = worker(manual_redis, counting, "W")
    await w.ensure_group()

    assert await w.step(block_ms=10) == sum(latest - 1 for _sid, latest in histories)

    assert counting.batch_attempts == 1
    assert counting.attempts == {}, "an entry went through `apply` one at a time"
    for sid, latest in histories:
        await assert_converged(manual_redis, manual_warm, sid, latest)


async def test_a_batch_refused_for_its_content_is_delivered_one_entry_at_a_time(
    manual_api: httpx.AsyncClient,
    auth: Callable[..., Headers],
    manual_redis: Redis,
    manual_warm: MongoWarmStore,
) -> None:
    """MongoDB refuses the batch (say one document is too large): nothing is lost or parked,
    each entry goes through `apply`, and the one MongoDB refuses alone is retried alone."""
    owner = auth()
    good, latest = await make_history(manual_api, owner)
    bad, bad_latest = await make_history(manual_api, owner)

    def too_large(record: SessionRecord) -> None:
        if record.id == bad and record.version == bad_latest:
            raise ValueError("document too large")

    faulty = FaultyWarm(manual_warm, before=too_large, batches=True)
    w = worker(manual_redis, faulty, "W", refused_retry_s=60)
    await w.ensure_group()

    assert await w.step(block_ms=10) == latest - 1 + bad_latest - 2

    assert faulty.batch_attempts == 1
    assert faulty.attempts[bad_latest] == 2  # `good`'s last entry, and `bad`'s refused one
    await assert_stored_as_in_redis(manual_redis, manual_warm, good, latest)
    stored = await manual_warm.get(bad)
    assert stored is not None and stored.version == bad_latest - 1
    assert (await pending(manual_redis))["pending"] == 1
    assert w.parked == 0


async def assert_stored_as_in_redis(
    redis: Redis, warm: MongoWarmStore, sid: str, version: int
) -> None:
    stored = await warm.get(sid)
    assert stored is not None and stored.version == version
    assert stored == await hot_record(redis, sid)


async def test_a_read_larger_than_the_batch_is_written_a_batch_at_a_time(
    manual_api: httpx.AsyncClient,
    auth: Callable[..., Headers],
    manual_redis: Redis,
    manual_warm: MongoWarmStore,
) -> None:
    """A read (or a claim) may bring more than `batch` entries: MongoDB gets them `batch`
    at a time, so one bulk write stays the size the operator set."""
    owner = auth()
    histories = [await make_history(manual_api, owner) for _ in range(4)]
    counting = FaultyWarm(manual_warm, batches=True)
    w = worker(manual_redis, counting, "W", batch=3)
    await w.ensure_group()

    while await w.pending():
        await w.step(block_ms=10)

    assert counting.batch_sizes and max(counting.batch_sizes) <= 3
    assert sum(counting.batch_sizes) + sum(counting.attempts.values()) == 4 * 5
    for sid, latest in histories:
        await assert_converged(manual_redis, manual_warm, sid, latest)


async def test_a_batch_whose_ack_failed_is_read_again_at_once(
    manual_api: httpx.AsyncClient,
    auth: Callable[..., Headers],
    manual_redis: Redis,
    manual_warm: MongoWarmStore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The batch is in MongoDB but Redis did not take the XACK: the worker reads its own
    pending entries again on its next round (not after `claim_idle_ms`), harmlessly."""
    sid, latest = await make_history(manual_api, auth())
    real_ack_many = RedisOutbox.ack_many
    failed: list[int] = []

    async def ack_fails_once(self: RedisOutbox, entry_ids: Sequence[bytes]) -> None:
        if not failed:
            failed.append(len(entry_ids))
            raise BackendUnavailable("redis", "injected: XACK lost")
        await real_ack_many(self, entry_ids)

    monkeypatch.setattr(RedisOutbox, "ack_many", ack_fails_once)
    w = worker(manual_redis, manual_warm, "W", claim_idle_ms=60_000)
    await w.ensure_group()
    with pytest.raises(BackendUnavailable):
        await w.step(block_ms=10)
    assert failed == [latest - 1]
    stored = await manual_warm.get(sid)
    assert stored is not None and stored.version == latest  # written, not acknowledged
    assert (await pending(manual_redis))["pending"] == latest - 1

    assert await w.step(block_ms=10) == latest - 1

    await assert_converged(manual_redis, manual_warm, sid, latest)
