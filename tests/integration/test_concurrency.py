"""Lost updates: many clients doing read-modify-write through HTTP on one session.

Each client GETs the session, adds one to `work_in_progress.counter` and PATCHes it at the
version it read; on 409 it reads again and retries. If the optimistic transaction let two
writers through at one version, the counter would end below the number of increments.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Callable

import httpx
from redis.asyncio import Redis

from sessionmgr.storage.warm import MongoWarmStore
from tests.integration.session_api import create_session, eventually, get_session, hot_record

CLIENTS = 50
MAX_ATTEMPTS = 2_000  # per increment; only a livelock would get near it
BACKOFF_S = 0.2
CONFLICTS = "conflicts"

Headers = dict[str, str]


async def increment(
    client: httpx.AsyncClient, headers: Headers, session_id: str, times: int, seen: Counter[object]
) -> None:
    """Add one to the counter `times` times; counts each answered version and each 409."""
    for _ in range(times):
        for _attempt in range(MAX_ATTEMPTS):
            current = await get_session(client, headers, session_id)
            counter = current["work_in_progress"]["counter"]
            response = await client.patch(
                f"/v1/sessions/{session_id}",
                json={
                    "expected_version": current["version"],
                    "patch": {"work_in_progress": {"counter": counter + 1}},
                },
                headers=headers,
            )
            if response.status_code == 200:
                seen[response.json()["version"]] += 1
                break
            assert response.status_code == 409, response.text
            assert response.json()["current_version"] > current["version"], response.text
            seen[CONFLICTS] += 1
            # Jitter, as a polite client would back off: it thins the herd (and the run
            # time), not the race: dozens of 409s still happen.
            await asyncio.sleep(random.uniform(0, BACKOFF_S))
        else:
            raise AssertionError(f"no increment landed in {MAX_ATTEMPTS} attempts")


async def race(
    client: httpx.AsyncClient,
    owner: Headers,
    session_id: str,
    headers_of: Callable[[int], Headers],
    increments: int,
    redis: Redis,
    warm: MongoWarmStore,
) -> None:
    """Run the clients, then check Redis and (after the write-behind) MongoDB."""
    start = (await get_session(client, owner, session_id))["version"]
    seen: Counter[object] = Counter()
    await asyncio.gather(
        *(increment(client, headers_of(i), session_id, increments, seen) for i in range(CLIENTS))
    )

    total = CLIENTS * increments
    assert seen[CONFLICTS] > 0, "no 409 happened: the clients never raced"
    answered = sorted(v for v in seen if isinstance(v, int))
    assert answered == list(range(start + 1, start + 1 + total)), "a version was skipped"
    assert all(seen[v] == 1 for v in answered), "two writers were answered the same version"

    final = await get_session(client, owner, session_id)
    assert final["work_in_progress"]["counter"] == total
    assert final["version"] == start + total

    stored = await eventually(
        lambda: warm.get(session_id), lambda r: r is not None and r.version == start + total
    )
    assert stored is not None
    assert stored.version == start + total
    assert stored.work_in_progress == {"counter": total}
    assert stored == await hot_record(redis, session_id)


async def test_concurrent_increments_lose_nothing(
    api: httpx.AsyncClient,
    auth: Callable[..., Headers],
    redis: Redis,
    warm: MongoWarmStore,
) -> None:
    owner = auth("alice")
    session = await create_session(api, owner, work_in_progress={"counter": 0})
    assert session["version"] == 1

    await race(api, owner, session["id"], lambda _i: owner, 4, redis, warm)

    assert (await get_session(api, owner, session["id"]))["version"] == 1 + CLIENTS * 4


async def test_concurrent_increments_by_participants_lose_nothing(
    api: httpx.AsyncClient,
    auth: Callable[..., Headers],
    redis: Redis,
    warm: MongoWarmStore,
) -> None:
    """The same race as 50 MADs run it: each a participant, with its own token and lease."""
    owner = auth("alice")
    session = await create_session(api, owner, work_in_progress={"counter": 0})
    for i in range(CLIENTS):
        response = await api.post(
            f"/v1/sessions/{session['id']}/participants",
            json={"mad_name": f"agent-{i}"},
            headers=owner,
        )
        assert response.status_code == 200, response.text

    await race(api, owner, session["id"], lambda i: auth(f"mad:agent-{i}"), 1, redis, warm)
