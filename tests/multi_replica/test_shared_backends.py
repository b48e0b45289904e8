"""Three replicas on shared backends, driven over HTTP: what one replica writes, another reads,
archives, rehydrates, finishes or deletes."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest
import redis as redis_sync
from pymongo import MongoClient

from sessionmgr.storage import keys
from sessionmgr.storage.outbox import GROUP
from tests.multi_replica.conftest import Stack, bearer

DRAIN_TIMEOUT_S = 30.0


async def create(node: httpx.AsyncClient, owner: str, **body: Any) -> dict[str, Any]:
    r = await node.post("/v1/sessions", json=body, headers=bearer(owner))
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


async def full(node: httpx.AsyncClient, sid: str, owner: str) -> dict[str, Any]:
    r = await node.get(f"/v1/sessions/{sid}?include=full", headers=bearer(owner))
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


async def patch(
    node: httpx.AsyncClient, sid: str, owner: str, version: int, **fields: Any
) -> httpx.Response:
    body = {"expected_version": version, "patch": fields}
    return await node.patch(f"/v1/sessions/{sid}", json=body, headers=bearer(owner))


async def append(node: httpx.AsyncClient, sid: str, owner: str, *notes: int) -> dict[str, Any]:
    body = {"events": [{"kind": "note", "data": {"n": n}} for n in notes]}
    r = await node.post(f"/v1/sessions/{sid}/timeline", json=body, headers=bearer(owner))
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


async def suspend(node: httpx.AsyncClient, sid: str, owner: str) -> dict[str, Any]:
    r = await node.post(f"/v1/sessions/{sid}/suspend", headers=bearer(owner))
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "dormant", r.text
    return r.json()  # type: ignore[no-any-return]


async def test_a_session_created_on_each_replica_is_read_on_every_other(
    nodes: list[httpx.AsyncClient], owner: str
) -> None:
    made = [await create(node, owner, work_in_progress={"on": i}) for i, node in enumerate(nodes)]
    for i, node in enumerate(nodes):
        for made_on, session in enumerate(made):
            r = await node.get(f"/v1/sessions/{session['id']}", headers=bearer(owner))
            assert r.status_code == 200, (i, r.text)
            assert r.json()["work_in_progress"] == {"on": made_on}
            assert r.json()["version"] == 1


async def test_concurrent_patches_at_one_version_through_every_replica_one_wins(
    nodes: list[httpx.AsyncClient], owner: str
) -> None:
    sid = (await create(nodes[0], owner))["id"]
    tries = [(nodes[i % len(nodes)], i) for i in range(9)]
    answers = await asyncio.gather(
        *(patch(node, sid, owner, 1, work_in_progress={"writer": i}) for node, i in tries)
    )
    statuses = sorted(r.status_code for r in answers)
    assert statuses == [200] + [409] * 8, [r.text for r in answers]
    winner = next(r.json() for r in answers if r.status_code == 200)
    assert winner["version"] == 2
    for node in nodes:
        got = await full(node, sid, owner)
        assert (got["version"], got["work_in_progress"]) == (2, winner["work_in_progress"])


async def test_appends_on_one_suspend_on_another_full_read_on_a_third(
    nodes: list[httpx.AsyncClient], owner: str
) -> None:
    a, b, c = nodes
    sid = (await create(a, owner))["id"]
    r = await patch(a, sid, owner, 1, full_context={"doc": "big"})
    assert r.status_code == 200, r.text
    for start in range(0, 30, 5):
        await append(a, sid, owner, *range(start, start + 5))
    suspended = await suspend(b, sid, owner)
    assert suspended["version"] == 8
    got = await full(c, sid, owner)
    assert (got["state"], got["version"]) == ("dormant", 8)
    assert [e["data"]["n"] for e in got["full_timeline"]] == list(range(30))
    assert [e["seq"] for e in got["full_timeline"]] == list(range(1, 31))
    assert got["full_context"] == {"doc": "big"}


async def test_archived_on_one_replica_rehydrated_by_another(
    nodes: list[httpx.AsyncClient], owner: str
) -> None:
    a, b, c = nodes
    sid = (await create(a, owner, work_in_progress={"step": 1}))["id"]
    await append(b, sid, owner, *range(12))
    await suspend(c, sid, owner)
    before = await full(a, sid, owner)
    archived = await a.post(f"/v1/sessions/{sid}/archive", headers=bearer(owner))
    assert archived.status_code == 200, archived.text
    assert archived.json()["state"] == "archived"
    after = await full(b, sid, owner)
    assert after["state"] == "dormant"
    for name in ("version", "full_timeline", "full_context", "work_in_progress"):
        assert after[name] == before[name], name
    again = await patch(c, sid, owner, before["version"], work_in_progress={"step": 2})
    assert again.status_code == 200, again.text
    assert (again.json()["state"], again.json()["version"]) == ("active", before["version"] + 1)


async def test_pages_of_a_list_read_through_alternating_replicas(
    nodes: list[httpx.AsyncClient], owner: str
) -> None:
    made = {(await create(nodes[i % 3], owner))["id"] for i in range(7)}
    seen: list[str] = []
    cursor: str | None = None
    for page in range(10):
        params: dict[str, Any] = {"limit": 3, **({"cursor": cursor} if cursor else {})}
        r = await nodes[page % 3].get("/v1/sessions", params=params, headers=bearer(owner))
        assert r.status_code == 200, r.text
        seen += [s["id"] for s in r.json()["items"]]
        cursor = r.json()["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == sorted(made), "every session once, none twice"


async def test_deleted_on_one_replica_is_gone_on_all(
    nodes: list[httpx.AsyncClient], owner: str
) -> None:
    a, b, c = nodes
    sid = (await create(b, owner))["id"]
    await append(c, sid, owner, 1, 2)
    assert (await a.delete(f"/v1/sessions/{sid}", headers=bearer(owner))).status_code == 204
    for node in nodes:
        r = await node.get(f"/v1/sessions/{sid}", headers=bearer(owner))
        assert r.status_code == 404, r.text
    listed = await c.get("/v1/sessions", headers=bearer(owner))
    assert sid not in [s["id"] for s in listed.json()["items"]]


# The replicas run with the default layout (their environment has no SESSIONMGR_* variable).
STREAMS = [keys.outbox(p) for p in range(keys.DEFAULT_PARTITIONS)]


def _pending_by_consumer(redis_url: str) -> dict[str, int]:
    held: dict[str, int] = {}
    with redis_sync.Redis.from_url(redis_url) as r:
        for stream in STREAMS:
            if not r.exists(stream):
                continue
            for c in r.xpending(stream, GROUP)["consumers"]:
                name = c["name"].decode()
                held[name] = held.get(name, 0) + int(c["pending"])
    return held


def _outbox_len(r: redis_sync.Redis) -> int:
    with r.pipeline(transaction=False) as pipe:
        for stream in STREAMS:
            pipe.xlen(stream)
        return sum(pipe.execute())


def _wait_until_pending_for(redis_url: str, pid: int, timeout_s: float = 10.0) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        held = sum(n for c, n in _pending_by_consumer(redis_url).items() if f"-{pid}-" in c)
        if held:
            return held
        time.sleep(0.05)
    return 0


def _wait_until_outbox_empty(redis_url: str) -> None:
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    with redis_sync.Redis.from_url(redis_url) as r:
        while time.monotonic() < deadline:
            if _outbox_len(r) == 0:
                return
            time.sleep(0.1)
        pytest.fail(f"outbox not drained: {_outbox_len(r)} entries left")


def _assert_in_mongodb(stack: Stack, sid: str, kept: dict[str, Any]) -> None:
    with MongoClient(stack.mongodb_uri, tz_aware=True) as mongo:
        db = mongo[stack.mongodb_db]
        doc = db["sessions"].find_one({"_id": sid})
        assert doc is not None
        assert (doc["version"], doc["work_in_progress"]) == (kept["version"], kept["wip"])
        assert doc["full_context"] == kept["context"]
        events = db["session_events"].find({"session_id": sid}).sort("seq", 1)
        assert [e["data"]["n"] for e in events] == kept["notes"]


async def test_write_behind_of_a_killed_replica_is_finished_by_the_others(
    stack: Stack, nodes: list[httpx.AsyncClient], owner: str
) -> None:
    """Replica A takes outbox entries of its writes and is SIGKILLed before MongoDB has them.
    Every write A acknowledged is then in MongoDB: at once for a session suspended through B
    (the suspend carries the outbox's backlog), and for the other one once B and C have
    claimed A's entries and delivered the rest; full reads through C show all of it."""
    if stack.wire is None:
        pytest.skip("holds the write-behind back by pausing the MongoDB process: not a real one")
    a, b, c = stack.replicas
    sids = [(await create(nodes[0], owner, work_in_progress={"v": 1}))["id"] for _ in range(2)]

    # Hold the write-behind back: MongoDB stops answering, and only A's worker is running, so
    # A's worker reads entries and waits on MongoDB with them pending under its name.
    stack.wire.pause()
    b.pause()
    c.pause()
    acknowledged = {sid: {"version": 1, "notes": [], "context": {}} for sid in sids}
    for round_ in range(4):
        for sid in sids:
            kept: dict[str, Any] = acknowledged[sid]
            r = await patch(
                nodes[0],
                sid,
                owner,
                kept["version"],
                work_in_progress={"v": round_},
                full_context={"r": round_},
            )
            assert r.status_code == 200, r.text
            kept.update(version=r.json()["version"], wip={"v": round_}, context={"r": round_})
            done = await append(nodes[0], sid, owner, round_ * 10, round_ * 10 + 1)
            kept["version"] = done["version"]
            kept["notes"] += [round_ * 10, round_ * 10 + 1]
    held = _wait_until_pending_for(stack.redis.url, a.pid)
    assert held > 0, "replica A never took an outbox entry: the test would prove nothing"

    a.kill()
    stack.wire.resume()
    b.resume()
    c.resume()
    first, second = sids
    suspended = await suspend(nodes[1], first, owner)
    assert suspended["version"] == acknowledged[first]["version"]
    _assert_in_mongodb(stack, first, acknowledged[first])

    _wait_until_outbox_empty(stack.redis.url)  # A's entries too: claimed by B or C
    assert not any(f"-{a.pid}-" in name for name in _pending_by_consumer(stack.redis.url))
    _assert_in_mongodb(stack, second, acknowledged[second])
    suspended = await suspend(nodes[1], second, owner)
    assert suspended["version"] == acknowledged[second]["version"]

    for sid, kept in acknowledged.items():
        got = await full(nodes[2], sid, owner)
        assert (got["version"], got["work_in_progress"]) == (kept["version"], kept["wip"])
        assert got["full_context"] == kept["context"]
        assert [e["data"]["n"] for e in got["full_timeline"]] == kept["notes"]
