"""The cold tier through HTTP, on a real redis-server and moto's S3 server (real aioboto3 calls):
archive → stub → rehydrate on read, and a session that is whole whatever fails on the way."""

from __future__ import annotations

import asyncio
import gzip
import logging
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import httpx
import msgspec
import pytest
from redis.asyncio import Redis
from redis.exceptions import TimeoutError as RedisTimeoutError

from sessionmgr.api.bridge import resolve
from sessionmgr.container import Container, build_container
from sessionmgr.domain.errors import BackendUnavailable, ConcurrencyConflict
from sessionmgr.services.archive import Archivist, sweep
from sessionmgr.settings import Settings
from sessionmgr.storage.cold import S3ArchiveStore
from sessionmgr.storage.hot import OUTBOX_STREAM, hot_key
from sessionmgr.storage.warm import MongoWarmStore
from tests.integration.conftest import serving
from tests.integration.session_api import (
    append_events,
    create_session,
    eventually,
    get_session,
    patch_session,
)

Headers = dict[str, str]


class Crash(Exception):
    """Stands for the process dying at this step: nothing after it runs."""


@pytest.fixture
async def cold(api: httpx.AsyncClient, app_container: Container) -> S3ArchiveStore:
    return await resolve(app_container.cold)


@pytest.fixture
def owner(auth: Callable[..., Headers]) -> Headers:
    return auth("alice")


async def _backlog(redis: Redis) -> int:
    try:
        return int(await redis.xlen(OUTBOX_STREAM))
    except RedisTimeoutError:  # the loop was held past the socket timeout: look again
        return -1


async def dormant_session(
    api: httpx.AsyncClient, redis: Redis, owner: Headers, events: int = 30
) -> dict[str, Any]:
    """A session with work, context, a participant and `events` events, suspended; its full
    read (include=full) is returned."""
    session = await create_session(api, owner, work_in_progress={"step": 1})
    sid = session["id"]
    await patch_session(
        api, owner, sid, 1, context_summary={"goal": "ship"}, full_context={"notes": "n" * 500}
    )
    r = await api.post(f"/v1/sessions/{sid}/participants", json={"mad_name": "p"}, headers=owner)
    assert r.status_code == 200, r.text
    # The in-memory MongoDB's inserts are synchronous scans on this loop: the write-behind
    # delivering several hundred events at once held it past Redis' socket timeout (3 s, on a
    # slow CI machine), which failed the append or suspend then in flight (a 503). So each
    # batch is delivered before the next is sent, and the backlog is empty before the suspend.
    for start in range(0, events, 100):
        batch = range(start + 1, min(start + 100, events) + 1)
        await append_events(api, owner, sid, *({"kind": "note", "data": {"n": i}} for i in batch))
        await eventually(lambda: _backlog(redis), lambda n: n == 0, timeout_s=60)
    r = await api.post(f"/v1/sessions/{sid}/suspend", headers=owner)
    assert r.status_code == 200, r.text
    # The write-behind re-delivers what suspend flushed; let it finish, so what MongoDB holds
    # below is the archive's doing alone.
    await eventually(lambda: _backlog(redis), lambda n: n == 0, timeout_s=60)
    return await get_session(api, owner, sid, full=True)


async def archive(api: httpx.AsyncClient, headers: Headers, sid: str) -> httpx.Response:
    return await api.post(f"/v1/sessions/{sid}/archive", headers=headers)


async def mongo_doc(warm: MongoWarmStore, sid: str) -> dict[str, Any] | None:
    return await warm._sessions.find_one({"_id": sid})  # type: ignore[no-any-return]


async def event_count(warm: MongoWarmStore, sid: str) -> int:
    return await warm._events.count_documents({"session_id": sid})  # type: ignore[no-any-return]


async def assert_only_stub(warm: MongoWarmStore, sid: str) -> dict[str, Any]:
    doc = await mongo_doc(warm, sid)
    assert doc is not None
    assert doc["state"] == "archived"
    assert "full_context" not in doc
    assert (doc["work_in_progress"], doc["context_summary"], doc["participants"]) == ({}, {}, {})
    assert "purge_pending" not in doc
    assert await event_count(warm, sid) == 0
    return doc


def same_session(after: dict[str, Any], before: dict[str, Any]) -> None:
    """Every field and event as it was; leases have ended (the session was suspended)."""
    assert after["state"] == "dormant"
    for name in (
        "id",
        "version",
        "owner_id",
        "acl",
        "created_at",
        "last_active",
        "participants",
        "work_in_progress",
        "context_summary",
        "recent_timeline",
        "full_context",
        "full_timeline",
    ):
        assert after[name] == before[name], name


# -- the lifecycle -----------------------------------------------------------------------------


async def test_a_long_session_goes_to_s3_and_comes_back_whole(
    api: httpx.AsyncClient,
    redis: Redis,
    warm: MongoWarmStore,
    cold: S3ArchiveStore,
    owner: Headers,
) -> None:
    """create → 1 000 events → suspend → archive → get → update → suspend → archive again."""
    before = await dormant_session(api, redis, owner, events=1000)
    sid = before["id"]
    assert len(before["full_timeline"]) == 1000

    r = await archive(api, owner, sid)

    assert r.status_code == 200, r.text
    stub = r.json()
    assert (stub["state"], stub["version"]) == ("archived", before["version"])
    ref = stub["archive"]
    created = before["created_at"]
    assert ref["key"] == f"sessions/{created[:4]}/{created[5:7]}/{sid}.json.gz"
    body = await cold.get(ref["key"])
    assert body is not None and len(body) == ref["size"]
    stored = msgspec.json.decode(gzip.decompress(body))
    assert len(stored["events"]) == 1000
    assert stored["context"]["value"] == {"notes": "n" * 500}
    doc = await assert_only_stub(warm, sid)
    assert doc["archive"]["sha256"] == ref["sha256"]
    listed = await api.get("/v1/sessions?state=archived", headers=owner)
    assert [s["id"] for s in listed.json()["items"]] == [sid]

    after = await get_session(api, owner, sid, full=True)

    same_session(after, before)
    assert await event_count(warm, sid) == 1000
    assert (await mongo_doc(warm, sid) or {}).get("archive") is None
    assert await cold.get(ref["key"]) == body, "the S3 copy is kept after a rehydration"

    updated = await patch_session(api, owner, sid, before["version"], work_in_progress={"s": 2})
    assert (updated["state"], updated["version"]) == ("active", before["version"] + 1)
    r = await api.post(f"/v1/sessions/{sid}/suspend", headers=owner)
    assert r.status_code == 200, r.text
    await eventually(lambda: _backlog(redis), lambda n: n == 0, timeout_s=60)
    again = await archive(api, owner, sid)
    assert again.status_code == 200, again.text
    assert again.json()["version"] == before["version"] + 1
    assert again.json()["archive"]["key"] == ref["key"], "one key per session"
    await assert_only_stub(warm, sid)
    final = await get_session(api, owner, sid, full=True)
    assert final["work_in_progress"] == {"s": 2}
    assert final["full_timeline"] == before["full_timeline"]


async def test_archiving_an_active_session_suspends_it_first(
    api: httpx.AsyncClient, warm: MongoWarmStore, owner: Headers
) -> None:
    session = await create_session(api, owner, work_in_progress={"live": True})
    await append_events(api, owner, session["id"], {"kind": "note", "data": {}})
    r = await archive(api, owner, session["id"])
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "archived"
    await assert_only_stub(warm, session["id"])
    got = await get_session(api, owner, session["id"], full=True)
    assert got["work_in_progress"] == {"live": True}
    assert [e["seq"] for e in got["full_timeline"]] == [1]


async def test_archive_twice_is_the_same_stub(
    api: httpx.AsyncClient, redis: Redis, warm: MongoWarmStore, owner: Headers
) -> None:
    before = await dormant_session(api, redis, owner)
    first = await archive(api, owner, before["id"])
    second = await archive(api, owner, before["id"])
    assert second.status_code == 200, second.text
    assert second.json() == first.json()


async def test_a_write_to_an_archived_session_rehydrates_and_activates_it(
    api: httpx.AsyncClient, redis: Redis, owner: Headers
) -> None:
    before = await dormant_session(api, redis, owner)
    sid = before["id"]
    assert (await archive(api, owner, sid)).status_code == 200
    updated = await patch_session(api, owner, sid, before["version"], context_summary={"x": 1})
    assert (updated["state"], updated["version"]) == ("active", before["version"] + 1)
    full = await get_session(api, owner, sid, full=True)
    assert full["full_timeline"] == before["full_timeline"]
    assert full["full_context"] == before["full_context"]


async def test_an_archive_written_under_at_each_try_answers_contended(
    api: httpx.AsyncClient, redis: Redis, owner: Headers, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The session moves on under each of the archive's three uploads: a 503 `contended` with
    Retry-After (it did not take effect; none of its versions was stale), not a 409 that
    names no version, and the session is still whole and not archived."""
    before = await dormant_session(api, redis, owner, events=3)
    sid = before["id"]
    tries: list[str] = []

    async def moved_on(self: Archivist, session_id: str, check: Any = None) -> Any:
        tries.append(session_id)
        raise ConcurrencyConflict(session_id, None)  # as a stub refused for its version

    monkeypatch.setattr(Archivist, "archive", moved_on)
    r = await archive(api, owner, sid)
    assert r.status_code == 503, r.text
    assert r.json()["type"].endswith("#contended")
    assert r.headers["retry-after"] == "1"
    assert tries == [sid] * 3
    assert (await get_session(api, owner, sid, full=True)) == before


async def test_a_rehydration_raced_at_each_try_answers_contended(
    api: httpx.AsyncClient,
    redis: Redis,
    warm: MongoWarmStore,
    owner: Headers,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another restore takes the stub's place under each of three tries, yet the stub is
    back each time: the read answers 503 `contended` (send it again), not a 409 that a read
    has no version for; the stub is as it was, and a later read rehydrates."""
    before = await dormant_session(api, redis, owner, events=3)
    sid = before["id"]
    assert (await archive(api, owner, sid)).status_code == 200
    stub = await mongo_doc(warm, sid)
    real = MongoWarmStore.restore
    restores: list[str] = []

    async def beaten(self: MongoWarmStore, *args: Any) -> bool:
        restores.append(sid)
        return False  # the stub it was conditioned on had changed

    monkeypatch.setattr(MongoWarmStore, "restore", beaten)
    r = await api.get(f"/v1/sessions/{sid}", headers=owner)
    assert r.status_code == 503, r.text
    assert r.json()["type"].endswith("#contended")
    assert restores == [sid] * 3
    assert await mongo_doc(warm, sid) == stub
    monkeypatch.setattr(MongoWarmStore, "restore", real)
    same_session(await get_session(api, owner, sid, full=True), before)


async def test_resume_of_an_archived_session(
    api: httpx.AsyncClient, redis: Redis, owner: Headers
) -> None:
    before = await dormant_session(api, redis, owner)
    assert (await archive(api, owner, before["id"])).status_code == 200
    r = await api.post(f"/v1/sessions/{before['id']}/resume", headers=owner)
    assert r.status_code == 200, r.text
    assert (r.json()["state"], r.json()["version"]) == ("active", before["version"])


async def test_delete_removes_the_s3_copy(
    api: httpx.AsyncClient, redis: Redis, warm: MongoWarmStore, cold: S3ArchiveStore, owner: Headers
) -> None:
    before = await dormant_session(api, redis, owner)
    key = (await archive(api, owner, before["id"])).json()["archive"]["key"]
    r = await api.delete(f"/v1/sessions/{before['id']}", headers=owner)
    assert r.status_code == 204, r.text
    assert await cold.get(key) is None
    assert await mongo_doc(warm, before["id"]) is None
    assert (await api.get(f"/v1/sessions/{before['id']}", headers=owner)).status_code == 404


async def test_a_delete_that_cannot_reach_s3_changes_nothing(
    api: httpx.AsyncClient,
    redis: Redis,
    cold: S3ArchiveStore,
    owner: Headers,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    before = await dormant_session(api, redis, owner)
    sid = before["id"]
    assert (await archive(api, owner, sid)).status_code == 200

    async def s3_down(key: str) -> None:
        raise BackendUnavailable("s3", "EndpointConnectionError")

    with monkeypatch.context() as patch:
        patch.setattr(cold, "delete", s3_down)
        r = await api.delete(f"/v1/sessions/{sid}", headers=owner)
        assert r.status_code == 503, r.text
        assert r.json()["backend"] == "s3"
    same_session(await get_session(api, owner, sid, full=True), before)
    updated = await patch_session(api, owner, sid, before["version"], work_in_progress={})
    assert updated["state"] == "active", "no tombstone was left behind"
    assert (await api.delete(f"/v1/sessions/{sid}", headers=owner)).status_code == 204


async def test_a_session_being_archived_is_not_deleted_under_it(
    api: httpx.AsyncClient, redis: Redis, app_container: Container, owner: Headers
) -> None:
    before = await dormant_session(api, redis, owner)
    hot = await resolve(app_container.hot)
    token = await hot.fence(before["id"], 30)  # an archiver elsewhere holds it
    assert token is not None
    r = await api.delete(f"/v1/sessions/{before['id']}", headers=owner)
    assert r.status_code == 503, r.text
    assert "being archived" in r.json()["detail"]
    r = await api.patch(
        f"/v1/sessions/{before['id']}",
        json={"expected_version": before["version"], "patch": {"work_in_progress": {}}},
        headers=owner,
    )
    assert r.status_code == 503, "no replica loads a session an archiver holds"
    await hot.unfence(before["id"], token)
    assert (await api.delete(f"/v1/sessions/{before['id']}", headers=owner)).status_code == 204


# -- access is decided on the stub, before S3 ------------------------------------------------


async def test_a_stranger_never_triggers_a_rehydration(
    api: httpx.AsyncClient,
    redis: Redis,
    warm: MongoWarmStore,
    cold: S3ArchiveStore,
    owner: Headers,
    auth: Callable[..., Headers],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    before = await dormant_session(api, redis, owner)
    sid = before["id"]
    assert (await archive(api, owner, sid)).status_code == 200
    reads: list[str] = []
    real_get = cold.get

    async def counting_get(key: str) -> bytes | None:
        reads.append(key)
        return await real_get(key)

    monkeypatch.setattr(cold, "get", counting_get)
    for call in (
        api.get(f"/v1/sessions/{sid}", headers=auth("mallory")),
        api.patch(
            f"/v1/sessions/{sid}",
            json={"expected_version": before["version"], "patch": {"work_in_progress": {}}},
            headers=auth("mallory"),
        ),
        api.post(f"/v1/sessions/{sid}/resume", headers=auth("mallory")),
        archive(api, auth("mad:p"), sid),  # in the ACL, but archive is the owner's
    ):
        r = await call
        assert r.status_code == 403, r.text
    assert reads == []
    await assert_only_stub(warm, sid)
    listed = await api.get("/v1/sessions?state=archived", headers=owner)
    assert [s["id"] for s in listed.json()["items"]] == [sid]
    assert reads == [], "listing reads the stubs only"


async def test_concurrent_reads_rehydrate_once(
    api: httpx.AsyncClient,
    redis: Redis,
    warm: MongoWarmStore,
    cold: S3ArchiveStore,
    owner: Headers,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    before = await dormant_session(api, redis, owner, events=200)
    sid = before["id"]
    assert (await archive(api, owner, sid)).status_code == 200
    reads: list[str] = []
    real_get = cold.get

    async def slow_get(key: str) -> bytes | None:
        reads.append(key)
        await asyncio.sleep(0.2)  # every reader arrives while the first download runs
        return await real_get(key)

    monkeypatch.setattr(cold, "get", slow_get)
    reads_at_once = (api.get(f"/v1/sessions/{sid}", headers=owner) for _ in range(8))
    answers = await asyncio.gather(*reads_at_once)
    assert [a.status_code for a in answers] == [200] * 8
    assert len({a.text for a in answers}) == 1
    assert answers[0].json()["version"] == before["version"]
    assert len(reads) == 1
    assert await event_count(warm, sid) == 200


# -- a broken or missing S3 object -----------------------------------------------------------


@pytest.mark.parametrize("damage", ["corrupt", "truncated", "missing"])
async def test_a_bad_s3_object_is_a_clear_503_and_the_stub_stays(
    api: httpx.AsyncClient,
    redis: Redis,
    warm: MongoWarmStore,
    cold: S3ArchiveStore,
    owner: Headers,
    caplog: pytest.LogCaptureFixture,
    damage: str,
) -> None:
    before = await dormant_session(api, redis, owner)
    sid = before["id"]
    key = (await archive(api, owner, sid)).json()["archive"]["key"]
    stub = await mongo_doc(warm, sid)
    body = await cold.get(key)
    assert body is not None
    if damage == "missing":
        await cold.delete(key)
    elif damage == "truncated":
        await cold.put(key, body[: len(body) // 2])
    else:
        await cold.put(key, body[:-1] + bytes([body[-1] ^ 0xFF]))

    with caplog.at_level(logging.ERROR, logger="sessionmgr.services.archive"):
        for path in (f"/v1/sessions/{sid}", f"/v1/sessions/{sid}?include=full"):
            r = await api.get(path, headers=owner)
            assert r.status_code == 503, r.text
            assert r.json()["backend"] == "s3"
            assert sid in r.json()["detail"]
            assert r.headers["retry-after"]
        r = await api.patch(
            f"/v1/sessions/{sid}",
            json={"expected_version": before["version"], "patch": {"work_in_progress": {}}},
            headers=owner,
        )
        assert r.status_code == 503, r.text

    assert any(sid in rec.getMessage() for rec in caplog.records), caplog.text
    assert await mongo_doc(warm, sid) == stub, "the stub is untouched"
    assert await event_count(warm, sid) == 0, "no half-restored timeline"
    assert not await redis.exists(hot_key(sid))
    await cold.put(key, body)  # the object comes back (from a backup, say): so does the session
    same_session(await get_session(api, owner, sid, full=True), before)


async def test_s3_unreachable_is_503_and_changes_nothing(
    settings: Settings, auth: Callable[..., Headers]
) -> None:
    from tests.support.redis_server import free_port

    dead = msgspec.structs.replace(settings, s3_endpoint_url=f"http://127.0.0.1:{free_port()}")
    owner = auth("alice")
    async with serving(build_container(dead)) as api:
        session = await create_session(api, owner, work_in_progress={"k": 1})
        r = await archive(api, owner, session["id"])
        assert r.status_code == 503, r.text
        assert r.json()["backend"] == "s3"
        assert r.headers["retry-after"]
        got = await get_session(api, owner, session["id"], full=True)
        assert (got["state"], got["work_in_progress"]) == ("dormant", {"k": 1})


# -- crashes at every step --------------------------------------------------------------------


def fail(step: str) -> Callable[..., Any]:
    async def crash(*args: Any, **kwargs: Any) -> Any:
        raise Crash(step)

    return crash


ARCHIVE_STEPS = {
    "upload": ("cold", "put"),
    "verify": ("cold", "size"),
    "stub write": ("warm", "to_stub"),
    "events delete": ("warm", "purge_events"),
}


@pytest.mark.parametrize("then", ["rerun", "read"])
@pytest.mark.parametrize("step", list(ARCHIVE_STEPS))
async def test_an_archive_that_dies_at_any_step_loses_nothing(
    api: httpx.AsyncClient,
    redis: Redis,
    warm: MongoWarmStore,
    cold: S3ArchiveStore,
    app_container: Container,
    owner: Headers,
    monkeypatch: pytest.MonkeyPatch,
    step: str,
    then: str,
) -> None:
    before = await dormant_session(api, redis, owner, events=120)
    sid = before["id"]
    target = cold if ARCHIVE_STEPS[step][0] == "cold" else warm
    with monkeypatch.context() as patch:
        patch.setattr(target, ARCHIVE_STEPS[step][1], fail(step))
        r = await archive(api, owner, sid)
        assert r.status_code == 500, r.text

    # Whatever happened, the session reads whole (a read after a late crash rehydrates it).
    if then == "read":
        same_session(await get_session(api, owner, sid, full=True), before)
        assert await event_count(warm, sid) == 120
    # A re-run (the sweep picks up what an archive left half-done) finishes the job.
    archivist: Archivist = await resolve(app_container.archivist)
    result = await sweep(archivist, timedelta(0), limit=10, dry_run=False, report=lambda _: None)
    assert result.failed == []
    await assert_only_stub(warm, sid)
    same_session(await get_session(api, owner, sid, full=True), before)
    assert await event_count(warm, sid) == 120


REHYDRATE_STEPS = ["download", "events insert", "restore", "after restore"]


@pytest.mark.parametrize("step", REHYDRATE_STEPS)
async def test_a_rehydration_that_dies_at_any_step_loses_nothing(
    api: httpx.AsyncClient,
    redis: Redis,
    warm: MongoWarmStore,
    cold: S3ArchiveStore,
    owner: Headers,
    monkeypatch: pytest.MonkeyPatch,
    step: str,
) -> None:
    before = await dormant_session(api, redis, owner, events=150)
    sid = before["id"]
    assert (await archive(api, owner, sid)).status_code == 200
    real_insert = warm.insert_events
    inserts = 0

    async def insert_then_crash(session_id: str, events: list[Any]) -> None:
        nonlocal inserts
        inserts += 1
        await real_insert(session_id, events)
        if step == "after restore" and inserts == 2:
            raise Crash(step)  # the document is back; its events are already there too

    with monkeypatch.context() as patch:
        if step == "download":
            patch.setattr(cold, "get", fail(step))
        elif step == "events insert":
            patch.setattr(warm, "insert_events", fail(step))
        elif step == "restore":
            patch.setattr(warm, "insert_events", insert_then_crash)
            patch.setattr(warm._sessions, "replace_one", fail(step))
        else:
            patch.setattr(warm, "insert_events", insert_then_crash)
        r = await api.get(f"/v1/sessions/{sid}", headers=owner)
        assert r.status_code in (200, 500), r.text

    doc = await mongo_doc(warm, sid)
    assert doc is not None
    if step in ("download", "events insert", "restore"):
        assert r.status_code == 500
        assert doc["state"] == "archived", "the stub stays until the document replaces it"
    # A re-run (the next read) finishes the job: every event once, every field as it was.
    same_session(await get_session(api, owner, sid, full=True), before)
    assert await event_count(warm, sid) == 150


async def test_a_restore_racing_the_events_delete_keeps_every_event(
    api: httpx.AsyncClient,
    redis: Redis,
    warm: MongoWarmStore,
    owner: Headers,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A reader rehydrates between the archive's stub write and its events delete."""
    before = await dormant_session(api, redis, owner, events=50)
    sid = before["id"]
    real_purge = warm.purge_events

    async def read_first(session_id: str) -> None:
        r = await api.get(f"/v1/sessions/{session_id}", headers=owner)  # rehydrates
        assert r.status_code == 200, r.text
        await real_purge(session_id)

    monkeypatch.setattr(warm, "purge_events", read_first)
    assert (await archive(api, owner, sid)).status_code == 200
    monkeypatch.undo()
    same_session(await get_session(api, owner, sid, full=True), before)
    assert await event_count(warm, sid) == 50


# -- the sweep ------------------------------------------------------------------------------


async def test_two_sweeps_at_once_archive_each_session_once(
    api: httpx.AsyncClient,
    redis: Redis,
    warm: MongoWarmStore,
    cold: S3ArchiveStore,
    app_container: Container,
    owner: Headers,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sessions = [await dormant_session(api, redis, owner, events=5) for _ in range(6)]
    archivist: Archivist = await resolve(app_container.archivist)
    # A second replica's archivist: its own in-flight table, the same backends.
    other = Archivist(
        await resolve(app_container.hot), warm, cold, await resolve(app_container.metrics)
    )
    puts: list[str] = []
    real_put = cold.put

    async def slow_put(key: str, body: bytes) -> None:
        puts.append(key)
        await asyncio.sleep(0.05)  # keep both sweeps in flight together
        await real_put(key, body)

    monkeypatch.setattr(cold, "put", slow_put)
    lines: list[str] = []
    one, two = await asyncio.gather(
        sweep(archivist, timedelta(0), limit=100, dry_run=False, report=lines.append),
        sweep(other, timedelta(0), limit=100, dry_run=False, report=lines.append),
    )
    assert one.failed == two.failed == []
    assert one.archived + two.archived == 6, lines
    assert one.skipped + two.skipped == 6, lines
    assert len(puts) == 6, "each session uploaded once"
    for s in sessions:
        await assert_only_stub(warm, s["id"])
        same_session(await get_session(api, owner, s["id"], full=True), s)


async def test_the_sweep_leaves_hot_and_recent_sessions_alone(
    api: httpx.AsyncClient, redis: Redis, app_container: Container, owner: Headers
) -> None:
    hot = await create_session(api, owner)
    dormant = await dormant_session(api, redis, owner, events=1)
    archivist: Archivist = await resolve(app_container.archivist)
    lines: list[str] = []
    recent = await sweep(archivist, timedelta(days=1), limit=10, dry_run=False, report=lines.append)
    assert (recent.selected, recent.archived) == (0, 0), lines
    everything = await sweep(archivist, timedelta(0), limit=10, dry_run=False, report=lines.append)
    assert (everything.archived, everything.skipped) == (1, 1), lines
    assert any("active in Redis" in line and hot["id"] in line for line in lines), lines
    assert (await get_session(api, owner, hot["id"]))["state"] == "active"
    assert (await get_session(api, owner, dormant["id"]))["state"] == "dormant"


async def test_an_archive_failure_in_the_sweep_is_reported_and_counted(
    api: httpx.AsyncClient,
    redis: Redis,
    cold: S3ArchiveStore,
    app_container: Container,
    owner: Headers,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    session = await dormant_session(api, redis, owner, events=1)

    async def s3_down(key: str, body: bytes) -> None:
        raise BackendUnavailable("s3", "EndpointConnectionError")

    monkeypatch.setattr(cold, "put", s3_down)
    archivist: Archivist = await resolve(app_container.archivist)
    lines: list[str] = []
    result = await sweep(archivist, timedelta(0), limit=10, dry_run=False, report=lines.append)
    assert result.failed == [session["id"]]
    assert any("FAILED" in line and session["id"] in line for line in lines), lines
    assert (await get_session(api, owner, session["id"]))["state"] == "dormant"


async def test_metrics_count_archives_and_rehydrations(
    api: httpx.AsyncClient,
    redis: Redis,
    cold: S3ArchiveStore,
    app_container: Container,
    owner: Headers,
) -> None:
    registry = app_container.metrics().registry

    def sample(name: str, **labels: str) -> float:
        return registry.get_sample_value(name, labels) or 0.0

    good = await dormant_session(api, redis, owner, events=3)
    bad = await dormant_session(api, redis, owner, events=3)
    assert (await archive(api, owner, good["id"])).status_code == 200
    assert (await archive(api, owner, good["id"])).status_code == 200  # nothing to do
    key = (await archive(api, owner, bad["id"])).json()["archive"]["key"]
    await cold.delete(key)
    assert (await api.get(f"/v1/sessions/{good['id']}", headers=owner)).status_code == 200
    assert (await api.get(f"/v1/sessions/{bad['id']}", headers=owner)).status_code == 503

    assert sample("sessionmgr_archives_total", outcome="ok") == 2
    assert sample("sessionmgr_archive_duration_seconds_count") == 2
    assert sample("sessionmgr_rehydrations_total", outcome="ok") == 1
    assert sample("sessionmgr_rehydrations_total", outcome="error") == 1
    assert sample("sessionmgr_rehydrate_duration_seconds_count") == 2
    assert sample("sessionmgr_retrievals_total", tier="cold") == 1
    response = await api.get("/metrics")
    assert 'sessionmgr_archives_total{outcome="ok"} 2.0' in response.text


@pytest.mark.parametrize("step", ["upload", "stub write"])
async def test_an_archive_cancelled_mid_step_releases_the_session(
    api: httpx.AsyncClient,
    redis: Redis,
    warm: MongoWarmStore,
    cold: S3ArchiveStore,
    app_container: Container,
    owner: Headers,
    monkeypatch: pytest.MonkeyPatch,
    step: str,
) -> None:
    """A task cancelled while it waits on S3 or MongoDB (a shutdown, a client gone)."""
    before = await dormant_session(api, redis, owner, events=40)
    sid = before["id"]
    reached, never = asyncio.Event(), asyncio.Event()

    async def hang(*args: Any) -> Any:
        reached.set()
        await never.wait()

    target, name = (cold, "put") if step == "upload" else (warm, "to_stub")
    archivist: Archivist = await resolve(app_container.archivist)
    with monkeypatch.context() as patch:
        patch.setattr(target, name, hang)
        running = asyncio.create_task(archivist.archive(sid))
        await asyncio.wait_for(reached.wait(), 5)
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running

    # The fence went with it: the session can be written at once, and archived again later.
    updated = await patch_session(api, owner, sid, before["version"], work_in_progress={"w": 1})
    assert updated["state"] == "active"
    r = await archive(api, owner, sid)
    assert r.status_code == 200, r.text
    await assert_only_stub(warm, sid)
    after = await get_session(api, owner, sid, full=True)
    assert after["full_timeline"] == before["full_timeline"]
    assert after["work_in_progress"] == {"w": 1}
