"""A write without a stale version that other writers keep beating: past its budget the API
answers 503 `contended` (Retry-After, counted, not a version conflict), nothing of it is
written, and the same request sent again gets through once.

Another replica is a second `RedisHotStore` on the app's Redis that commits a change of the
session (a new `rev`, no new version) just before each of the app's commits."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from sessionmgr.services.ports import Change, HotView
from sessionmgr.storage import hot
from sessionmgr.storage.hot import RedisHotStore
from tests.integration.session_api import create_session, get_session

Headers = Callable[..., dict[str, str]]


def touched(view: HotView) -> Change:
    """Another replica's write that changes the session's `rev` and nothing else."""
    return Change(record=view.record, fields=frozenset(), result=b"")


async def total(api: httpx.AsyncClient, name: str) -> float:
    """The sum of a family's samples of that name, whatever their labels."""
    text = (await api.get("/metrics")).text
    families = text_string_to_metric_families(text)
    return sum(s.value for f in families for s in f.samples if s.name == name)


async def test_a_write_beaten_past_its_budget_is_a_503_contended_and_a_retry_lands_once(
    api: httpx.AsyncClient, redis: Redis, auth: Headers, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = {**auth(), "Idempotency-Key": "contended-1"}
    sid = (await create_session(api, auth()))["id"]
    theirs = RedisHotStore(redis)
    real_commit = RedisHotStore._commit
    beaten: list[int] = []

    async def beaten_first(self: RedisHotStore, *args: Any) -> Any:
        if self is not theirs:
            beaten.append(1)
            await theirs.transact(sid, touched, None)
        return await real_commit(self, *args)

    monkeypatch.setattr(hot, "_RACE_BUDGET_S", 0.05)
    monkeypatch.setattr(RedisHotStore, "_commit", beaten_first)
    body = {"events": [{"kind": "note", "data": {"n": 1}}]}

    answer = await api.post(f"/v1/sessions/{sid}/timeline", json=body, headers=h)

    assert answer.status_code == 503, answer.text
    problem = answer.json()
    assert problem["type"] == "/problems#contended"
    assert "current_version" not in problem
    assert answer.headers["retry-after"] == "1"
    assert len(beaten) > hot._RACE_RETRIES
    assert await total(api, "sessionmgr_write_contended_total") == 1
    assert await total(api, "sessionmgr_version_conflicts_total") == 0, "no stale version"
    session = await get_session(api, auth(), sid)
    assert (session["version"], session["recent_timeline"]) == (1, []), "nothing written"

    monkeypatch.setattr(RedisHotStore, "_commit", real_commit)  # the others stop
    again = await api.post(f"/v1/sessions/{sid}/timeline", json=body, headers=h)
    assert again.status_code == 200, again.text
    assert again.json()["version"] == 2
    replayed = await api.post(f"/v1/sessions/{sid}/timeline", json=body, headers=h)
    assert replayed.json() == again.json()
    assert replayed.headers.get("idempotent-replayed") == "true"
    session = await get_session(api, auth(), sid)
    assert [e["data"] for e in session["recent_timeline"]] == [{"n": 1}], "once"
