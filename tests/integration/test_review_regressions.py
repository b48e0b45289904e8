"""Defects a review found, each kept from coming back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from pymongo.errors import WriteError
from redis.asyncio import Redis

from sessionmgr.container import build_container
from sessionmgr.services.ports import Idempotency
from sessionmgr.settings import load_settings
from sessionmgr.storage.hot import RedisHotStore, idem_index_key
from sessionmgr.storage.warm import MongoWarmStore
from tests.conftest import JWT_SECRET, TEST_PARTITIONS
from tests.integration.conftest import serving
from tests.integration.session_api import append_events, create_session, keys_of
from tests.unit.factories import SessionRecordFactory

Headers = dict[str, str]


async def test_concurrent_suspends_do_not_starve_a_small_pool(
    redis_url: str, auth: Callable[..., Headers]
) -> None:
    """Suspend reads the outbox on its WATCH connection, never a second pooled one."""
    settings = load_settings(
        {},
        redis_url=redis_url,
        mongodb_uri="mongomock://",
        jwt_secret=JWT_SECRET,
        redis_pool_size=4,
        redis_partitions=TEST_PARTITIONS,
    )
    async with serving(build_container(settings, write_behind=False)) as api:
        h = auth()
        ids = [(await create_session(api, h))["id"] for _ in range(4)]
        for sid in ids:  # a backlog, so that every suspend scans the outbox
            await append_events(api, h, sid, {"kind": "note"})
        answers = await asyncio.gather(
            *(api.post(f"/v1/sessions/{sid}/suspend", headers=h) for sid in ids)
        )
    assert [a.status_code for a in answers] == [200] * 4, [a.text for a in answers]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("participants", {"mad_name": "bot\n"}),
        ("timeline", {"events": [{"kind": "note\n"}]}),
    ],
)
async def test_a_trailing_newline_is_not_a_valid_name(
    manual_api: httpx.AsyncClient, auth: Callable[..., Headers], path: str, body: dict[str, object]
) -> None:
    sid = (await create_session(manual_api, auth()))["id"]
    answer = await manual_api.post(f"/v1/sessions/{sid}/{path}", json=body, headers=auth())
    assert answer.status_code == 422, answer.text
    got = await manual_api.get(f"/v1/sessions/{sid}%0A", headers=auth())
    assert got.status_code == 404


async def test_a_retry_that_overlaps_its_original_gets_the_first_answer(
    manual_api: httpx.AsyncClient, auth: Callable[..., Headers], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The original stalls between its read and its commit; its retry arrives meanwhile and
    waits for the original's turn (a replica's writers of a session take turns), then finds
    the original's idempotency record. Both answer 200 with the same version: the update is
    applied once, and nobody sees a 409. (A retry that commits first, in another replica, is
    `test_commit_guard.py`'s same key committed in between.)"""
    h = {**auth(), "Idempotency-Key": "overlap-1"}
    sid = (await create_session(manual_api, auth()))["id"]
    real_read = RedisHotStore._seen
    paused, resume, calls = asyncio.Event(), asyncio.Event(), []

    async def stalls_once(self: RedisHotStore, client: Any, session_id: str, idem: Any) -> Any:
        result = await real_read(self, client, session_id, idem)
        calls.append(session_id)
        if len(calls) == 1:
            paused.set()
            await resume.wait()
        return result

    monkeypatch.setattr(RedisHotStore, "_seen", stalls_once)
    body = {"expected_version": 1, "patch": {"work_in_progress": {"n": 1}}}
    original = asyncio.create_task(manual_api.patch(f"/v1/sessions/{sid}", json=body, headers=h))
    await asyncio.wait_for(paused.wait(), 10)
    overlapping = asyncio.create_task(manual_api.patch(f"/v1/sessions/{sid}", json=body, headers=h))
    await asyncio.sleep(0.1)
    assert not overlapping.done(), "the retry waits for the original's turn"
    resume.set()
    first, retry = await original, await overlapping

    assert (retry.status_code, first.status_code) == (200, 200), (retry.text, first.text)
    assert retry.json()["version"] == first.json()["version"] == 2
    got = await manual_api.get(f"/v1/sessions/{sid}", headers=auth())
    assert got.json()["version"] == 2


@pytest.mark.parametrize("action", ["suspend", "resume", "delete"])
async def test_a_stranger_leaves_no_idempotency_record_behind(
    manual_api: httpx.AsyncClient,
    manual_redis: Redis,
    auth: Callable[..., Headers],
    action: str,
) -> None:
    sid = (await create_session(manual_api, auth("alice")))["id"]
    before = await keys_of(manual_redis, sid)
    headers = {**auth("mallory"), "Idempotency-Key": "k-1"}
    if action == "delete":
        answer = await manual_api.delete(f"/v1/sessions/{sid}", headers=headers)
    else:
        answer = await manual_api.post(f"/v1/sessions/{sid}/{action}", headers=headers)
    assert answer.status_code == 403
    assert await keys_of(manual_redis, sid) == before
    missing = await manual_api.delete(f"/v1/sessions/{'0' * 32}", headers=headers)
    assert missing.status_code == 404
    assert not [k async for k in manual_redis.scan_iter(match="*00000000000000000000*")]


async def test_the_idempotency_index_of_a_busy_session_is_trimmed(
    manual_redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    hot = RedisHotStore(manual_redis, idempotency_ttl_s=60)
    sid = "a" * 32
    for n in range(3):
        await hot.remember(sid, Idempotency(key_digest=f"d{n}", fingerprint="f"), b"null")
    assert await manual_redis.zcard(idem_index_key(sid)) == 3
    later = time.time() + 61
    monkeypatch.setattr("sessionmgr.storage.hot.time.time", lambda: later)
    await hot.remember(sid, Idempotency(key_digest="d9", fingerprint="f"), b"null")
    assert await manual_redis.zcard(idem_index_key(sid)) == 1


async def test_a_mongodb_error_about_the_data_is_not_an_outage(
    manual_warm: MongoWarmStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An outage is retried; an error about the document is not, so the worker can park it."""

    async def rejects(*_args: Any, **_kwargs: Any) -> Any:
        raise WriteError("document is invalid", code=121)

    monkeypatch.setattr(manual_warm._sessions, "update_one", rejects)
    record = SessionRecordFactory.build()
    with pytest.raises(WriteError):
        await manual_warm.apply(record, [])


async def test_a_full_read_answers_503_rather_than_scan_a_huge_backlog(
    manual_api: httpx.AsyncClient, auth: Callable[..., Headers], monkeypatch: pytest.MonkeyPatch
) -> None:
    sid = (await create_session(manual_api, auth()))["id"]
    await append_events(manual_api, auth(), sid, {"kind": "note"}, {"kind": "note"})
    monkeypatch.setattr("sessionmgr.storage.hot.SCAN_LIMIT", 0)
    answer = await manual_api.get(f"/v1/sessions/{sid}?include=full", headers=auth())
    assert answer.status_code == 503
    assert answer.json()["backend"] == "mongodb"
    assert answer.headers["Retry-After"] == "5"
    assert (await manual_api.get(f"/v1/sessions/{sid}", headers=auth())).status_code == 200
