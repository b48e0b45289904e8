"""Quotas answer a 403 `quota-exceeded` naming the limit; the timeline reads a page at a time,
from every tier, and `?include=full` says when it inlined only the first events."""

from __future__ import annotations

import secrets
from typing import Any

import msgspec
import pytest

from sessionmgr.settings import Settings
from tests.e2e.conftest import Api, assert_problem

QUOTAS = {
    "max_sessions_per_owner": 3,
    "max_participants": 2,
    "max_timeline_events": 40,
    "quota_privileged_factor": 2,
    "timeline_page_max": 7,
    "full_timeline_max": 10,
}


@pytest.fixture(scope="module")
def e2e_settings(e2e_settings: Settings) -> Settings:
    return msgspec.structs.replace(e2e_settings, **QUOTAS)


def who() -> str:
    return f"user-{secrets.token_hex(4)}"


async def append(app_api: Api, sid: str, owner: str, n: int) -> Any:
    body = {"events": [{"kind": "note", "data": {"i": i}} for i in range(n)]}
    return await app_api.client.post(
        f"/v1/sessions/{sid}/timeline", json=body, headers=app_api.h(owner)
    )


async def pages(app_api: Api, sid: str, owner: str, limit: int | None) -> list[dict[str, Any]]:
    """Every page from the start, following next_after_seq."""
    found: list[dict[str, Any]] = []
    after = 0
    for _ in range(100):
        params: dict[str, Any] = {"after_seq": after}
        if limit is not None:
            params["limit"] = limit
        r = await app_api.client.get(
            f"/v1/sessions/{sid}/timeline", params=params, headers=app_api.h(owner)
        )
        assert r.status_code == 200, r.text
        page = r.json()
        assert len(page["items"]) <= QUOTAS["timeline_page_max"]
        found.append(page)
        if page["next_after_seq"] is None:
            return found
        after = page["next_after_seq"]
    raise AssertionError("next_after_seq never ended")


async def test_sessions_past_the_owner_quota_are_a_403_naming_the_limit(app_api: Api) -> None:
    owner = who()
    for _ in range(3):
        await app_api.create(owner)
    r = await app_api.client.post("/v1/sessions", json={}, headers=app_api.h(owner))
    problem = assert_problem(r, 403)
    assert problem["type"] == "/problems#quota-exceeded"
    assert (problem["limit"], problem["quota"]) == ("max_sessions_per_owner", 3)
    service = app_api.h(who(), ("service",))
    for _ in range(3):  # a service may create 2x for the owner
        r = await app_api.client.post("/v1/sessions", json={"owner_id": owner}, headers=service)
        assert r.status_code == 201, r.text
    r = await app_api.client.post("/v1/sessions", json={"owner_id": owner}, headers=service)
    assert assert_problem(r, 403)["quota"] == 6


async def test_participants_past_the_quota_are_a_403(app_api: Api) -> None:
    owner = who()
    sid = (await app_api.create(owner))["id"]
    for mad in ("a", "b"):
        await app_api.add(sid, owner, mad)
    r = await app_api.client.post(
        f"/v1/sessions/{sid}/participants", json={"mad_name": "c"}, headers=app_api.h(owner)
    )
    assert assert_problem(r, 403)["limit"] == "max_participants"


async def test_events_past_the_quota_are_a_403_and_none_of_the_batch_lands(app_api: Api) -> None:
    owner = who()
    sid = (await app_api.create(owner))["id"]
    assert (await append(app_api, sid, owner, 38)).status_code == 200
    problem = assert_problem(await append(app_api, sid, owner, 3), 403)
    assert problem["limit"] == "max_timeline_events"
    assert (await append(app_api, sid, owner, 2)).json()["last_seq"] == 40


@pytest.mark.parametrize("suspended", [False, True], ids=["active", "dormant"])
async def test_the_timeline_pages_through_every_event_once(app_api: Api, suspended: bool) -> None:
    owner = who()
    sid = (await app_api.create(owner))["id"]
    for _ in range(4):
        assert (await append(app_api, sid, owner, 8)).status_code == 200
    if suspended:
        await app_api.suspend(sid, owner)
    for limit in (None, 3, 1000):
        found = await pages(app_api, sid, owner, limit)
        seqs = [e["seq"] for page in found for e in page["items"]]
        assert seqs == list(range(1, 33)), (limit, seqs)
        assert all(e["kind"] == "note" for page in found for e in page["items"])


async def test_reading_the_timeline_needs_read_access(app_api: Api) -> None:
    sid = (await app_api.create(who()))["id"]
    r = await app_api.client.get(f"/v1/sessions/{sid}/timeline", headers=app_api.h(who()))
    assert_problem(r, 403)
    r = await app_api.client.get(
        f"/v1/sessions/{sid}/timeline?after_seq=-1", headers=app_api.h(who())
    )
    assert_problem(r, (400, 422))


async def test_include_full_inlines_the_first_events_and_says_there_are_more(
    app_api: Api,
) -> None:
    owner = who()
    sid = (await app_api.create(owner))["id"]
    assert (await append(app_api, sid, owner, 8)).status_code == 200
    whole = await app_api.full(sid, owner)
    assert [e["seq"] for e in whole["full_timeline"]] == list(range(1, 9))
    assert whole["full_timeline_next_after_seq"] is None
    assert (await append(app_api, sid, owner, 8)).status_code == 200
    capped = await app_api.full(sid, owner)
    assert [e["seq"] for e in capped["full_timeline"]] == list(range(1, 11))
    assert capped["full_timeline_next_after_seq"] == 10
    plain = (await app_api.client.get(f"/v1/sessions/{sid}", headers=app_api.h(owner))).json()
    assert "full_timeline_next_after_seq" not in plain
