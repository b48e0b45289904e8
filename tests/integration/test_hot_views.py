"""A write decides on what this replica's own last commit left, without reading the hash first
(storage/hot_views.py), and stays exactly as safe as one that reads.

What these tests hold: a remembered view is what a read would return (record, recent events,
leases, `rev`) after every kind of change; another replica's write, a refusal, a lease near its
end, the same Idempotency-Key and an unknown outcome each send the write back to what Redis
holds; and a history of appends from three replicas at once, each on its own memory, has every
acknowledged append exactly once, at the version and seq it was answered with. On
redis-server and on fakeredis with Lua.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from sessionmgr.domain.errors import BackendUnavailable, ConcurrencyConflict, WriteContended
from sessionmgr.domain.model import ContextUpdate, Participant, SessionRecord, TimelineEvent
from sessionmgr.services.ports import (
    REBASED,
    Change,
    HotView,
    Idempotency,
    OutboxEntry,
    Replayed,
    WriteDiverged,
)
from sessionmgr.storage import hot
from sessionmgr.storage.hot import REV, RedisHotStore, hot_key, lease_key, outbox_key, timeline_key
from tests.integration.session_api import hot_record
from tests.unit.factories import SessionRecordFactory

NOW = datetime(2026, 12, 1, tzinfo=UTC)
Decide = Callable[[HotView], Change]
_decode_entry = msgspec.json.Decoder(OutboxEntry).decode


def reads_of(store: RedisHotStore, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every read of the hash `store` makes from now on (by session id)."""
    real = RedisHotStore._seen
    reads: list[str] = []

    async def seen(self: RedisHotStore, client: Any, session_id: str, idem: Any) -> Any:
        if self is store:
            reads.append(session_id)
        return await real(self, client, session_id, idem)

    monkeypatch.setattr(RedisHotStore, "_seen", seen)
    return reads


def versioned(view: HotView, **fields: Any) -> SessionRecord:
    return msgspec.structs.replace(view.record, version=view.record.version + 1, **fields)


def bump(key: str, decided: list[int] | None = None) -> Decide:
    def decide(view: HotView) -> Change:
        if decided is not None:
            decided.append(view.record.version)
        wip = {**view.record.work_in_progress, key: view.record.version}
        record = versioned(view, work_in_progress=wip)
        return Change(record=record, fields=frozenset({"version", "work_in_progress"}))

    return decide


def append(n: int, actor: str = "a") -> Decide:
    def decide(view: HotView) -> Change:
        seq = view.record.timeline_seq
        events = [
            TimelineEvent(seq=seq + i, at=NOW, actor=actor, kind="note", data={"i": i})
            for i in range(1, n + 1)
        ]
        record = versioned(view, timeline_seq=seq + n, last_active=NOW)
        fields = frozenset({"version", "timeline_seq", "last_active"})
        answer = b"%d:%d" % (record.version, seq + 1)
        return Change(record=record, fields=fields, events=events, result=answer)

    return decide


def join(mad: str) -> Decide:
    def decide(view: HotView) -> Change:
        mine = Participant(joined_at=NOW, lease_expires_at=NOW + timedelta(seconds=30), token=1)
        record = versioned(view, participants={**view.record.participants, mad: mine})
        return Change(
            record=record, fields=frozenset({"version", "participants"}), leases_set=[mad]
        )

    return decide


def renew(mad: str) -> Decide:
    """Redis only: the same version, a new expiry, the lease key set again."""

    def decide(view: HotView) -> Change:
        later = msgspec.structs.replace(
            view.record.participants[mad], lease_expires_at=NOW + timedelta(seconds=60)
        )
        record = msgspec.structs.replace(
            view.record, participants={**view.record.participants, mad: later}
        )
        return Change(
            record=record, fields=frozenset({"participants"}), leases_set=[mad], hot_only=True
        )

    return decide


def leave(mad: str) -> Decide:
    def decide(view: HotView) -> Change:
        rest = {m: p for m, p in view.record.participants.items() if m != mad}
        record = versioned(view, participants=rest, acl=[a for a in view.record.acl if a != mad])
        fields = frozenset({"version", "participants", "acl"})
        return Change(record=record, fields=fields, leases_dropped=[mad])

    return decide


def full_context(value: dict[str, Any]) -> Decide:
    """`full_context` goes to MongoDB only: the hash gets the version, the outbox the value."""

    def decide(view: HotView) -> Change:
        record = versioned(view)
        context = ContextUpdate(version=record.version, value=value)
        return Change(record=record, fields=frozenset({"version"}), context=context)

    return decide


def writing_less(view: HotView) -> Change:
    """A record that differs in more than the fields the change writes (as one decided on a
    view with lapsed participants reaped, but writing no participants): the hash gets only
    `fields`, and so must the view this replica remembers."""
    record = versioned(view, context_summary="not written")
    return Change(record=record, fields=frozenset({"version"}))


def expecting(version: int, then: Decide) -> Decide:
    """`then`, if the session is at `version`; a 409 otherwise (as `expected_version`)."""

    def decide(view: HotView) -> Change:
        if view.record.version != version:
            behind = version < view.record.version
            raise ConcurrencyConflict(view.record.id, view.record.version, behind=behind)
        return then(view)

    return decide


async def created(store: RedisHotStore, **fields: Any) -> SessionRecord:
    record = SessionRecordFactory.build(version=1, timeline_seq=0, participants={}, **fields)
    await store.create(record, None, b"{}")
    return record


async def test_a_remembered_view_is_what_a_read_returns_after_every_kind_of_change(
    store_redis: Redis,
) -> None:
    store = RedisHotStore(store_redis, recent_timeline=3)
    record = await created(store, work_in_progress={})
    changes = [
        ("a patch", bump("a")),
        ("a join, with its lease", join("m1")),
        ("another join", join("m2")),
        ("a renewal, Redis only", renew("m1")),
        ("an append", append(2)),
        ("an append past the recent events kept", append(3)),
        ("a departure, its lease dropped", leave("m2")),
        ("a full_context", full_context({"big": "x" * 100})),
        ("a record holding more than the change writes", writing_less),
    ]
    for what, decide in changes:
        assert isinstance(await store.transact(record.id, decide, None), Change), what
        read = await store.load(record.id)
        assert read is not None
        # Counted after Redis counted its TTLs: never more left than Redis says.
        remembered = store._remembered(record.id)
        assert remembered is not None, what
        assert remembered.view is not None and remembered.state is not None
        held = await store_redis.hgetall(hot_key(record.id))
        assert remembered.state.rev == held.pop(REV.encode()), what
        assert remembered.state.fields == held, f"{what}: the hash's bytes"
        assert remembered.state.recent == await store_redis.lrange(timeline_key(record.id), 0, -1)
        assert remembered.view.record == read.record, what
        assert remembered.view.recent == read.recent, what
        assert set(remembered.view.lease_ttl_ms) == set(read.lease_ttl_ms), what
        for mad, ttl in remembered.view.lease_ttl_ms.items():
            assert 0 < ttl <= read.lease_ttl_ms[mad] + 1, f"{what}: never later than Redis' TTL"


async def test_a_write_after_this_replicas_own_commit_does_not_read_first(
    store_redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = RedisHotStore(store_redis)
    record = await created(store, work_in_progress={})
    reads = reads_of(store, monkeypatch)

    for key in "abc":
        assert isinstance(await store.transact(record.id, bump(key), None), Change)

    assert reads == [record.id], "one read, then each write on what the last one left"
    now = await hot_record(store_redis, record.id)
    assert now is not None
    assert (now.version, now.work_in_progress) == (4, {"a": 1, "b": 2, "c": 3})


async def test_off_every_write_reads_first(
    store_redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = RedisHotStore(store_redis, view_cache_mb=0)
    record = await created(store, work_in_progress={})
    reads = reads_of(store, monkeypatch)

    for key in "abc":
        assert isinstance(await store.transact(record.id, bump(key), None), Change)

    assert reads == [record.id] * 3


async def test_another_replicas_write_sends_this_one_back_to_what_redis_holds(
    store_redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    mine, theirs = RedisHotStore(store_redis), RedisHotStore(store_redis)
    record = await created(mine, work_in_progress={})
    await mine.transact(record.id, bump("mine-1"), None)
    await theirs.transact(record.id, bump("theirs"), None)
    reads = reads_of(mine, monkeypatch)
    decided: list[int] = []

    assert isinstance(await mine.transact(record.id, bump("mine-2", decided), None), Change)

    assert decided == [2, 3], "decided on its memory, refused, decided on what Redis holds"
    assert reads == [], "the refused commit answered the session as it is"
    now = await hot_record(store_redis, record.id)
    assert now is not None
    assert (now.version, now.work_in_progress) == (4, {"mine-1": 1, "theirs": 2, "mine-2": 3})


async def test_a_refusal_on_a_remembered_view_is_decided_again_on_a_read(
    store_redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """This replica remembers version 2; another made it 3. A client that read 3 from the
    other one sends `expected_version: 3` here: that is no conflict, whatever this one
    remembers. Only what Redis holds may refuse a write."""
    mine, theirs = RedisHotStore(store_redis), RedisHotStore(store_redis)
    record = await created(mine, work_in_progress={})
    await mine.transact(record.id, bump("mine"), None)
    await theirs.transact(record.id, bump("theirs"), None)
    reads = reads_of(mine, monkeypatch)

    change = await mine.transact(record.id, expecting(3, bump("client")), None)

    assert isinstance(change, Change)
    assert change.record.version == 4
    assert reads == [record.id], "refused on its memory, then read and decided again"
    with pytest.raises(ConcurrencyConflict):  # a real conflict is still one, after a read
        await mine.transact(record.id, expecting(3, bump("late")), None)


async def test_each_decision_is_counted_by_what_it_was_decided_on(store_redis: Redis) -> None:
    """`sessionmgr_hot_write_decisions_total{on}`: an operator reads the memory's use (memory
    against read) and how often replicas beat each other to a session (refused_commit)."""
    told: list[str] = []
    mine = RedisHotStore(store_redis, decided=told.append)
    theirs = RedisHotStore(store_redis)
    record = await created(mine, work_in_progress={})

    await mine.transact(record.id, bump("a"), None)  # nothing remembered yet: a read
    await mine.transact(record.id, bump("b"), None)  # on what the last commit left
    await theirs.transact(record.id, bump("theirs"), None)
    await mine.transact(record.id, bump("c"), None)  # memory, refused, on the answer: 5
    await theirs.transact(record.id, bump("theirs"), None)  # 6
    await mine.transact(record.id, expecting(6, bump("d")), None)  # 5 remembered: refused, read
    with pytest.raises(ConcurrencyConflict):  # a real conflict: refused on memory, then a read
        await mine.transact(record.id, expecting(6, bump("stale")), None)
    key = Idempotency(key_digest="k" * 16, fingerprint="f")
    await mine.transact(record.id, bump("keyed"), key)  # memory
    # Decided on memory, which holds no idempotency record; the commit refuses and answers
    # the key's record, which is replayed without another decision.
    await mine.transact(record.id, bump("keyed"), key)
    assert await mine.transact("not-hot", bump("x"), None) is None  # read: nothing to decide

    assert told == [
        "read",
        "memory",
        "memory",
        "refused_commit",
        "memory",
        "read",
        "memory",
        "read",
        "memory",
        "memory",
    ]
    sessions, size = mine.view_memory()
    assert sessions == 1
    assert size > 0


async def test_a_lease_near_its_end_is_never_taken_from_memory(
    store_redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Leases run out in Redis without a write. A view counts each lease's remaining life
    from when it was asked for (never later than Redis' own), and a write reads instead once
    a lease is within a second of its end: a lapsed lease is never seen as live."""
    store = RedisHotStore(store_redis, lease_ttl_s=2)
    record = await created(store, work_in_progress={})
    await store.transact(record.id, join("m"), None)
    reads = reads_of(store, monkeypatch)
    seen: list[dict[str, int]] = []

    def looking(view: HotView) -> Change:
        seen.append(dict(view.lease_ttl_ms))
        return bump("x")(view)

    await store.transact(record.id, looking, None)
    assert reads == [], "the lease has two seconds left: the view is used"
    assert 1000 < seen[-1]["m"] <= 2000

    await asyncio.sleep(1.2)
    await store.transact(record.id, looking, None)
    assert reads == [record.id], "under a second left: read"
    assert 0 < seen[-1]["m"] < 1000

    await asyncio.sleep(1.0)
    await store.transact(record.id, looking, None)
    assert "m" not in seen[-1], "lapsed in Redis: not live"


async def test_a_lease_gone_without_a_write_is_not_taken_as_live(
    store_redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lease key can go without a write of the hash: evicted, deleted by hand, or its TTL
    run out early on a Redis whose clock stepped. The commit checks that every lease its
    decision saw as live is still there; refused, it is decided again without it."""
    store = RedisHotStore(store_redis)
    record = await created(store, work_in_progress={})
    await store.transact(record.id, join("m"), None)
    await store_redis.delete(lease_key(record.id, "m"))
    reads = reads_of(store, monkeypatch)
    seen: list[set[str]] = []

    def looking(view: HotView) -> Change:
        seen.append(set(view.lease_ttl_ms))
        return bump("x")(view)

    assert isinstance(await store.transact(record.id, looking, None), Change)

    assert seen == [{"m"}, set()], "decided on memory, refused, decided on what Redis holds"
    assert reads == []


async def test_the_idempotency_record_alone_refuses_a_commit_from_memory(
    store_redis: Redis,
) -> None:
    """The same `rev` and version, the same leases: only the request's idempotency record,
    written meanwhile without a write of the hash (as a resume answers), shows the key was
    used. The commit refuses and answers it, and the write replays it."""
    store = RedisHotStore(store_redis)
    record = await created(store)
    await store.transact(record.id, append(1), None)
    key = Idempotency(key_digest="k" * 16, fingerprint="f")
    await store.remember(record.id, key, b"first")

    assert await store.transact(record.id, append(1, "again"), key) == Replayed(result=b"first")
    view = await store.load(record.id)
    assert view is not None
    assert [e.actor for e in view.recent] == ["a"], "nothing appended"


async def test_a_remembered_state_is_decoded_anew_for_each_write(store_redis: Redis) -> None:
    """A decision never shares an object with the memory: what one changes in place, the
    next one does not see."""
    store = RedisHotStore(store_redis)
    record = await created(store, work_in_progress={"n": 1})
    await store.transact(record.id, join("m"), None)
    first = store._remembered(record.id)
    assert first is not None and first.view is not None
    first.view.record.work_in_progress["n"] = 99
    first.view.record.participants["m"].token = 99
    first.view.recent.append(TimelineEvent(seq=9, at=NOW, actor="x", kind="k"))

    again = store._remembered(record.id)
    assert again is not None and again.view is not None
    assert again.view.record.work_in_progress == {"n": 1}
    assert again.view.record.participants["m"].token == 1
    assert again.view.recent == []


async def test_a_deleted_session_leaves_nothing_in_memory(store_redis: Redis) -> None:
    store = RedisHotStore(store_redis)
    record = await created(store, work_in_progress={})
    await store.transact(record.id, bump("a"), None)
    assert store._remembered(record.id) is not None

    await store.drop(record.id)

    assert store._remembered(record.id) is None
    assert store._views.bytes == 0


async def test_a_suspended_session_leaves_nothing_in_memory(store_redis: Redis) -> None:
    store = RedisHotStore(store_redis)
    record = await created(store, work_in_progress={})
    await store.transact(record.id, bump("a"), None)
    flushed: list[int] = []

    async def flush(record: SessionRecord, events: Any, context: Any) -> None:
        flushed.append(record.version)

    assert await store.suspend(record.id, flush) is not None

    assert flushed == [2]
    assert store._remembered(record.id) is None
    assert store._views.bytes == 0


async def test_the_same_key_committed_by_another_replica_is_replayed(
    store_redis: Redis,
) -> None:
    mine, theirs = RedisHotStore(store_redis), RedisHotStore(store_redis)
    record = await created(mine)
    await mine.transact(record.id, append(1), None)
    key = Idempotency(key_digest="k" * 16, fingerprint="f")

    first = await theirs.transact(record.id, append(1, "theirs"), key)
    again = await mine.transact(record.id, append(1, "mine"), key)

    assert isinstance(first, Change)
    assert again == Replayed(result=first.result)
    view = await mine.load(record.id)
    assert view is not None
    assert [e.actor for e in view.recent] == ["a", "theirs"], "appended once"


async def test_an_unknown_outcome_forgets_the_view(
    store_redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit whose reply was lost may or may not have been applied: the next write reads."""
    store = RedisHotStore(store_redis)
    record = await created(store, work_in_progress={})
    await store.transact(record.id, bump("a"), None)
    real = RedisHotStore._run_commit

    async def lost(self: RedisHotStore, client: Any, keys: Any, words: Any) -> Any:
        await real(self, client, keys, words)
        raise RedisConnectionError("Connection closed by server.")

    monkeypatch.setattr(RedisHotStore, "_run_commit", lost)
    with pytest.raises(BackendUnavailable):
        await store.transact(record.id, bump("b"), None)
    monkeypatch.setattr(RedisHotStore, "_run_commit", real)
    assert store._remembered(record.id) is None
    reads = reads_of(store, monkeypatch)

    await store.transact(record.id, bump("c"), None)

    assert reads == [record.id]
    now = await hot_record(store_redis, record.id)
    assert now is not None
    assert now.work_in_progress == {"a": 1, "b": 2, "c": 3}, "b was applied, once"


async def test_a_suspended_session_is_not_hot_whatever_this_replica_remembers(
    store_redis: Redis,
) -> None:
    store = RedisHotStore(store_redis)
    record = await created(store, work_in_progress={})
    await store.transact(record.id, bump("a"), None)
    await store_redis.delete(hot_key(record.id))

    assert await store.transact(record.id, bump("b"), None) is None
    assert await store_redis.exists(hot_key(record.id)) == 0, "no hash of one field"
    assert store._remembered(record.id) is None


async def appended_history(
    store_redis: Redis, session_id: str, answered: list[tuple[str, int, int]], total: int
) -> None:
    """Every acknowledged append is in the outbox exactly once, at the version and first seq
    it was answered with, and versions and seqs run without a gap or a repeat."""
    stream = outbox_key(session_id)  # its partition's (the suite may have set several)
    entries = [_decode_entry(f[b"entry"]) for _id, f in await store_redis.xrange(stream)]
    mine = [e for e in entries if e.record.id == session_id and e.events]
    stored = sorted((e.events[0].actor, e.record.version, e.events[0].seq) for e in mine)
    assert stored == sorted(answered), "each answer is the append the outbox holds"
    assert sorted(v for _n, v, _s in answered) == list(range(2, 2 + total))
    assert sorted(s for _n, _v, s in answered) == list(range(1, 1 + total))
    now = await hot_record(store_redis, session_id)
    assert now is not None
    assert (now.version, now.timeline_seq) == (1 + total, total)


async def test_appends_from_three_replicas_at_once_each_land_once_at_their_answer(
    store_redis: Redis,
) -> None:
    """A history: 3 replicas (stores on one Redis, each with its own memory) append 40 times
    each, all at once, with random pauses. Every append is acknowledged (none has a
    precondition to fail), each exactly once at the version and first seq it was answered
    with."""
    replicas = [RedisHotStore(store_redis) for _ in range(3)]
    record = await created(replicas[0])
    rng = random.Random(16)
    answered: list[tuple[str, int, int]] = []

    async def run(name: str, store: RedisHotStore) -> None:
        for _ in range(40):
            await asyncio.sleep(rng.random() / 1000)
            change = await store.transact(record.id, append(1, name), None)
            assert isinstance(change, Change)
            version, seq = (int(x) for x in change.result.split(b":"))
            answered.append((name, version, seq))

    await asyncio.gather(*(run(f"r{i}", s) for i, s in enumerate(replicas)))
    await appended_history(store_redis, record.id, answered, 120)


async def test_many_writers_in_many_replicas_all_get_through_once(store_redis: Redis) -> None:
    """A harder history: 5 replicas, 6 writers in each, 10 appends each to one session, no
    pauses: 300 appends racing. None has a precondition, so each must be acknowledged (no 409,
    no `contended`), exactly once, at its answer."""
    replicas = [RedisHotStore(store_redis) for _ in range(5)]
    record = await created(replicas[0])
    answered: list[tuple[str, int, int]] = []

    async def run(name: str, store: RedisHotStore) -> None:
        for _ in range(10):
            change = await store.transact(record.id, append(1, name), None)
            assert isinstance(change, Change)
            version, seq = (int(x) for x in change.result.split(b":"))
            answered.append((name, version, seq))

    await asyncio.gather(*(run(f"r{i}w{w}", s) for i, s in enumerate(replicas) for w in range(6)))
    await appended_history(store_redis, record.id, answered, 300)


async def test_one_replicas_writers_of_a_session_take_turns_and_are_never_refused(
    store_redis: Redis,
) -> None:
    """30 writers in one replica append to one session at once: each decides on what the one
    before it committed (one read, for the first), so no commit is ever refused."""
    told: list[str] = []
    store = RedisHotStore(store_redis, decided=told.append)
    record = await created(store)
    changes = await asyncio.gather(
        *(store.transact(record.id, append(1, f"w{i}"), None) for i in range(30))
    )
    answered = []
    for i, change in enumerate(changes):
        assert isinstance(change, Change)
        version, seq = (int(x) for x in change.result.split(b":"))
        answered.append((f"w{i}", version, seq))
    assert told == ["read"] + ["memory"] * 29
    assert [v for _n, v, _s in answered] == list(range(2, 32)), "in the order they came"
    await appended_history(store_redis, record.id, answered, 30)


async def test_a_write_beaten_past_its_budget_answers_contended_and_writes_nothing(
    store_redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another replica's write lands before each of this write's commits: after
    `_RACE_RETRIES` beaten commits it pauses between tries, and once `_RACE_BUDGET_S` is
    spent raises `WriteContended` (503 `contended`). Nothing of it is in Redis."""
    monkeypatch.setattr(hot, "_RACE_BUDGET_S", 0.05)
    mine, theirs = RedisHotStore(store_redis), RedisHotStore(store_redis)
    record = await created(mine)
    real = RedisHotStore._commit
    tries: list[float] = []

    async def beaten(self: RedisHotStore, *args: Any) -> Any:
        if self is mine:
            tries.append(asyncio.get_running_loop().time())
            await theirs.transact(record.id, append(1, "theirs"), None)
        return await real(self, *args)

    monkeypatch.setattr(RedisHotStore, "_commit", beaten)
    began = asyncio.get_running_loop().time()
    with pytest.raises(WriteContended) as raised:
        await mine.transact(record.id, append(1, "mine"), None)
    assert asyncio.get_running_loop().time() - began >= 0.05, "it tried on for its budget"
    assert raised.value.current_version is None
    assert len(tries) > hot._RACE_RETRIES, "it tried on past the retries, pausing"
    timeline = await store_redis.lrange(timeline_key(record.id), 0, -1)
    assert b'"mine"' not in b"".join(timeline)
    now = await hot_record(store_redis, record.id)
    assert now is not None
    assert (now.version, now.timeline_seq) == (1 + len(tries), len(tries))


def stall_once(monkeypatch: pytest.MonkeyPatch, method: str) -> tuple[asyncio.Event, asyncio.Event]:
    """The next call of `RedisHotStore.<method>` sets `stalled` and waits for `resume`."""
    stalled, resume = asyncio.Event(), asyncio.Event()
    real = getattr(RedisHotStore, method)

    async def stalls(self: RedisHotStore, *args: Any) -> Any:
        if not stalled.is_set():
            stalled.set()
            await resume.wait()
        return await real(self, *args)

    monkeypatch.setattr(RedisHotStore, method, stalls)
    return stalled, resume


async def test_a_write_kept_waiting_for_its_turn_past_its_budget_answers_contended(
    store_redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The budget counts the wait for the turn: a write queued behind one of this replica's
    that stalls gives up (`WriteContended`, nothing written) instead of queueing on."""
    monkeypatch.setattr(hot, "_RACE_BUDGET_S", 0.05)
    store = RedisHotStore(store_redis)
    record = await created(store)
    stalled, resume = stall_once(monkeypatch, "_seen")
    first = asyncio.create_task(store.transact(record.id, append(1, "first"), None))
    await stalled.wait()
    with pytest.raises(WriteContended, match="waited"):
        await store.transact(record.id, append(1, "second"), None)
    resume.set()
    assert isinstance(await first, Change)
    now = await hot_record(store_redis, record.id)
    assert now is not None
    assert (now.version, now.timeline_seq) == (2, 1), "the first only"


def lease_required(view: HotView) -> Change:
    """A refusal that a write queued ahead could cure (as a join cures a lease-expired)."""
    if "m" not in view.record.participants:
        raise ConcurrencyConflict(view.record.id, view.record.version)  # not `behind`
    return append(1, "m")(view)


async def test_a_write_naming_a_passed_version_is_refused_without_waiting_for_its_turn(
    store_redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write naming a version below the session's while another write of this replica has
    its turn: refused at once, on a read of Redis (not on memory alone, which may lag another
    replica's writes either way), since no write queued ahead can bring the version back.
    Every other write waits its turn, which keeps the order they came in: one naming the
    version Redis is at (though not its memory), one naming a version ahead of the session's
    (the write ahead may reach it), one refused for anything else (a join queued ahead may
    cure it), and one that does not say it names a version."""
    told: list[str] = []
    store = RedisHotStore(store_redis, decided=told.append)
    theirs = RedisHotStore(store_redis)
    record = await created(store, work_in_progress={})
    await store.transact(record.id, bump("a"), None)  # remembered at 2
    await theirs.transact(record.id, bump("theirs"), None)
    await theirs.transact(record.id, bump("theirs"), None)  # Redis at 4, memory still 2
    stalled, resume = stall_once(monkeypatch, "_commit")
    first = asyncio.create_task(store.transact(record.id, bump("first"), None))
    await stalled.wait()
    told.clear()
    for passed in (1, 3):  # behind both memory and Redis; ahead of memory, behind Redis
        stale = store.transact(record.id, expecting(passed, bump("x")), None, names_version=True)
        with pytest.raises(ConcurrencyConflict) as refused:
            await asyncio.wait_for(stale, 1)
        assert refused.value.current_version == 4
    assert told == ["read", "read"], "each refused on a read, without its turn"

    def queued(decide: Decide, names_version: bool = True) -> asyncio.Task[Any]:
        return asyncio.create_task(
            store.transact(record.id, decide, None, names_version=names_version)
        )

    waiting = [
        queued(expecting(4, bump("b"))),  # Redis (4) is at it, though memory (2) is not
        queued(expecting(5, bump("c"))),  # ahead of both: `first` takes the session to 5
        queued(lease_required),
        queued(expecting(1, bump("d")), names_version=False),
    ]
    await asyncio.sleep(0.05)
    assert not any(w.done() for w in waiting), "each waits its turn"
    resume.set()
    assert isinstance(await first, Change)
    b, c, lease, d = await asyncio.gather(*waiting, return_exceptions=True)
    assert isinstance(b, ConcurrencyConflict), "refused in its turn: `first` took it to 5"
    assert isinstance(c, Change), "in its turn, the version it named"
    assert isinstance(lease, ConcurrencyConflict)
    assert isinstance(d, ConcurrencyConflict)
    assert (await hot_record(store_redis, record.id)).version == 6  # type: ignore[union-attr]


async def keep_appending(
    store: RedisHotStore, session_id: str, writers: int, until: asyncio.Event
) -> list[Change | None]:
    """`writers` tasks of one replica appending to the session until `until` is set or the
    session is not hot; every answer they got."""
    answers: list[Change | None] = []

    async def writer(name: str) -> None:
        while not until.is_set():
            answer = await store.transact(session_id, append(1, name), None)
            answers.append(answer)  # type: ignore[arg-type]
            if answer is None:
                return

    await asyncio.gather(*(writer(f"w{i}") for i in range(writers)))
    return answers


async def test_a_suspend_does_not_hold_up_this_replicas_writes_while_it_flushes(
    store_redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MongoDB takes longer than a write may wait for its turn to take the suspend's flush:
    the suspend holds no turn, so the writes land meanwhile (they beat its commit, and it
    flushes again), and none answers contended through a slow MongoDB. Every append that
    landed before the suspend's last try is in what it flushed."""
    monkeypatch.setattr(hot, "_RACE_BUDGET_S", 0.5)
    store = RedisHotStore(store_redis)
    record = await created(store)
    flushed: list[SessionRecord] = []
    done = asyncio.Event()

    async def flush(record: SessionRecord, events: Any, context: Any) -> None:
        flushed.append(msgspec.structs.replace(record))
        if len(flushed) == 1:
            await asyncio.sleep(1.0)  # MongoDB slower than a write may wait for its turn
            done.set()

    writing = asyncio.create_task(keep_appending(store, record.id, 3, done))
    suspended = await asyncio.wait_for(store.suspend(record.id, flush), 5)
    answers = await writing
    assert suspended is not None
    landed = [a for a in answers if a is not None]
    assert len(landed) > 10, "the writes went on during the slow flush"
    assert flushed[0].version < suspended.version, "they beat the first try"
    assert suspended.version == 1 + len(landed), "every append that landed is in it"
    assert not await store_redis.exists(hot_key(record.id), timeline_key(record.id))


def diverged_at(record: SessionRecord) -> WriteDiverged:
    """Redis lost writes MongoDB has: MongoDB holds another write at this record's version."""
    return WriteDiverged(
        msgspec.structs.replace(record, write_id="lost-one"),
        [],
        None,
        version_clash=True,
        stored=msgspec.structs.replace(record, write_id="mongodbs"),
        stored_seq=record.timeline_seq,
    )


async def test_a_rebase_takes_its_turn_so_this_replicas_writers_never_beat_it(
    store_redis: Redis,
) -> None:
    """The re-base after a divergence, under ten writers of this replica: it waits its turn,
    moves the session above MongoDB in one try, and the writers go on above it."""
    store = RedisHotStore(store_redis)
    record = await created(store)
    done = asyncio.Event()
    writing = asyncio.create_task(keep_appending(store, record.id, 10, done))
    await asyncio.sleep(0.02)
    now = await hot_record(store_redis, record.id)
    assert now is not None
    assert await asyncio.wait_for(store.rebase(diverged_at(now)), 5) == REBASED
    await asyncio.sleep(0.02)
    done.set()
    answers = await writing
    assert all(isinstance(a, Change) for a in answers), "the session stayed hot"
    versions = [a.record.version for a in answers if a is not None]
    assert len(set(versions)) == len(versions), "no version handed out twice"
    after = await hot_record(store_redis, record.id)
    assert after is not None
    assert after.version == max(versions)
    assert len(set(range(2, after.version + 1)) - set(versions)) == 1, "the re-base's own"


async def test_a_rebase_beaten_past_its_retries_answers_contended_and_moves_nothing(
    store_redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another replica's write lands inside each of the re-base's tries: after `_RACE_RETRIES`
    it raises `WriteContended` (no version named: the write-behind keeps its entry pending
    and tries again), and nothing was moved."""
    mine, theirs = RedisHotStore(store_redis), RedisHotStore(store_redis)
    record = await created(mine)
    real = RedisHotStore.undelivered

    async def beaten(self: RedisHotStore, session_id: str, client: Any = None) -> Any:
        if self is mine:
            await theirs.transact(record.id, append(1, "theirs"), None)
        return await real(self, session_id, client)

    monkeypatch.setattr(RedisHotStore, "undelivered", beaten)
    with pytest.raises(WriteContended, match="re-base") as raised:
        await mine.rebase(diverged_at(record))
    assert raised.value.current_version is None
    assert not await store_redis.exists(hot.rebased_key(record.id)), "nothing marked as moved"
    now = await hot_record(store_redis, record.id)
    assert now is not None
    assert (now.version, now.timeline_seq) == (1 + hot._RACE_RETRIES, hot._RACE_RETRIES)
