"""What an Idempotency-Key keeps and promises (issue 11 part 4, issue 17's memory item).

Real redis-server: the records stay small on a large session, a caller's live keys are
capped, a replay says so and checks access first, the fingerprint covers If-Match, a late
failure never releases a newer attempt's claim, and deleting a session drops its create record.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import httpx
import msgspec
import pytest
from redis.asyncio import Redis

from sessionmgr.container import build_container
from sessionmgr.services.ports import Idempotency
from sessionmgr.settings import Settings
from sessionmgr.storage.hot import RedisHotStore, idem_key
from tests.integration.conftest import serving
from tests.integration.session_api import create_session, patch_session

Headers = dict[str, str]
BIG = "x" * 200_000


async def idem_bytes(redis: Redis) -> int:
    total = 0
    async for key in redis.scan_iter(match="session_idem:*"):
        total += await redis.memory_usage(key) or 0
    return total


async def test_twenty_keyed_resumes_of_a_large_session_store_little(
    api: httpx.AsyncClient, redis: Redis, auth: Callable[..., Headers]
) -> None:
    owner = auth()
    sid = (await create_session(api, owner, work_in_progress={"a": BIG}))["id"]
    await patch_session(api, owner, sid, 1, context_summary={"b": BIG})
    for n in range(20):
        await api.post(
            f"/v1/sessions/{sid}/timeline",
            json={"events": [{"kind": "note", "data": {"n": n}}]},
            headers=owner,
        )
    before = await idem_bytes(redis)

    for n in range(20):
        answer = await api.post(
            f"/v1/sessions/{sid}/resume", headers={**owner, "Idempotency-Key": f"r{n}"}
        )
        assert answer.status_code == 200
        assert len(answer.content) > 400_000  # the answer itself is the whole session

    grown = await idem_bytes(redis) - before
    assert grown < 20 * 2_048, f"20 keyed resumes kept {grown} bytes in Redis"
    replay = await api.post(
        f"/v1/sessions/{sid}/resume", headers={**owner, "Idempotency-Key": "r3"}
    )
    assert replay.status_code == 200
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.json()["work_in_progress"] == {"a": BIG}, "a receipt answers the session"


async def test_replays_say_so_and_first_answers_do_not(
    api: httpx.AsyncClient, auth: Callable[..., Headers]
) -> None:
    owner = auth()
    key = {**owner, "Idempotency-Key": "create-1"}
    first = await api.post("/v1/sessions", json={"work_in_progress": {"n": 1}}, headers=key)
    again = await api.post("/v1/sessions", json={"work_in_progress": {"n": 1}}, headers=key)
    assert first.status_code == again.status_code == 201
    assert "idempotent-replayed" not in first.headers
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()
    sid = first.json()["id"]
    body = {"expected_version": 1, "patch": {"work_in_progress": {"n": 2}}}
    patched = await api.patch(
        f"/v1/sessions/{sid}", json=body, headers={**owner, "Idempotency-Key": "p"}
    )
    replayed = await api.patch(
        f"/v1/sessions/{sid}", json=body, headers={**owner, "Idempotency-Key": "p"}
    )
    assert "idempotent-replayed" not in patched.headers
    assert replayed.headers["idempotent-replayed"] == "true"
    assert replayed.json() == patched.json()


async def test_the_same_key_and_body_with_another_if_match_is_a_422(
    api: httpx.AsyncClient, auth: Callable[..., Headers]
) -> None:
    owner = auth()
    sid = (await create_session(api, owner))["id"]
    body = {"patch": {"work_in_progress": {"n": 2}}}
    first = await api.patch(
        f"/v1/sessions/{sid}",
        json=body,
        headers={**owner, "Idempotency-Key": "k", "If-Match": '"1"'},
    )
    assert first.status_code == 200
    other = await api.patch(
        f"/v1/sessions/{sid}",
        json=body,
        headers={**owner, "Idempotency-Key": "k", "If-Match": '"2"'},
    )
    assert other.status_code == 422, other.text
    assert other.json()["type"].endswith("#idempotency-key-reused")


async def test_a_replay_checks_access_first(
    api: httpx.AsyncClient, auth: Callable[..., Headers]
) -> None:
    owner, stranger_headers = auth("owner-a"), auth("friend-b")
    sid = (await create_session(api, owner))["id"]
    joined = await api.post(
        f"/v1/sessions/{sid}/participants", json={"mad_name": "b"}, headers=owner
    )
    assert joined.status_code == 200
    mad = auth("mad:b")
    first = await api.post(f"/v1/sessions/{sid}/resume", headers={**mad, "Idempotency-Key": "k"})
    assert first.status_code == 200
    removed = await api.delete(f"/v1/sessions/{sid}/participants/b", headers=owner)
    assert removed.status_code == 204
    replay = await api.post(f"/v1/sessions/{sid}/resume", headers={**mad, "Idempotency-Key": "k"})
    assert replay.status_code in (403, 404), replay.text
    assert "work_in_progress" not in replay.text
    stranger = await api.post(
        f"/v1/sessions/{sid}/resume", headers={**stranger_headers, "Idempotency-Key": "k"}
    )
    assert stranger.status_code in (403, 404)


@pytest.fixture
async def capped_api(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    capped = msgspec.structs.replace(settings, idempotency_max_keys_per_caller=3)
    async with serving(build_container(capped, write_behind=False)) as http:
        yield http


async def test_a_caller_holds_a_bounded_number_of_live_keys(
    capped_api: httpx.AsyncClient, auth: Callable[..., Headers]
) -> None:
    owner = auth()
    for n in range(3):
        made = await capped_api.post(
            "/v1/sessions", json={}, headers={**owner, "Idempotency-Key": f"k{n}"}
        )
        assert made.status_code == 201
    fourth = await capped_api.post(
        "/v1/sessions", json={}, headers={**owner, "Idempotency-Key": "k3"}
    )
    assert fourth.status_code == 429, fourth.text
    assert fourth.json()["type"].endswith("#idempotency-keys-exhausted")
    assert "retry-after" in fourth.headers
    retried = await capped_api.post(
        "/v1/sessions", json={}, headers={**owner, "Idempotency-Key": "k1"}
    )
    assert retried.status_code == 201, "a retry of a live key still gets its answer"
    other = await capped_api.post(
        "/v1/sessions", json={}, headers={**auth("someone-else"), "Idempotency-Key": "k9"}
    )
    assert other.status_code == 201, "the cap is per caller"


async def test_a_late_failure_never_releases_a_newer_attempts_claim(redis_url: str) -> None:
    redis = Redis.from_url(redis_url)
    hot = RedisHotStore(redis)
    first = Idempotency(key_digest="d", fingerprint="f")
    assert await hot.claim("s", first) is None
    await redis.delete(idem_key("s", first))  # its claim lapsed (the TTL) while it ran on
    retry = Idempotency(key_digest="d", fingerprint="f")
    assert await hot.claim("s", retry) is None
    await hot.release("s", first)  # the first attempt fails, late
    held = await redis.get(idem_key("s", retry))
    assert held is not None and retry.attempt.encode() in held, "the retry's claim stands"
    await redis.aclose()


async def test_deleting_a_session_drops_its_create_record(
    api: httpx.AsyncClient, redis: Redis, auth: Callable[..., Headers]
) -> None:
    owner = auth()
    key = {**owner, "Idempotency-Key": "made-once"}
    sid = (await api.post("/v1/sessions", json={}, headers=key)).json()["id"]
    assert [k async for k in redis.scan_iter(match="session_idem_create:*")]
    assert (await api.delete(f"/v1/sessions/{sid}", headers=owner)).status_code == 204
    assert not [k async for k in redis.scan_iter(match="session_idem_create:*")]
    again = await api.post("/v1/sessions", json={}, headers=key)
    assert again.status_code == 422, "the key made a session since deleted: it is spent"
