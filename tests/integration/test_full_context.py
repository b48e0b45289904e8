"""`full_context` lives in MongoDB only (DESIGN §3), yet a client reads its own writes."""

from __future__ import annotations

from collections.abc import Callable

import httpx
from redis.asyncio import Redis

from sessionmgr.storage.hot import hot_key
from sessionmgr.storage.warm import MongoWarmStore
from tests.integration.session_api import append_events, create_session, get_session, patch_session

Headers = dict[str, str]


async def test_full_context_reads_back_before_the_write_behind_runs(
    manual_api: httpx.AsyncClient,
    manual_redis: Redis,
    manual_warm: MongoWarmStore,
    auth: Callable[..., Headers],
) -> None:
    sid = (await create_session(manual_api, auth()))["id"]
    await patch_session(manual_api, auth(), sid, 1, full_context={"plan": ["a", "b"]})
    await patch_session(manual_api, auth(), sid, 2, work_in_progress={"step": 3})

    assert await manual_redis.hexists(hot_key(sid), "full_context") is False  # type: ignore[misc]
    context = await manual_warm.context(sid)
    assert context is not None and context.value == {}  # nothing delivered: no worker runs
    full = await get_session(manual_api, auth(), sid, full=True)
    assert full["full_context"] == {"plan": ["a", "b"]}
    assert "full_context" not in await get_session(manual_api, auth(), sid)


async def test_suspend_carries_the_backlog_to_mongodb(
    manual_api: httpx.AsyncClient,
    manual_redis: Redis,
    manual_warm: MongoWarmStore,
    auth: Callable[..., Headers],
) -> None:
    """With the write-behind stopped, a suspend alone leaves MongoDB complete."""
    sid = (await create_session(manual_api, auth()))["id"]
    await patch_session(manual_api, auth(), sid, 1, full_context={"doc": 1})
    for n in range(25):  # more than the 20 that Redis keeps
        await append_events(manual_api, auth(), sid, {"kind": "note", "data": {"n": n}})

    response = await manual_api.post(f"/v1/sessions/{sid}/suspend", headers=auth())
    assert response.status_code == 200, response.text

    stored = await manual_warm.get(sid)
    assert stored is not None and (stored.version, stored.state) == (27, "dormant")
    assert [e.seq for e in await manual_warm.all_events(sid)] == list(range(1, 26))
    context = await manual_warm.context(sid)
    assert context is not None and (context.version, context.value) == (2, {"doc": 1})
    full = await get_session(manual_api, auth(), sid, full=True)
    assert full["full_context"] == {"doc": 1}
    assert [e["seq"] for e in full["full_timeline"]] == list(range(1, 26))
