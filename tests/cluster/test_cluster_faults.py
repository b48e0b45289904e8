"""A Redis Cluster changing under writes: a slot migration and a master failover.

Writers append events to their own sessions through the HTTP API, each with an
Idempotency-Key, and retry a 503 with the same key, as a client should. The history of
acknowledged appends is recorded; after the fault every session is suspended (which flushes
it to MongoDB) and read back from MongoDB. Every acknowledged event must be there exactly
once, in order, and every outbox partition must be drained. The only answers allowed besides
200 are 503s (the session's slot was moving, or its master was being replaced).
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx
from redis.asyncio import Redis

from sessionmgr.storage import keys
from sessionmgr.storage.outbox import RedisOutbox
from tests.integration.session_api import create_session, eventually, get_session
from tests.support.redis_cluster import RedisClusterServer

SESSIONS = 48
WRITERS = 8
BEFORE, AFTER = 2, 3  # rounds of appends before the fault starts, and after it ended
Headers = dict[str, str]


class History:
    def __init__(self) -> None:
        self.acked: dict[str, list[int]] = {}
        self.answers: Counter[int] = Counter()


async def append_until_acked(
    api: httpx.AsyncClient, owner: Headers, sid: str, n: int, history: History
) -> None:
    key = {**owner, "Idempotency-Key": uuid.uuid4().hex}
    body = {"events": [{"kind": "note", "data": {"n": n}}]}
    for _ in range(200):
        response = await api.post(f"/v1/sessions/{sid}/timeline", json=body, headers=key)
        history.answers[response.status_code] += 1
        if response.status_code == 200:
            history.acked.setdefault(sid, []).append(n)
            return
        assert response.status_code == 503, response.text
        await asyncio.sleep(0.05)
    raise AssertionError(f"an append to {sid} was refused 200 times in a row")


async def write_during(
    api: httpx.AsyncClient,
    owner: Headers,
    sessions: list[str],
    fault: Callable[[], Any],
    history: History,
) -> None:
    """Writers append round-robin to their own sessions: two rounds before the fault starts,
    then until it is over, then three more, so that writes land before, during and after it."""
    done = asyncio.Event()
    warmed = asyncio.Semaphore(0)

    async def writer(mine: list[str]) -> None:
        n, after = 0, 0
        while after < AFTER:
            for sid in mine:
                await append_until_acked(api, owner, sid, n, history)
            n += 1
            if n == BEFORE:
                warmed.release()
            if done.is_set():
                after += 1

    async def run_fault() -> None:
        try:
            for _ in range(WRITERS):
                await warmed.acquire()
            await asyncio.to_thread(fault)
        finally:
            done.set()

    groups = [sessions[i::WRITERS] for i in range(WRITERS)]
    await asyncio.gather(run_fault(), *(writer(g) for g in groups))


async def check_history(
    api: httpx.AsyncClient, owner: Headers, redis: Redis, history: History
) -> None:
    outbox = RedisOutbox(redis)
    left = await eventually(outbox.pending, lambda n: n == 0, timeout_s=30)
    assert left == 0, f"{left} outbox entries not drained"
    assert await outbox.dead_letters() == 0
    for sid, acked in history.acked.items():
        response = await api.post(f"/v1/sessions/{sid}/suspend", headers=owner)
        assert response.status_code == 200, response.text
        dormant = await get_session(api, owner, sid, full=True)
        assert dormant["state"] == "dormant"
        stored = [e["data"]["n"] for e in dormant["full_timeline"]]
        assert stored == acked, f"{sid}: MongoDB holds {stored}, acknowledged {acked}"
    assert set(history.answers) <= {200, 503}, history.answers


async def start_sessions(api: httpx.AsyncClient, owner: Headers) -> list[str]:
    sessions = [(await create_session(api, owner))["id"] for _ in range(SESSIONS)]
    partitions = {keys.partition_of(s) for s in sessions}
    assert len(partitions) > SESSIONS // 2, "the sessions spread over many partitions"
    return sessions


async def test_a_slot_migration_under_writes_loses_nothing(
    api: httpx.AsyncClient,
    redis: Redis,
    auth: Callable[..., Headers],
    redis_cluster: RedisClusterServer,
) -> None:
    owner = auth()
    sessions = await start_sessions(api, owner)
    history = History()
    await write_during(api, owner, sessions, lambda: redis_cluster.reshard(3000), history)
    print(f"\nreshard of 3000 slots under writes: answers {dict(history.answers)}")
    assert sum(len(a) for a in history.acked.values()) >= SESSIONS * (BEFORE + AFTER)
    await check_history(api, owner, redis, history)


async def test_a_master_failover_under_writes_loses_nothing(
    api: httpx.AsyncClient,
    redis: Redis,
    auth: Callable[..., Headers],
    redis_cluster: RedisClusterServer,
) -> None:
    owner = auth()
    sessions = await start_sessions(api, owner)
    history = History()
    await write_during(api, owner, sessions, redis_cluster.failover, history)
    print(f"\nCLUSTER FAILOVER under writes: answers {dict(history.answers)}")
    assert sum(len(a) for a in history.acked.values()) >= SESSIONS * (BEFORE + AFTER)
    await check_history(api, owner, redis, history)
