"""The warm store's contract, run on the in-memory engine, on the MongoDB wire-compatible server
(nx-27017 over SQLite, not MongoDB: tests/support/wire_mongo.py) and on a real MongoDB where one
exists (SESSIONMGR_TEST_MONGODB_URI, or testcontainers with a Docker engine)."""

from __future__ import annotations

import inspect
import os
import secrets
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import timedelta
from typing import Any

import msgspec
import pytest
from litestar.testing import AsyncTestClient
from pymongo.errors import AutoReconnect

from sessionmgr.app import create_app
from sessionmgr.container import build_container
from sessionmgr.domain.errors import BackendUnavailable
from sessionmgr.domain.model import (
    ArchiveRef,
    ContextUpdate,
    SessionRecord,
    SessionState,
    TimelineEvent,
    new_write_id,
    utcnow,
)
from sessionmgr.services.ports import ListAfter, OutboxEntry, WriteDiverged
from sessionmgr.settings import load_settings
from sessionmgr.storage import warm as warm_store
from sessionmgr.storage.warm import MongoWarmStore, open_warm_store
from tests.conftest import JWT_SECRET
from tests.support.wire_mongo import LABEL as WIRE

NO_MONGODB = (
    "no real MongoDB here: set SESSIONMGR_TEST_MONGODB_URI=mongodb://... or run on a machine "
    "with a Docker engine (testcontainers starts mongo:7)"
)


def _docker_available() -> bool:
    try:
        import docker  # testcontainers depends on it

        docker.from_env().ping()
    except Exception:
        return False
    return True


@pytest.fixture(scope="session")
def real_mongodb_uri() -> Iterator[str]:
    if uri := os.environ.get("SESSIONMGR_TEST_MONGODB_URI"):
        yield uri
        return
    if not _docker_available():
        pytest.skip(NO_MONGODB)
    from testcontainers.mongodb import MongoDbContainer

    with MongoDbContainer("mongo:7") as mongo:
        yield mongo.get_connection_url()


REAL = pytest.param("real", marks=pytest.mark.mongodb)


def _server_uri(request: pytest.FixtureRequest) -> str:
    if request.param == "mongomock":
        return "mongomock://"
    if request.param == WIRE:
        return str(request.getfixturevalue("wire_mongo").uri)
    return str(request.getfixturevalue("real_mongodb_uri"))


@pytest.fixture(params=["mongomock", WIRE, REAL])
def mongodb_uri(request: pytest.FixtureRequest) -> str:
    return _server_uri(request)


@pytest.fixture(params=[WIRE, REAL])
def server_mongodb_uri(request: pytest.FixtureRequest) -> str:
    """A MongoDB server over the network: the wire-compatible one, or a real one."""
    return _server_uri(request)


@pytest.fixture
async def warm(mongodb_uri: str) -> AsyncIterator[MongoWarmStore]:
    settings = load_settings({}, mongodb_uri=mongodb_uri, mongodb_db=f"t{secrets.token_hex(4)}")
    resource = open_warm_store(settings)
    store = await anext(resource)
    yield store
    await store._client.drop_database(settings.mongodb_db)
    await resource.aclose()


def record(version: int = 1, **changes: object) -> SessionRecord:
    now = utcnow()
    values: dict[str, object] = {
        "id": secrets.token_hex(16),
        "version": version,
        "state": SessionState.ACTIVE,
        "owner_id": "alice",
        "acl": ["mad:planner"],
        "created_at": now,
        "last_active": now,
        "participants": {},
        "work_in_progress": {"step": version},
        "context_summary": {"goal": "ship"},
        "timeline_seq": 0,
    }
    values.update(changes)
    return SessionRecord(**values)  # type: ignore[arg-type]


def event(seq: int) -> TimelineEvent:
    return TimelineEvent(seq=seq, at=utcnow(), actor="alice", kind="note", data={"n": seq})


async def test_insert_then_get_returns_every_field(warm: MongoWarmStore) -> None:
    original = record()
    await warm.insert(original)
    assert await warm.get(original.id) == original


async def test_a_create_is_one_write_its_document_names_the_write(warm: MongoWarmStore) -> None:
    # Issue 16: the ledger entry for version 1 was a second insert per create; the document,
    # which carries the write id, is that note.
    created = record(write_id=new_write_id())
    assert await warm.insert(created)
    assert await warm._writes.count_documents({"session_id": created.id}) == 0
    assert await warm.flush(created, [])  # its own version 1 again: no divergence
    assert written(await warm.get(created.id)) == written(created)


async def test_a_first_version_from_another_write_diverges(warm: MongoWarmStore) -> None:
    created = record(write_id=new_write_id())
    await warm.insert(created)
    other = record(id=created.id, write_id=new_write_id(), work_in_progress={"other": 1})
    with pytest.raises(WriteDiverged) as info:
        await warm.flush(other, [])
    assert info.value.version_clash
    assert await warm.get(created.id) == created  # MongoDB's version 1 is kept


async def test_a_create_retried_after_its_insert_failed_is_not_a_divergence(
    warm: MongoWarmStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A keyed create retried with the same id and a new write id, after the first attempt's
    # document insert failed: the retry's version 1 is the only one, and its flush no
    # divergence (the ledger entry the first attempt noted made it one).
    first = record(write_id=new_write_id())
    monkeypatch.setattr(warm, "_sessions", FailsToInsertOnce(warm._sessions))
    with pytest.raises(BackendUnavailable):
        await warm.insert(first)
    retry = msgspec.structs.replace(first, write_id=new_write_id())
    assert await warm.insert(retry)
    assert await warm.flush(retry, [])
    assert written(await warm.get(first.id)) == written(retry)


def written(stored: SessionRecord | None) -> tuple[int, str, dict[str, Any]] | None:
    """Which write a stored record is (the wire-compatible server hands back the dates of an
    updated document without their time zone)."""
    return None if stored is None else (stored.version, stored.write_id, stored.work_in_progress)


class FailsToInsertOnce:
    """A collection whose first insert (one document or many) is lost with its connection."""

    def __init__(self, collection: Any) -> None:
        self._collection = collection
        self._failed = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._collection, name)

    def _lose_first(self) -> None:
        if not self._failed:
            self._failed = True
            raise AutoReconnect("connection reset")

    async def insert_one(self, doc: dict[str, Any]) -> Any:
        self._lose_first()
        return await self._collection.insert_one(doc)

    async def insert_many(self, docs: list[dict[str, Any]], **options: Any) -> Any:
        self._lose_first()
        return await self._collection.insert_many(docs, **options)


async def test_apply_never_replaces_a_newer_version(warm: MongoWarmStore) -> None:
    first = record()
    await warm.insert(first)
    v3 = record(3, id=first.id, work_in_progress={"step": 3})
    v2 = record(2, id=first.id, work_in_progress={"step": 2})
    assert await warm.apply(v3, [])
    assert await warm.apply(v2, [])  # a late, older delivery: accepted and ignored
    stored = await warm.get(first.id)
    assert stored is not None
    assert (stored.version, stored.work_in_progress) == (3, {"step": 3})


async def test_flush_records_the_state_at_the_same_version(warm: MongoWarmStore) -> None:
    first = record(2)
    await warm.insert(first)
    dormant = record(2, id=first.id, state=SessionState.DORMANT)
    assert await warm.flush(dormant, [])
    await warm.apply(record(2, id=first.id), [])  # the write-behind's late copy of v2
    stored = await warm.get(first.id)
    assert stored is not None and stored.state is SessionState.DORMANT


async def test_full_context_has_its_own_version_guard(warm: MongoWarmStore) -> None:
    first = record()
    await warm.insert(first)
    assert await warm.context(first.id) == ContextUpdate(version=0, value={})
    await warm.apply(record(3, id=first.id), [], ContextUpdate(version=3, value={"doc": 3}))
    await warm.apply(record(4, id=first.id), [])  # a later change that left full_context alone
    await warm.apply(record(2, id=first.id), [], ContextUpdate(version=2, value={"doc": 2}))
    assert await warm.context(first.id) == ContextUpdate(version=3, value={"doc": 3})
    stored = await warm.get(first.id)
    assert stored is not None and stored.version == 4
    assert await warm.context("0" * 32) is None


async def test_events_are_stored_once_whatever_the_replays(warm: MongoWarmStore) -> None:
    first = record()
    await warm.insert(first)
    events = [event(s) for s in range(1, 6)]
    await warm.apply(record(2, id=first.id, timeline_seq=5), events)
    await warm.apply(record(2, id=first.id, timeline_seq=5), list(reversed(events)))
    await warm.apply(record(1, id=first.id), events[:2])
    stored = await warm.all_events(first.id)
    assert [e.seq for e in stored] == [1, 2, 3, 4, 5]
    assert [e.seq for e in await warm.recent_events(first.id, 2)] == [4, 5]


async def test_events_after_reads_a_page_in_seq_order(warm: MongoWarmStore) -> None:
    first = record()
    await warm.insert(first)
    other = record()
    await warm.insert(other)
    await warm.apply(record(2, id=first.id, timeline_seq=9), [event(s) for s in (9, 3, 1, 7, 5)])
    await warm.apply(record(2, id=other.id, timeline_seq=4), [event(s) for s in (2, 4)])
    assert [e.seq for e in await warm.events_after(first.id, 0, 3)] == [1, 3, 5]
    assert [e.seq for e in await warm.events_after(first.id, 5, 10)] == [7, 9]
    assert await warm.events_after(first.id, 9, 10) == []


async def test_count_owned_counts_one_owner_up_to_the_limit(warm: MongoWarmStore) -> None:
    hers = [record(owner_id="carol") for _ in range(4)]
    for one in hers:
        await warm.insert(one)
    await warm.insert(record(owner_id="dave", acl=["carol"]))  # shared with carol: not hers
    assert await warm.count_owned("carol", 100) == 4
    assert await warm.count_owned("carol", 2) == 2
    assert await warm.count_owned("nobody", 100) == 0
    assert await warm.count_owned("carol", 100, other_than=hers[0].id) == 3


async def test_apply_to_a_deleted_session_writes_nothing(warm: MongoWarmStore) -> None:
    gone = record()
    await warm.insert(gone)
    await warm.delete(gone.id)
    assert not await warm.apply(record(5, id=gone.id), [event(1)])
    assert await warm.get(gone.id) is None
    assert await warm.all_events(gone.id) == []


async def test_list_pages_through_owned_and_shared_sessions(warm: MongoWarmStore) -> None:
    mine = [record(owner_id="alice", acl=[]) for _ in range(4)]
    shared = [record(owner_id="bob", acl=["alice"]) for _ in range(2)]
    other = [record(owner_id="bob", acl=[]) for _ in range(3)]
    for r in mine + shared + other:
        await warm.insert(r)
    seen: list[str] = []
    after = None
    while True:
        page = await warm.list_for("alice", None, 4, after)
        seen += [r.id for r in page.items]
        if page.next_cursor is None:
            break
        after = ListAfter(id=page.next_cursor)
    assert sorted(seen) == sorted(r.id for r in mine + shared)
    everything = await warm.list_for(None, None, 100, None)
    assert len(everything.items) == 9


async def test_list_by_recency_pages_newest_first_with_ties_by_id(warm: MongoWarmStore) -> None:
    """`order="recent"`: last_active descending, then id descending, resumed from a keyset."""
    start = utcnow()
    records = [
        record(owner_id="carol", last_active=start + timedelta(seconds=n // 2)) for n in range(5)
    ]  # two pairs share an instant: the id breaks the tie
    for r in records:
        await warm.insert(r)
    expected = [r.id for r in sorted(records, key=lambda r: (r.last_active, r.id), reverse=True)]
    seen: list[str] = []
    after = None
    while True:
        page = await warm.list_for("carol", None, 2, after, order="recent")
        seen += [r.id for r in page.items]
        if page.next_cursor is None:
            break
        last = page.items[-1]
        after = ListAfter(id=last.id, last_active=last.last_active)
    assert seen == expected


async def test_mark_state_is_conditioned_on_the_version(warm: MongoWarmStore) -> None:
    r = record(4, state=SessionState.DORMANT)
    await warm.insert(r)
    await warm.mark_state(r.id, 3, SessionState.ACTIVE)
    assert (await warm.get(r.id)).state is SessionState.DORMANT  # type: ignore[union-attr]
    await warm.mark_state(r.id, 4, SessionState.ACTIVE)
    assert (await warm.get(r.id)).state is SessionState.ACTIVE  # type: ignore[union-attr]


async def test_timestamps_round_trip_at_millisecond_precision(warm: MongoWarmStore) -> None:
    r = record(last_active=utcnow() - timedelta(days=3))
    await warm.insert(r)
    stored = await warm.get(r.id)
    assert stored is not None
    assert stored.last_active == r.last_active
    assert stored.last_active.utcoffset() == timedelta(0)


async def test_indexes_exist(warm: MongoWarmStore) -> None:
    events = await warm._events.index_information()
    unique = [i for i in events.values() if i.get("unique")]
    assert any(dict(i["key"]) == {"session_id": 1, "seq": 1} for i in unique)
    sessions = await warm._sessions.index_information()
    assert {"owner_id", "acl", "state_age"} <= set(sessions)


async def test_http_lifecycle_on_a_mongodb_server(
    server_mongodb_uri: str, redis_url: str, auth: Any
) -> None:
    """create → update → suspend (served from MongoDB) → update reactivates → delete."""
    settings = load_settings(
        {},
        redis_url=redis_url,
        mongodb_uri=server_mongodb_uri,
        mongodb_db=f"t{secrets.token_hex(4)}",
        jwt_secret=JWT_SECRET,
    )
    async with AsyncTestClient(app=create_app(build_container(settings))) as client:
        created = (await client.post("/v1/sessions", json={}, headers=auth())).json()
        sid = created["id"]
        body = {"expected_version": 1, "patch": {"work_in_progress": {"step": 2}}}
        assert (
            await client.patch(f"/v1/sessions/{sid}", json=body, headers=auth())
        ).status_code == 200
        suspended = (await client.post(f"/v1/sessions/{sid}/suspend", headers=auth())).json()
        assert (suspended["state"], suspended["version"]) == ("dormant", 2)
        got = (await client.get(f"/v1/sessions/{sid}", headers=auth())).json()
        assert got["work_in_progress"] == {"step": 2} and got["state"] == "dormant"
        body = {"expected_version": 2, "patch": {"context_summary": {"done": True}}}
        again = await client.patch(f"/v1/sessions/{sid}", json=body, headers=auth())
        assert (again.json()["state"], again.json()["version"]) == ("active", 3)
        assert (await client.delete(f"/v1/sessions/{sid}", headers=auth())).status_code == 204
        assert (await client.get(f"/v1/sessions/{sid}", headers=auth())).status_code == 404


# -- the cold tier's side of MongoDB (archive and rehydrate) ---------------------------------


def archive_ref(session_id: str) -> ArchiveRef:
    return ArchiveRef(
        key=f"sessions/2026/11/{session_id}.json.gz",
        sha256="ab" * 32,
        size=10,
        archived_at=utcnow(),
    )


async def test_stub_replaces_the_document_only_at_its_version(warm: MongoWarmStore) -> None:
    original = record(version=3, timeline_seq=2, state=SessionState.DORMANT)
    await warm.insert(original)
    await warm.apply(original, [event(1), event(2)], ContextUpdate(version=3, value={"c": 1}))
    exported = await warm.export(original.id)
    assert exported is not None
    assert (exported.record, [e.seq for e in exported.events]) == (original, [1, 2])
    assert exported.context == ContextUpdate(version=3, value={"c": 1})
    ref = archive_ref(original.id)

    stale = msgspec.structs.replace(original, version=2)
    assert await warm.to_stub(stale, ref) is False
    assert await warm.to_stub(original, ref) is True
    # The same stub again (a retry after a lost reply) is done already; another is refused.
    assert await warm.to_stub(original, ref) is True
    other = msgspec.structs.replace(ref, sha256="0" * 64)
    assert await warm.to_stub(original, other) is False, "a stub is never stubbed again"

    stored = await warm.stored(original.id)
    assert stored is not None
    assert (stored.record.state, stored.archive, stored.purge_pending) == (
        SessionState.ARCHIVED,
        ref,
        True,
    )
    assert (stored.record.owner_id, stored.record.acl) == (original.owner_id, original.acl)
    assert await warm.export(original.id) is None
    await warm.purge_events(original.id)
    await warm.purged(original.id, ref)
    assert (await warm.stored(original.id)).purge_pending is False  # type: ignore[union-attr]
    assert await warm.all_events(original.id) == []
    assert await warm.archive_candidates(utcnow() + timedelta(days=1), 10) == []


async def test_restore_puts_back_every_field_and_event_once(warm: MongoWarmStore) -> None:
    original = record(version=4, timeline_seq=3, state=SessionState.DORMANT)
    await warm.insert(original)
    events = [event(1), event(2), event(3)]
    await warm.apply(original, events, ContextUpdate(version=4, value={"big": "x" * 100}))
    exported = await warm.export(original.id)
    assert exported is not None
    ref = archive_ref(original.id)
    assert await warm.to_stub(original, ref)
    await warm.insert_events(original.id, events[:1])  # left over by an interrupted delete

    assert await warm.restore(exported, ref) is True
    assert await warm.restore(exported, ref) is True, "a second restore finds it done"

    assert await warm.get(original.id) == original
    assert await warm.all_events(original.id) == events
    assert await warm.context(original.id) == ContextUpdate(version=4, value={"big": "x" * 100})
    stored = await warm.stored(original.id)
    assert stored is not None and stored.archive is None and stored.cold_key == ref.key
    # A write-behind replay meant for the stub's time changes nothing now either.
    assert await warm.apply(original, events) is True
    assert await warm.all_events(original.id) == events


async def test_a_late_replay_leaves_a_stub_alone(warm: MongoWarmStore) -> None:
    original = record(version=2, timeline_seq=1, state=SessionState.DORMANT)
    await warm.insert(original)
    await warm.apply(original, [event(1)])
    assert await warm.to_stub(original, archive_ref(original.id))
    await warm.purge_events(original.id)
    assert await warm.apply(original, [event(1)], ContextUpdate(version=2, value={"c": 1}))
    await warm.mark_state(original.id, 2, SessionState.ACTIVE)
    stored = await warm.stored(original.id)
    assert stored is not None and stored.record.state is SessionState.ARCHIVED
    assert await warm.all_events(original.id) == []
    assert await warm.context(original.id) == ContextUpdate(version=0, value={})


async def test_http_archive_and_rehydrate_on_a_mongodb_server(
    server_mongodb_uri: str, redis_url: str, s3_server: Any, auth: Any
) -> None:
    """create → events → suspend → archive (stub only) → get (whole again) → update."""
    from tests.support.s3_server import S3_BUCKET

    settings = load_settings(
        {},
        redis_url=redis_url,
        mongodb_uri=server_mongodb_uri,
        mongodb_db=f"t{secrets.token_hex(4)}",
        s3_endpoint_url=s3_server.url,
        s3_bucket=S3_BUCKET,
        jwt_secret=JWT_SECRET,
    )
    async with AsyncTestClient(app=create_app(build_container(settings))) as client:
        sid = (await client.post("/v1/sessions", json={}, headers=auth())).json()["id"]
        events = {"events": [{"kind": "note", "data": {"n": i}} for i in range(50)]}
        r = await client.post(f"/v1/sessions/{sid}/timeline", json=events, headers=auth())
        assert r.status_code == 200, r.text
        assert (await client.post(f"/v1/sessions/{sid}/suspend", headers=auth())).status_code == 200
        before = (await client.get(f"/v1/sessions/{sid}?include=full", headers=auth())).json()
        archived = await client.post(f"/v1/sessions/{sid}/archive", headers=auth())
        assert archived.status_code == 200, archived.text
        assert archived.json()["state"] == "archived"
        listed = await client.get("/v1/sessions?state=archived", headers=auth())
        assert [s["id"] for s in listed.json()["items"]] == [sid]
        after = (await client.get(f"/v1/sessions/{sid}?include=full", headers=auth())).json()
        assert after["state"] == "dormant"
        for name in ("version", "full_timeline", "full_context", "work_in_progress"):
            assert after[name] == before[name], name
        body = {"expected_version": before["version"], "patch": {"work_in_progress": {"s": 1}}}
        again = await client.patch(f"/v1/sessions/{sid}", json=body, headers=auth())
        assert (again.json()["state"], again.json()["version"]) == ("active", before["version"] + 1)
        assert (await client.delete(f"/v1/sessions/{sid}", headers=auth())).status_code == 204


# -- the write-behind's batches: `apply_many` has the effect of `apply` on each entry ------------


def history(session: SessionRecord, versions: int) -> list[OutboxEntry]:
    """The outbox entries of `versions` writes after `session`'s create: every other one
    appends two events, every third changes `full_context`; each has its own write id."""
    entries, seq = [], 0
    for version in range(2, versions + 2):
        events = []
        if version % 2 == 0:
            events = [event(seq + 1), event(seq + 2)]
            seq += 2
        context = ContextUpdate(version=version, value={"v": version}) if version % 3 == 0 else None
        changed = msgspec.structs.replace(
            session,
            version=version,
            timeline_seq=seq,
            work_in_progress={"step": version},
            write_id=secrets.token_hex(8),
        )
        entries.append(OutboxEntry(record=changed, events=events, context=context))
    return entries


async def state_of(warm: MongoWarmStore, session_id: str) -> tuple[Any, ...]:
    return (
        await warm.get(session_id),
        await warm.all_events(session_id),
        await warm.context(session_id),
    )


async def test_a_batch_has_the_effect_of_its_entries_one_by_one(warm: MongoWarmStore) -> None:
    """Three sessions' writes interleaved, some delivered twice and out of order, one session
    already past part of its history: the batch leaves nothing to `apply`, and MongoDB ends
    as with each entry applied one by one (on twin sessions)."""
    batch: list[OutboxEntry] = []
    twins: list[tuple[str, str, list[OutboxEntry]]] = []
    for n in range(3):
        session = record(write_id=secrets.token_hex(8))
        twin = msgspec.structs.replace(session, id=secrets.token_hex(16))
        await warm.insert(session)
        await warm.insert(twin)
        entries = history(session, 5 + n)
        if n == 2:  # MongoDB already has the first two writes of this one
            for entry in entries[:2]:
                await warm.apply(entry.record, entry.events, entry.context)
        batch += entries
        twins.append((session.id, twin.id, [retarget(e, twin.id) for e in entries]))
    batch = batch[::2] + batch[1::2] + batch[:4]  # out of order, four delivered again

    assert await warm.apply_many(batch) == []

    for session_id, twin_id, entries in twins:
        for entry in entries:
            await warm.apply(entry.record, entry.events, entry.context)
        mine, theirs = await state_of(warm, session_id), await state_of(warm, twin_id)
        assert mine[0] == msgspec.structs.replace(theirs[0], id=session_id)
        assert mine[1:] == theirs[1:]
        assert mine[0] is not None and mine[0].version == entries[-1].record.version


def retarget(entry: OutboxEntry, session_id: str) -> OutboxEntry:
    return msgspec.structs.replace(
        entry, record=msgspec.structs.replace(entry.record, id=session_id)
    )


async def test_a_batch_leaves_what_apply_must_answer_to_apply(warm: MongoWarmStore) -> None:
    """Gone, archived, another write at a version, another event at a seq: those sessions'
    entries are left (and `apply` then answers each as it always does); the rest is written."""
    plain, gone, archived, clashing, other_event, created_by_another = (
        record(write_id=secrets.token_hex(8)) for _ in range(6)
    )
    for session in (plain, archived, clashing, other_event, created_by_another):
        await warm.insert(session)
    await warm.apply(archived, [])
    assert await warm.to_stub(archived, archive_ref(archived.id))
    entries = {s.id: history(s, 2) for s in (plain, gone, archived, clashing, other_event)}
    rival = msgspec.structs.replace(entries[clashing.id][0].record, write_id="another write")
    await warm.apply(rival, [])  # MongoDB holds v2 of `clashing` from another write
    await warm.apply(  # and another event at seq 1 of `other_event`
        record(1, id=other_event.id), [TimelineEvent(seq=1, at=utcnow(), actor="x", kind="other")]
    )
    # A version 1 that another write made (the document notes version 1, not the ledger).
    entries[created_by_another.id] = [
        OutboxEntry(record=msgspec.structs.replace(created_by_another, write_id="another"))
    ]
    batch = [e for group in entries.values() for e in group]

    left = await warm.apply_many(batch)

    assert {batch[i].record.id for i in left} == {
        gone.id,
        archived.id,
        clashing.id,
        other_event.id,
        created_by_another.id,
    }
    assert [batch[i] for i in left] == [e for e in batch if e.record.id != plain.id]
    stored = await warm.get(plain.id)
    assert stored is not None and stored.version == 3
    assert len(await warm.all_events(plain.id)) == 2
    assert await warm.get(gone.id) is None
    assert await warm.all_events(gone.id) == [], "no orphan events of a session that is gone"
    stub = await warm.stored(archived.id)
    assert stub is not None and stub.archive is not None
    assert await warm.all_events(archived.id) == []
    for session in (clashing, other_event, created_by_another):
        first = entries[session.id][0]
        with pytest.raises(WriteDiverged):
            await warm.apply(first.record, first.events, first.context)


class FaultyCollection:
    """A Motor collection whose `nth` awaited call (counting every collection of the store)
    fails: before it is sent, applied with its reply lost, or applied and timed out."""

    def __init__(self, real: Any, plan: dict[str, Any]) -> None:
        self._real, self._plan = real, plan

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._real, name)
        if not callable(attribute):
            return attribute

        def call(*args: Any, **kwargs: Any) -> Any:
            result = attribute(*args, **kwargs)
            if hasattr(result, "to_list"):  # a cursor: its `to_list` is the round trip
                to_list = result.to_list
                result.to_list = lambda *a, **k: self._fault(lambda: to_list(*a, **k))
                return result
            return self._fault(lambda: result)

        return call

    async def _fault(self, send: Any) -> Any:
        from pymongo.errors import AutoReconnect, NetworkTimeout

        plan = self._plan
        plan["calls"] += 1
        if plan["calls"] != plan.get("nth"):
            return await send()
        if plan["mode"] == "before":
            unsent = send()
            if inspect.iscoroutine(unsent):
                unsent.close()  # created, never sent
            raise AutoReconnect("injected: failed before it was sent")
        await send()
        if plan["mode"] == "timeout":
            raise NetworkTimeout("injected: applied, timed out")
        raise AutoReconnect("injected: applied, reply lost")


async def test_a_batch_cut_short_at_any_call_is_whole_after_its_retry(
    warm: MongoWarmStore,
) -> None:
    """Each MongoDB call of `apply_many` fails in turn (before it is sent, applied with its
    reply lost, applied and timed out): the batch raises `BackendUnavailable` (the worker
    keeps it pending), and its redelivery leaves MongoDB as one clean delivery would."""
    from sessionmgr.domain.errors import BackendUnavailable

    plan: dict[str, Any] = {"calls": 0}
    real = warm._sessions, warm._events, warm._writes
    warm._sessions, warm._events, warm._writes = (FaultyCollection(c, plan) for c in real)

    async def batch_and_twin() -> tuple[list[OutboxEntry], list[OutboxEntry]]:
        batch, twin_batch = [], []
        for n in range(3):
            session = record(write_id=secrets.token_hex(8))
            twin = msgspec.structs.replace(session, id=secrets.token_hex(16))
            await warm.insert(session)
            await warm.insert(twin)
            entries = history(session, 3 + n)
            batch += entries
            twin_batch += [retarget(e, twin.id) for e in entries]
        return batch, twin_batch

    batch, _twins = await batch_and_twin()
    plan["calls"] = 0
    assert await warm.apply_many(batch) == []
    calls = plan["calls"]
    assert calls >= 5, "sessions, ledger, documents, events, deleted-meanwhile"

    for nth in range(1, calls + 1):
        for mode in ("before", "lost", "timeout"):
            batch, twins = await batch_and_twin()
            plan.update(calls=0, nth=nth, mode=mode)
            with pytest.raises(BackendUnavailable):
                await warm.apply_many(batch)
            plan.update(nth=None)
            assert await warm.apply_many(batch) == [], (nth, mode)
            for entry in twins:
                await warm.apply(entry.record, entry.events, entry.context)
            for mine, theirs in zip(batch, twins, strict=True):
                (record_a, *rest_a), (record_b, *rest_b) = (
                    await state_of(warm, mine.record.id),
                    await state_of(warm, theirs.record.id),
                )
                assert record_a == msgspec.structs.replace(record_b, id=mine.record.id)
                assert rest_a == rest_b, (nth, mode)


# -- reviewer probes: a ledger clash hidden by a duplicate; events left by a cut-short batch ----


def at(
    session: SessionRecord, version: int, wid: str, events: Sequence[TimelineEvent] = ()
) -> OutboxEntry:
    return OutboxEntry(
        record=msgspec.structs.replace(session, version=version, write_id=wid),
        events=list(events),
    )


async def _diverges_one_by_one(warm: MongoWarmStore, entries: list[OutboxEntry]) -> bool:
    try:
        for e in entries:
            await warm.apply(e.record, e.events, e.context)
    except WriteDiverged:
        return True
    return False


@pytest.mark.parametrize("order", ["A,B,A", "A,A,B", "B,A,A"])
async def test_ledger_clash_with_a_duplicate_in_the_batch(warm: MongoWarmStore, order: str) -> None:
    """Two writes at v2 (A and B) and A delivered twice: `apply` raises WriteDiverged for B."""
    session = record(write_id="w1")
    twin = msgspec.structs.replace(session, id=session.id[::-1])
    await warm.insert(session)
    await warm.insert(twin)
    wid = {"A": "wid-A", "B": "wid-B"}
    batch = [at(session, 2, wid[x]) for x in order.split(",")]
    twins = [at(twin, 2, wid[x]) for x in order.split(",")]

    assert await _diverges_one_by_one(warm, twins), "apply meets the divergence"
    left = await warm.apply_many(batch)
    assert left, f"apply_many acknowledged a divergent write ({order}); left={left}"


async def test_ledger_already_holds_one_of_two_in_the_batch(warm: MongoWarmStore) -> None:
    """MongoDB noted A at v2 (delivered, ack lost); the batch holds B then A redelivered."""
    session = record(write_id="w1")
    await warm.insert(session)
    a = at(session, 2, "wid-A")
    await warm.apply(a.record, [])
    left = await warm.apply_many([at(session, 2, "wid-B"), a])
    assert left, "B clashes with A in the ledger, yet the batch leaves nothing to apply"


class _Wrap:
    def __init__(self, real: Any, **overrides: Any) -> None:
        self._real, self._overrides = real, overrides

    def __getattr__(self, name: str) -> Any:
        return self._overrides.get(name) or getattr(self._real, name)


async def test_a_delete_racing_a_batch_cut_short_leaves_no_orphan_events(
    warm: MongoWarmStore,
) -> None:
    """The session is deleted while the batch writes; the batch's last check (the find that
    takes back events of sessions gone) is lost with its connection. Redelivered, the batch
    finds the session gone and leaves it to `apply`, which (before the fix on this branch)
    returned False before it looked at events: the events stayed, with no session."""
    from pymongo.errors import AutoReconnect

    from sessionmgr.domain.errors import BackendUnavailable

    session = record(write_id="w1")
    await warm.insert(session)
    batch = [at(session, 2, "w2", [event(1), event(2)]), at(session, 3, "w3", [event(3)])]
    real_sessions, real_events = warm._sessions, warm._events
    finds = {"n": 0}

    async def insert_many(docs: list[dict[str, Any]], **kw: Any) -> Any:
        await real_sessions.delete_one({"_id": session.id})  # `delete` runs meanwhile...
        await real_events.delete_many({"session_id": session.id})
        return await real_events.insert_many(docs, **kw)

    def find(*a: Any, **kw: Any) -> Any:
        finds["n"] += 1
        cursor = real_sessions.find(*a, **kw)
        if finds["n"] == 2:

            async def lost(*_a: Any, **_k: Any) -> Any:
                raise AutoReconnect("injected: the deleted-meanwhile check is lost")

            cursor.to_list = lost
        return cursor

    warm._events = _Wrap(real_events, insert_many=insert_many)
    warm._sessions = _Wrap(real_sessions, find=find)
    with pytest.raises(BackendUnavailable):
        await warm.apply_many(batch)
    warm._events, warm._sessions = real_events, real_sessions

    left = await warm.apply_many(batch)  # the redelivery
    assert left == [0, 1]
    for i in left:
        assert await warm.apply(batch[i].record, batch[i].events) is False
    assert await warm.get(session.id) is None
    assert await warm.all_events(session.id) == [], "orphan events of a deleted session"


async def test_a_conflict_too_large_for_one_document_is_kept_in_parts(
    warm: MongoWarmStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two full records, `full_context` and a suspend's whole backlog of events can pass
    MongoDB's 16 MiB in one conflict document (issued as DocumentTooLarge, which left the
    write-behind retrying it forever). Past the limit (made 2 KiB here), the events, then the
    context, what MongoDB held, then what came in go to documents of their own (events in
    groups, the rest while the conflict's own document is too large yet); each
    names the conflict by a digest of its id. Kept once whatever the retries, and a
    session's delete takes them all."""
    monkeypatch.setattr(warm_store, "CONFLICT_DOCUMENT_BYTES", 2 * 1024)
    stored = record(write_id=new_write_id(), work_in_progress={"mongodb": "m" * 2500})
    await warm.insert(stored)
    incoming = msgspec.structs.replace(
        stored, write_id=new_write_id(), work_in_progress={"incoming": "i" * 2500}
    )
    events = [
        TimelineEvent(seq=i, at=utcnow(), actor="a", kind="note", data={"n": "e" * 700})
        for i in range(1, 11)
    ]
    context = ContextUpdate(version=1, value={"c": "c" * 2500})
    diverged = WriteDiverged(
        incoming, events, context, version_clash=True, stored=stored, stored_seq=0
    )

    monkeypatch.setattr(warm_store, "CONFLICT_EVENTS_PART_BYTES", 3 * 1024)
    assert await warm.keep_conflict(diverged)
    assert not await warm.keep_conflict(diverged), "kept once"
    kept = await warm._conflicts.find({"session_id": stored.id}).to_list(None)
    [main] = [d for d in kept if "part_of" not in d]
    parts = {d["_id"].split(":")[1]: d for d in kept if d.get("part_of") == main["parts"]}
    assert len(kept) == 1 + len(parts)
    assert main["incoming"]["events"] == [] and main["incoming"]["events_apart"] == 10
    assert main["incoming"]["context_apart"] and main["stored_apart"]
    assert main["incoming"]["record_apart"], "what came in was too large yet"
    assert parts["record"]["record"]["work_in_progress"] == incoming.work_in_progress
    groups = sorted((n for n in parts if n.startswith("events")), key=lambda n: int(n[6:]))
    assert len(groups) == 4, "about 3 KiB of events each"
    events_back = [e for name in groups for e in parts[name]["events"]]
    assert [e["data"] for e in events_back] == [e.data for e in events]
    assert parts["context"]["context"]["value"] == context.value
    assert parts["stored"]["stored"]["work_in_progress"] == stored.work_in_progress

    await warm.delete(stored.id)
    assert await warm._conflicts.count_documents({"session_id": stored.id}) == 0


async def test_a_conflict_that_fits_stays_one_document(warm: MongoWarmStore) -> None:
    stored = record(write_id=new_write_id())
    await warm.insert(stored)
    incoming = msgspec.structs.replace(stored, write_id=new_write_id())
    diverged = WriteDiverged(
        incoming, [event(1)], None, version_clash=True, stored=stored, stored_seq=0
    )
    assert await warm.keep_conflict(diverged)
    [kept] = await warm._conflicts.find({"session_id": stored.id}).to_list(None)
    assert len(kept["incoming"]["events"]) == 1
    assert "events_apart" not in kept["incoming"] and "part_of" not in kept


async def test_the_parts_of_a_conflict_of_many_events_stay_small(
    warm: MongoWarmStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The conflict's id lists every clashing seq; its parts are named by a digest of it,
    and its events go in groups, so a thousand events make a few short parts, not a
    thousand parts each carrying the long id (a review of the first form: 20 000 events
    made 5.6 GB of parts)."""
    monkeypatch.setattr(warm_store, "CONFLICT_DOCUMENT_BYTES", 16 * 1024)
    monkeypatch.setattr(warm_store, "CONFLICT_EVENTS_PART_BYTES", 64 * 1024)
    stored = record(write_id=new_write_id())
    await warm.insert(stored)
    incoming = msgspec.structs.replace(stored, write_id=new_write_id())
    events = [event(seq) for seq in range(100_000, 101_000)]
    diverged = WriteDiverged(
        incoming, events, None, version_clash=True, stored=stored, stored_seq=0
    )
    assert await warm.keep_conflict(diverged)
    kept = await warm._conflicts.find({"session_id": stored.id}).to_list(None)
    parts = [p for p in kept if "part_of" in p]
    assert 1 < len(parts) < 10
    assert all(len(p["_id"]) < 64 and len(p["part_of"]) == 32 for p in parts)
    assert sum(len(p.get("events", [])) for p in parts) == 1000
