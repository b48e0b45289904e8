"""A slow activation must never put an older version back into Redis (lost 2xx update)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from sessionmgr.storage.warm import MongoWarmStore
from tests.integration.session_api import create_session

Headers = dict[str, str]


async def test_a_stalled_activation_cannot_undo_a_newer_update(
    manual_api: httpx.AsyncClient,
    manual_warm: MongoWarmStore,
    auth: Callable[..., Headers],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    h = auth()
    sid = (await create_session(manual_api, h, work_in_progress={"by": None}))["id"]
    assert (await manual_api.post(f"/v1/sessions/{sid}/suspend", headers=h)).status_code == 200

    real_recent = MongoWarmStore.recent_events
    paused, resume, calls = asyncio.Event(), asyncio.Event(), []

    async def stalls_once(self: MongoWarmStore, session_id: str, limit: int) -> Any:
        calls.append(session_id)
        if len(calls) == 1:  # request A has read MongoDB (v1) and now stalls
            paused.set()
            await resume.wait()
        return await real_recent(self, session_id, limit)

    monkeypatch.setattr(MongoWarmStore, "recent_events", stalls_once)

    def patch_by(who: str) -> Any:
        body = {"expected_version": 1, "patch": {"work_in_progress": {"by": who}}}
        return manual_api.patch(f"/v1/sessions/{sid}", json=body, headers=h)

    a = asyncio.create_task(patch_by("A"))
    await paused.wait()
    b = await patch_by("B")  # B activates, updates and is acknowledged
    assert b.status_code == 200 and b.json()["version"] == 2
    assert (await manual_api.post(f"/v1/sessions/{sid}/suspend", headers=h)).status_code == 200
    resume.set()
    answer_a = await a

    assert answer_a.status_code == 409, answer_a.text  # A wrote at version 1: it is stale now
    assert answer_a.json()["current_version"] == 2
    got = (await manual_api.get(f"/v1/sessions/{sid}", headers=h)).json()
    assert (got["version"], got["work_in_progress"]) == (2, {"by": "B"})
    await manual_api.post(f"/v1/sessions/{sid}/suspend", headers=h)
    stored = await manual_warm.get(sid)
    assert stored is not None and (stored.version, stored.work_in_progress) == (2, {"by": "B"})


async def test_the_state_mongodb_records_follows_redis_through_an_activation_race(
    manual_api: httpx.AsyncClient,
    manual_warm: MongoWarmStore,
    manual_redis: Any,
    auth: Callable[..., Headers],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A slow "active" mark must never land after a suspend's "dormant" (lists would lie)."""
    from sessionmgr.domain.model import SessionState
    from sessionmgr.storage.hot import hot_key

    h = auth()
    sid = (await create_session(manual_api, h))["id"]
    assert (await manual_api.post(f"/v1/sessions/{sid}/suspend", headers=h)).status_code == 200
    real_mark = MongoWarmStore.mark_state
    paused, resume, calls = asyncio.Event(), asyncio.Event(), []

    async def stalls_once(self: MongoWarmStore, session_id: str, *args: Any) -> Any:
        calls.append(session_id)
        if len(calls) == 1:
            paused.set()
            await resume.wait()
        return await real_mark(self, session_id, *args)

    monkeypatch.setattr(MongoWarmStore, "mark_state", stalls_once)
    resuming = asyncio.create_task(manual_api.post(f"/v1/sessions/{sid}/resume", headers=h))
    await paused.wait()
    suspended = await manual_api.post(f"/v1/sessions/{sid}/suspend", headers=h)
    assert suspended.status_code == 200
    resume.set()
    assert (await resuming).status_code == 200

    stored = await manual_warm.get(sid)
    assert stored is not None
    hot = bool(await manual_redis.exists(hot_key(sid)))
    assert (stored.state is SessionState.ACTIVE) == hot, (stored.state, hot)
    listed = await manual_api.get("/v1/sessions?state=active", headers=h)
    assert (sid in [s["id"] for s in listed.json()["items"]]) == hot
