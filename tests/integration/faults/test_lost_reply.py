"""A TCP proxy loses Redis' reply after Redis executed the transaction (DESIGN §2).

The service cannot know whether its write was applied. With an Idempotency-Key its own retry
re-runs the transaction, finds the idempotency record written in the same MULTI and answers
the first answer: the write applies once. Without a key it answers 503 and does not retry.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import httpx
import msgspec
import pytest
from redis.asyncio import Redis

from sessionmgr.container import build_container
from sessionmgr.settings import Settings
from sessionmgr.storage.hot import OUTBOX_STREAM, OutboxEntry, timeline_key
from tests.integration.conftest import serving
from tests.integration.faults.conftest import fault_settings
from tests.integration.session_api import create_session, hot_record
from tests.support.faults import ReplyDropper

Headers = dict[str, str]
_decode_entry = msgspec.json.Decoder(OutboxEntry).decode


@pytest.fixture
async def proxy(redis_url: str) -> AsyncIterator[ReplyDropper]:
    upstream = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    dropper = await ReplyDropper(upstream).start()
    yield dropper
    await dropper.stop()


@pytest.fixture
async def proxied_api(settings: Settings, proxy: ReplyDropper) -> AsyncIterator[httpx.AsyncClient]:
    container = build_container(fault_settings(settings, proxy.url), write_behind=False)
    async with serving(container) as http:
        yield http


@pytest.fixture
async def direct_redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


async def outbox_versions(redis: Redis, session_id: str) -> list[int]:
    entries = [_decode_entry(f[b"entry"]) for _id, f in await redis.xrange(OUTBOX_STREAM)]
    return [e.record.version for e in entries if e.record.id == session_id]


async def retries(api: httpx.AsyncClient) -> float:
    for line in (await api.get("/metrics")).text.splitlines():
        if line.startswith('sessionmgr_retries_total{backend="redis",operation="transact"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_the_services_retry_applies_a_keyed_update_once(
    proxied_api: httpx.AsyncClient,
    proxy: ReplyDropper,
    direct_redis: Redis,
    auth: Callable[..., Headers],
) -> None:
    owner = auth()
    sid = (await create_session(proxied_api, owner, work_in_progress={"n": 0}))["id"]
    body = {"expected_version": 1, "patch": {"work_in_progress": {"n": 1}}}
    proxy.arm()

    answer = await proxied_api.patch(
        f"/v1/sessions/{sid}", json=body, headers={**owner, "Idempotency-Key": "k-1"}
    )

    assert proxy.dropped == 1, "the commit's reply was lost"
    assert answer.status_code == 200, answer.text
    assert answer.json()["version"] == 2
    record = await hot_record(direct_redis, sid)
    assert record is not None
    assert (record.version, record.work_in_progress) == (2, {"n": 1})
    assert await outbox_versions(direct_redis, sid) == [2], "applied exactly once"
    assert await retries(proxied_api) >= 1


async def test_an_unkeyed_append_with_a_lost_reply_is_a_503_applied_at_most_once(
    proxied_api: httpx.AsyncClient,
    proxy: ReplyDropper,
    direct_redis: Redis,
    auth: Callable[..., Headers],
) -> None:
    owner = auth()
    sid = (await create_session(proxied_api, owner))["id"]
    proxy.arm()

    answer = await proxied_api.post(
        f"/v1/sessions/{sid}/timeline", json={"events": [{"kind": "once"}]}, headers=owner
    )

    assert proxy.dropped == 1
    assert answer.status_code == 503, answer.text
    assert answer.json()["backend"] == "redis"
    assert "unknown" in answer.json()["detail"]
    assert await direct_redis.llen(timeline_key(sid)) == 1, "executed once, never retried"
    assert await outbox_versions(direct_redis, sid) == [2]
    assert await retries(proxied_api) == 0
