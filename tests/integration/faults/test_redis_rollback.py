"""Redis loses acknowledged writes and reuses their versions and seqs (issue 11, part 2).

A session's hot keys are put back (DUMP/RESTORE) to an earlier state after MongoDB got later
writes, as a crash under `appendfsync everysec`, a failover to a lagging replica or a restore
would leave them. Writes acknowledged after that reuse versions and seqs MongoDB holds for
other writes. None of them may be dropped: each divergence is kept in `session_conflicts`,
counted, and the hot session re-based above MongoDB, so that after a suspend MongoDB holds
every write acknowledged after the rollback. A client holding a pre-re-base version gets 409.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
from redis.asyncio import Redis

from sessionmgr.api.bridge import resolve
from sessionmgr.container import Container
from sessionmgr.storage.hot import hot_key, timeline_key
from sessionmgr.storage.warm import MongoWarmStore
from tests.integration.session_api import append_events, create_session, patch_session
from tests.integration.test_write_behind import worker

Headers = dict[str, str]


async def snapshot(redis: Redis, sid: str) -> dict[str, bytes | None]:
    return {k: await redis.dump(k) for k in (hot_key(sid), timeline_key(sid))}


async def roll_back(redis: Redis, keys: dict[str, bytes | None]) -> None:
    for key, dumped in keys.items():
        if dumped is None:
            await redis.delete(key)  # it did not exist yet
        else:
            await redis.restore(key, 0, dumped, replace=True)


async def deliver(redis: Redis, container: Container, name: str = "W") -> Any:
    reconciler = await resolve(container.reconciler)
    w = worker(redis, await resolve(container.warm), name, reconciler=reconciler)
    await w.ensure_group()
    for _ in range(5):
        await w.step(block_ms=10)
    return w


async def divergences(api: httpx.AsyncClient) -> float:
    for line in (await api.get("/metrics")).text.splitlines():
        if line.startswith("sessionmgr_write_divergences_total "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_writes_acknowledged_after_a_rollback_all_reach_mongodb(
    manual_api: httpx.AsyncClient,
    manual_redis: Redis,
    manual_warm: MongoWarmStore,
    manual_container: Container,
    auth: Callable[..., Headers],
) -> None:
    owner = auth()
    sid = (await create_session(manual_api, owner, work_in_progress={"n": 0}))["id"]
    await append_events(manual_api, owner, sid, {"kind": "before", "data": {"n": 1}})  # v2, seq 1
    await deliver(manual_redis, manual_container)
    saved = await snapshot(manual_redis, sid)  # Redis as a lagging replica would have it

    await patch_session(manual_api, owner, sid, 2, work_in_progress={"lost": "in redis"})  # v3
    await append_events(manual_api, owner, sid, {"kind": "lost", "data": {"n": 2}})  # v4, seq 2
    await deliver(manual_redis, manual_container)
    assert (await manual_warm.get(sid)).version == 4  # type: ignore[union-attr]

    await roll_back(manual_redis, saved)  # Redis is back at v2, seq 1
    after = []  # what is acknowledged after the rollback
    answer = await patch_session(manual_api, owner, sid, 2, work_in_progress={"after": 1})
    after.append(("patch", answer["version"]))  # v3 again: MongoDB has another v3
    appended = await manual_api.post(
        f"/v1/sessions/{sid}/timeline",
        json={"events": [{"kind": "after", "data": {"n": 3}}]},
        headers=owner,
    )
    assert appended.status_code == 200
    assert appended.json()["last_seq"] == 2, "seq 2 again: MongoDB has another seq 2"
    held = appended.json()["version"]

    w = await deliver(manual_redis, manual_container)
    assert w.parked == 0
    assert await divergences(manual_api) >= 1, "the divergence is counted"
    kept = await manual_warm._conflicts.count_documents({"session_id": sid})
    assert kept >= 1, "the diverging write is kept"

    stale = await manual_api.patch(
        f"/v1/sessions/{sid}",
        json={"expected_version": held, "patch": {"work_in_progress": {"stale": True}}},
        headers=owner,
    )
    assert stale.status_code == 409, "the session moved above MongoDB: re-read"
    current = stale.json()["current_version"]
    assert current > 4, "re-based above every version MongoDB holds"
    final = await patch_session(manual_api, owner, sid, current, work_in_progress={"after": 2})
    await append_events(manual_api, owner, sid, {"kind": "after", "data": {"n": 4}})
    suspended = await manual_api.post(f"/v1/sessions/{sid}/suspend", headers=owner)
    assert suspended.status_code == 200, suspended.text

    stored = await manual_warm.get(sid)
    assert stored is not None
    assert stored.work_in_progress == {"after": 2}
    assert stored.version > final["version"]
    events = await manual_warm.all_events(sid)
    assert [e.seq for e in events] == list(range(1, len(events) + 1)), "no hole"
    kinds = [(e.kind, e.data.get("n")) for e in events]
    assert ("before", 1) in kinds and ("lost", 2) in kinds, "what MongoDB had stays"
    assert kinds.count(("after", 3)) == 1, "the acknowledged append landed once, re-sequenced"
    assert kinds.count(("after", 4)) == 1
    # Delivering everything again changes nothing and counts nothing new.
    before = await divergences(manual_api)
    await deliver(manual_redis, manual_container, "W2")
    assert await manual_warm.all_events(sid) == events
    assert await divergences(manual_api) == before


async def test_a_suspend_meets_the_divergence_first(
    manual_api: httpx.AsyncClient,
    manual_redis: Redis,
    manual_warm: MongoWarmStore,
    manual_container: Container,
    auth: Callable[..., Headers],
) -> None:
    """No write-behind ran since the rollback: the suspend's own flush finds the clash."""
    owner = auth()
    sid = (await create_session(manual_api, owner))["id"]
    await deliver(manual_redis, manual_container)
    saved = await snapshot(manual_redis, sid)
    await append_events(manual_api, owner, sid, {"kind": "lost"})
    await deliver(manual_redis, manual_container)
    await roll_back(manual_redis, saved)
    await append_events(manual_api, owner, sid, {"kind": "after"})  # seq 1 again

    suspended = await manual_api.post(f"/v1/sessions/{sid}/suspend", headers=owner)
    assert suspended.status_code == 200, suspended.text

    kinds = [e.kind for e in await manual_warm.all_events(sid)]
    assert kinds == ["lost", "after"]
    assert await divergences(manual_api) >= 1
    await deliver(manual_redis, manual_container, "W2")  # the outbox's copy: nothing new
    assert [e.kind for e in await manual_warm.all_events(sid)] == ["lost", "after"]
