"""A session's life through every tier: create, work, suspend, come back, delete."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
from redis.asyncio import Redis

from sessionmgr.container import RedisWriteBehindWorker as WriteBehindWorker
from sessionmgr.storage import keys
from sessionmgr.storage.feed import feed_key
from sessionmgr.storage.hot import (
    gone_key,
    hot_key,
    outbox_key,
    timeline_key,
)
from sessionmgr.storage.warm import MongoWarmStore
from tests.integration.session_api import (
    append_events,
    create_session,
    eventually,
    get_session,
    keys_of,
    only_deleted_in_feed,
    patch_session,
)

EVENTS = 25
RECENT = 20  # the settings' recent_timeline
Headers = dict[str, str]


async def build_up(api: httpx.AsyncClient, owner: Headers) -> dict[str, Any]:
    """create → update → 25 timeline events in 5 appends → add a participant."""
    session = await create_session(
        api, owner, work_in_progress={"step": 0}, context_summary={"topic": "lifecycle"}
    )
    sid = session["id"]
    await patch_session(
        api,
        owner,
        sid,
        1,
        work_in_progress={"step": 1, "plan": ["draft", "review"]},
        context_summary={"topic": "lifecycle", "mood": "fine"},
        full_context={"notes": "x" * 1000},
    )
    for batch in range(5):
        result = await append_events(
            api,
            owner,
            sid,
            *({"kind": "note", "data": {"n": batch * 5 + i}} for i in range(1, 6)),
        )
        assert (result["first_seq"], result["last_seq"]) == (batch * 5 + 1, batch * 5 + 5)
    response = await api.post(
        f"/v1/sessions/{sid}/participants", json={"mad_name": "planner"}, headers=owner
    )
    assert response.status_code == 200, response.text
    active = await get_session(api, owner, sid)
    assert active["version"] == 1 + 1 + 5 + 1
    assert active["acl"] == ["mad:planner"]
    assert [e["seq"] for e in active["recent_timeline"]] == list(range(6, EVENTS + 1))
    return active


def assert_every_event(timeline: list[dict[str, Any]], actor: str = "alice") -> None:
    """The 25 events of `build_up`, each once, in seq order, as they were sent."""
    assert [e["seq"] for e in timeline] == list(range(1, EVENTS + 1))
    assert [e["data"]["n"] for e in timeline] == list(range(1, EVENTS + 1))
    assert {(e["kind"], e["actor"]) for e in timeline} == {("note", actor)}


def same_content(dormant: dict[str, Any], active: dict[str, Any]) -> None:
    """A dormant session reads as the active one did (`active` read without include=full)."""
    for name in ("id", "version", "owner_id", "acl", "created_at", "last_active"):
        assert dormant[name] == active[name], name
    for name in ("work_in_progress", "context_summary"):
        assert dormant[name] == active[name], name
    assert dormant["full_context"] == {"notes": "x" * 1000}
    assert dormant["participants"].keys() == active["participants"].keys()
    for mad, participant in dormant["participants"].items():
        assert participant["joined_at"] == active["participants"][mad]["joined_at"]
    assert dormant["recent_timeline"] == active["recent_timeline"]
    assert_every_event(dormant["full_timeline"])
    assert dormant["recent_timeline"] == dormant["full_timeline"][-RECENT:]


async def outbox_mentions(redis: Redis, session_id: str) -> list[str]:
    """Outbox or dead-letter entries that still carry this session's data."""
    found = []
    dead = keys.dead_letters(keys.partition_of(session_id))
    for stream in (outbox_key(session_id), dead):
        for entry_id, fields in await redis.xrange(stream):
            if any(session_id.encode() in value for value in fields.values()):
                found.append(f"{stream}/{entry_id.decode()}")
    return found


async def test_session_lifecycle_through_every_tier(
    api: httpx.AsyncClient, auth: Callable[..., Headers], redis: Redis, warm: MongoWarmStore
) -> None:
    owner = auth("alice")
    active = await build_up(api, owner)
    sid = active["id"]

    response = await api.post(f"/v1/sessions/{sid}/suspend", headers=owner)
    assert response.status_code == 200, response.text
    assert response.json()["state"] == "dormant"
    assert response.json()["version"] == active["version"]
    assert not await redis.exists(hot_key(sid), timeline_key(sid))

    # The first 5 events reach MongoDB by the write-behind only (Redis kept the last 20).
    dormant = await eventually(
        lambda: get_session(api, owner, sid, full=True),
        lambda s: len(s["full_timeline"]) == EVENTS,
    )
    assert dormant["state"] == "dormant"
    same_content(dormant, active)
    assert [e["seq"] for e in dormant["recent_timeline"]] == list(range(6, EVENTS + 1))
    plain = await get_session(api, owner, sid)
    assert plain["state"] == "dormant"
    assert plain["recent_timeline"] == dormant["recent_timeline"]
    assert "full_timeline" not in plain
    assert not await redis.exists(hot_key(sid)), "a read must not bring the session back"
    suspended = await warm.get(sid)
    assert suspended is not None
    assert (suspended.version, suspended.state) == (active["version"], "dormant")

    # An update at the current version brings it back into Redis as active.
    resumed = await patch_session(api, owner, sid, active["version"], work_in_progress={"step": 2})
    assert resumed["state"] == "active"
    assert resumed["version"] == active["version"] + 1
    assert resumed["work_in_progress"] == {"step": 2}
    assert resumed["context_summary"] == active["context_summary"]
    assert resumed["acl"] == active["acl"]
    assert resumed["recent_timeline"] == active["recent_timeline"]
    assert await redis.exists(hot_key(sid))
    stored = await eventually(
        lambda: warm.get(sid), lambda r: r is not None and r.version == resumed["version"]
    )
    assert stored is not None
    assert (stored.version, stored.state) == (resumed["version"], "active")

    response = await api.delete(f"/v1/sessions/{sid}", headers=owner)
    assert response.status_code == 204, response.text
    response = await api.get(f"/v1/sessions/{sid}", headers=owner)
    assert response.status_code == 404, response.text

    # Nothing of the session may stay in Redis; only the bare tombstone that stops another
    # replica from bringing it back is allowed, and only for a bounded time.
    assert await keys_of(redis, sid) == {gone_key(sid), feed_key(sid)}
    assert await only_deleted_in_feed(redis, sid)
    assert await redis.get(gone_key(sid)) == b"1"
    assert 0 < await redis.ttl(gone_key(sid)) <= 86_400
    assert await eventually(lambda: outbox_mentions(redis, sid), lambda found: not found) == []
    assert await warm.get(sid) is None
    assert await warm.all_events(sid) == []


async def drain(redis: Redis, warm: MongoWarmStore) -> int:
    """Run a write-behind worker by hand until the outbox is empty; returns what it delivered."""
    worker = WriteBehindWorker(redis, warm, consumer="drain", block_ms=10, claim_idle_ms=100)
    await worker.ensure_group()
    delivered = 0
    for _ in range(50):
        delivered += await worker.step(block_ms=10)
        if await worker.pending() == 0:
            return delivered
    raise AssertionError(f"the outbox did not drain: {await worker.pending()} entries left")


async def test_suspend_before_the_write_behind_ran_keeps_every_event(
    manual_api: httpx.AsyncClient,
    auth: Callable[..., Headers],
    manual_redis: Redis,
    manual_warm: MongoWarmStore,
) -> None:
    """Redis holds only the last 20 events; the first 5 are in the outbox when it suspends."""
    owner = auth("alice")
    active = await build_up(manual_api, owner)
    sid = active["id"]

    response = await manual_api.post(f"/v1/sessions/{sid}/suspend", headers=owner)
    assert response.status_code == 200, response.text
    assert await drain(manual_redis, manual_warm) == 1 + 5 + 1  # late entries, all harmless

    dormant = await get_session(manual_api, owner, sid, full=True)
    assert dormant["state"] == "dormant"
    same_content(dormant, active)
    stored = await manual_warm.get(sid)
    assert stored is not None
    assert (stored.version, stored.state) == (active["version"], "dormant")


async def test_full_timeline_of_an_active_session_has_every_acknowledged_event(
    manual_api: httpx.AsyncClient, auth: Callable[..., Headers]
) -> None:
    """`?include=full` right after the appends, before the write-behind has delivered them.

    Every append was answered 200; seq numbers are gap-free; a reader of the full timeline
    must not be handed seq 6..25 without 1..5 just because MongoDB is behind Redis.
    """
    owner = auth("alice")
    active = await build_up(manual_api, owner)

    full = await get_session(manual_api, owner, active["id"], full=True)

    assert_every_event(full["full_timeline"])


async def test_write_behind_after_delete_does_not_bring_the_session_back(
    manual_api: httpx.AsyncClient,
    auth: Callable[..., Headers],
    manual_redis: Redis,
    manual_warm: MongoWarmStore,
) -> None:
    owner = auth("alice")
    active = await build_up(manual_api, owner)
    sid = active["id"]

    response = await manual_api.delete(f"/v1/sessions/{sid}", headers=owner)
    assert response.status_code == 204, response.text
    await drain(manual_redis, manual_warm)

    assert await manual_warm.get(sid) is None
    assert await manual_warm.all_events(sid) == []
    assert await outbox_mentions(manual_redis, sid) == []
    assert (await manual_api.get(f"/v1/sessions/{sid}", headers=owner)).status_code == 404
    assert await keys_of(manual_redis, sid) == {gone_key(sid), feed_key(sid)}
    assert await only_deleted_in_feed(manual_redis, sid)


async def test_delete_leaves_no_copy_of_the_session_in_redis(
    api: httpx.AsyncClient, auth: Callable[..., Headers], redis: Redis
) -> None:
    """Writes made with an Idempotency-Key keep their answer (the session body) in Redis."""
    owner = auth("alice")
    sid = (await create_session(api, owner))["id"]
    secret = {"plan": "the confidential plan"}
    response = await api.patch(
        f"/v1/sessions/{sid}",
        json={"expected_version": 1, "patch": {"work_in_progress": secret}},
        headers={**owner, "Idempotency-Key": "patch-1"},
    )
    assert response.status_code == 200, response.text
    response = await api.post(
        f"/v1/sessions/{sid}/timeline",
        json={"events": [{"kind": "note", "data": secret}]},
        headers={**owner, "Idempotency-Key": "append-1"},
    )
    assert response.status_code == 200, response.text

    response = await api.delete(f"/v1/sessions/{sid}", headers=owner)
    assert response.status_code == 204, response.text

    assert await keys_of(redis, sid) == {gone_key(sid), feed_key(sid)}
    assert await only_deleted_in_feed(redis, sid)
