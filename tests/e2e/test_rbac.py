"""Who may call which /v1 route (DESIGN §4-5), and that a refused call changes nothing."""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
import pytest

from tests.conftest import JWT_SECRET
from tests.e2e.conftest import Api, Cast, assert_problem, is_hot, stable

pytestmark = pytest.mark.asyncio(loop_scope="module")

WHO = ("owner", "member", "stranger", "admin", "anonymous")


def caller(cast: Cast, who: str) -> tuple[str | None, tuple[str, ...]]:
    return {
        "owner": (cast.owner, ()),
        "member": (cast.member, ()),
        "stranger": (cast.stranger, ()),
        "admin": (cast.admin, ("admin",)),
        "anonymous": (None, ()),
    }[who]


@dataclass(frozen=True)
class Route:
    name: str
    method: str
    path: str  # `{sid}`, `{mad}` (the member's MAD name) and `{other}` are filled in
    body: dict[str, Any] | None
    ok: int
    owner_only: bool = False
    managers_only: bool = False  # owner and admin: a MAD manages no one's participation but its own
    per_session: bool = True
    dormant_first: bool = False  # resume needs a dormant session to show its effect


ROUTES = [
    Route("create", "POST", "/v1/sessions", {"work_in_progress": {"k": 1}}, 201, per_session=False),
    Route("list", "GET", "/v1/sessions", None, 200, per_session=False),
    Route("get", "GET", "/v1/sessions/{sid}", None, 200),
    Route(
        "patch",
        "PATCH",
        "/v1/sessions/{sid}",
        {"expected_version": "{version}", "patch": {"work_in_progress": {"edited": True}}},
        200,
    ),
    Route(
        "append",
        "POST",
        "/v1/sessions/{sid}/timeline",
        {"events": [{"kind": "note", "data": {"n": 2}}]},
        200,
    ),
    Route(
        "add_participant",
        "POST",
        "/v1/sessions/{sid}/participants",
        {"mad_name": "newbie"},
        200,
        managers_only=True,
    ),
    Route("renew_lease", "PUT", "/v1/sessions/{sid}/participants/{mad}/lease", None, 200),
    Route(
        "remove_participant",
        "DELETE",
        "/v1/sessions/{sid}/participants/{other}",
        None,
        204,
        managers_only=True,
    ),
    Route("suspend", "POST", "/v1/sessions/{sid}/suspend", None, 200, managers_only=True),
    Route("resume", "POST", "/v1/sessions/{sid}/resume", None, 200, dormant_first=True),
    Route("archive", "POST", "/v1/sessions/{sid}/archive", None, 200, owner_only=True),
    Route("delete", "DELETE", "/v1/sessions/{sid}", None, 204, owner_only=True),
]
PER_SESSION = [r for r in ROUTES if r.per_session]


def expected_status(route: Route, who: str) -> int:
    if who == "anonymous":
        return 401
    if who in ("owner", "admin") or not route.per_session:
        return route.ok
    if who == "member":
        return 403 if route.owner_only or route.managers_only else route.ok
    return 403


async def seed(api: Api, cast: Cast) -> dict[str, Any]:
    """alice's session with two MADs in its ACL and one timeline event."""
    session = await api.create(cast.owner, work_in_progress={"step": 1})
    sid = session["id"]
    await api.add(sid, cast.owner, cast.mad)
    await api.add(sid, cast.owner, cast.other_mad)
    r = await api.client.post(
        f"/v1/sessions/{sid}/timeline",
        json={"events": [{"kind": "note", "data": {"n": 1}}]},
        headers=api.h(cast.owner),
    )
    assert r.status_code == 200, r.text
    return await api.full(sid, cast.owner)


async def call(api: Api, route: Route, cast: Cast, who: str, session: dict[str, Any] | None) -> Any:
    sub, roles = caller(cast, who)
    path = route.path
    body = route.body
    if session is not None:
        path = path.format(sid=session["id"], mad=cast.mad, other=cast.other_mad)
        if body is not None and body.get("expected_version") == "{version}":
            body = {**body, "expected_version": session["version"]}
    return await api.client.request(route.method, path, json=body, headers=api.h(sub, roles))


async def check_effect(
    api: Api, route: Route, cast: Cast, who: str, before: dict[str, Any] | None, r: Any
) -> None:
    """What the caller (and the owner) can see after an allowed call."""
    sub, roles = caller(cast, who)
    assert sub is not None
    if route.name == "create":
        assert r.json()["owner_id"] == sub
        assert r.headers["location"] == f"/v1/sessions/{r.json()['id']}"
        assert (await api.full(r.json()["id"], sub, roles))["work_in_progress"] == {"k": 1}
        return
    if route.name == "list":
        assert set(r.json()) == {"items", "next_cursor"}
        assert before is not None
        visible = {item["id"] for item in await api.list_all(sub, roles)}
        assert (before["id"] in visible) is (who != "stranger")
        return
    assert before is not None
    sid = before["id"]
    if route.name == "delete":
        gone = await api.client.get(f"/v1/sessions/{sid}", headers=api.h(cast.owner))
        assert_problem(gone, 404)
        return
    after = await api.full(sid, cast.owner)
    if route.name == "get":
        full_only = ("full_context", "full_timeline", "full_timeline_next_after_seq")
        brief = {k: v for k, v in after.items() if k not in full_only}
        assert stable(r.json()) == stable(brief)
        assert r.headers["etag"].startswith(f'"{after["version"]}-'), r.headers  # MADs are in
    elif route.name == "patch":
        assert after["version"] == before["version"] + 1
        assert after["work_in_progress"] == {"edited": True}
    elif route.name == "append":
        assert after["version"] == before["version"] + 1
        last = after["full_timeline"][-1]
        assert (last["kind"], last["actor"], last["data"]) == ("note", sub, {"n": 2})
    elif route.name == "add_participant":
        assert "mad:newbie" in after["acl"]
        assert after["participants"]["newbie"]["active"] is True
    elif route.name == "renew_lease":
        expires = datetime.fromisoformat(r.json()["expires_at"].replace("Z", "+00:00"))
        assert expires > datetime.now(UTC) + timedelta(seconds=20)
    elif route.name == "remove_participant":
        assert cast.other_mad not in after["participants"]
        assert cast.other_member not in after["acl"]
        assert cast.member in after["acl"]
    elif route.name == "suspend":
        assert r.json()["state"] == "dormant"
        assert after["state"] == "dormant"
    elif route.name == "archive":
        assert (r.json()["state"], r.json()["version"]) == ("archived", before["version"])
        assert r.json()["archive"]["key"].endswith(f"/{sid}.json.gz")
        # `after` was a read: it brought the session back, whole.
        assert (after["state"], after["version"]) == ("dormant", before["version"])
        for name in ("work_in_progress", "context_summary", "acl", "full_timeline"):
            assert after[name] == before[name], name
    elif route.name == "resume":
        assert r.json()["state"] == "active"
        assert after["state"] == "active"
        assert after["version"] == before["version"]


@pytest.mark.parametrize("who", WHO)
@pytest.mark.parametrize("route", ROUTES, ids=lambda r: r.name)
async def test_rbac_matrix(app_api: Api, raw_redis: Any, cast: Cast, route: Route, who: str):
    wanted = expected_status(route, who)
    session = await seed(app_api, cast) if route.per_session or route.name == "list" else None
    refused = wanted in (401, 403)
    if session is not None and (refused or route.dormant_first) and route.per_session:
        # A refused caller must not even wake a dormant session up.
        await app_api.suspend(session["id"], cast.owner)
        session = await app_api.full(session["id"], cast.owner)

    r = await call(app_api, route, cast, who, session)

    if not refused:
        assert r.status_code == wanted, (r.status_code, r.text[:500])
        await check_effect(app_api, route, cast, who, session, r)
        return
    problem = assert_problem(r, wanted)
    if wanted == 401:
        assert r.headers.get("www-authenticate", "").lower().startswith("bearer"), r.headers
    else:
        assert problem["type"].endswith("forbidden"), problem
    if session is None:
        return
    after = await app_api.full(session["id"], cast.owner)
    if not route.per_session:  # `list` without a token: alice's active session is untouched
        assert stable(after) == stable(session)
        return
    assert after == session, "a refused call changed the session"
    assert after["state"] == "dormant"
    assert not is_hot(raw_redis, session["id"]), "a refused call loaded the session into Redis"


@pytest.mark.parametrize("route", PER_SESSION, ids=lambda r: r.name)
async def test_stranger_cannot_touch_an_active_session(app_api: Api, cast: Cast, route: Route):
    session = await seed(app_api, cast)
    r = await call(app_api, route, cast, "stranger", session)
    assert_problem(r, 403)
    after = await app_api.full(session["id"], cast.owner)
    assert stable(after) == stable(session)
    assert after["state"] == "active"


async def test_member_cannot_delete_an_active_session(app_api: Api, cast: Cast):
    session = await seed(app_api, cast)
    r = await app_api.client.delete(f"/v1/sessions/{session['id']}", headers=app_api.h(cast.member))
    assert_problem(r, 403)
    assert stable(await app_api.full(session["id"], cast.owner)) == stable(session)


# -- list ----------------------------------------------------------------------------------


async def test_list_shows_each_caller_only_its_sessions(app_api: Api, cast: Cast):
    joined = await seed(app_api, cast)  # the member is in its ACL
    private = await app_api.create(cast.owner, work_in_progress={"private": True})
    mine = {joined["id"], private["id"]}

    owner_ids = {s["id"] for s in await app_api.list_all(cast.owner)}
    member_ids = {s["id"] for s in await app_api.list_all(cast.member)}
    stranger_ids = {s["id"] for s in await app_api.list_all(cast.stranger)}
    admin_ids = {s["id"] for s in await app_api.list_all(cast.admin, ("admin",))}

    assert owner_ids == mine
    assert member_ids == {joined["id"]}
    assert stranger_ids == set()
    assert mine <= admin_ids


async def test_list_follows_a_dormant_session_and_a_removed_member(app_api: Api, cast: Cast):
    session = await seed(app_api, cast)
    sid = session["id"]
    await app_api.suspend(sid, cast.owner)
    assert sid in {s["id"] for s in await app_api.list_all(cast.member)}
    r = await app_api.client.delete(
        f"/v1/sessions/{sid}/participants/{cast.mad}", headers=app_api.h(cast.owner)
    )
    assert r.status_code == 204, r.text
    assert sid not in {s["id"] for s in await app_api.list_all(cast.member)}


async def test_list_without_token_is_401(app_api: Api):
    r = await app_api.client.get("/v1/sessions")
    assert_problem(r, 401)
    assert r.headers["www-authenticate"].lower().startswith("bearer")


# -- create for someone else ---------------------------------------------------------------


async def test_plain_user_cannot_create_for_another_owner(app_api: Api, cast: Cast):
    r = await app_api.client.post(
        "/v1/sessions", json={"owner_id": cast.owner}, headers=app_api.h(cast.stranger)
    )
    assert_problem(r, 403)
    assert await app_api.list_all(cast.owner) == []
    assert await app_api.list_all(cast.stranger) == []


@pytest.mark.parametrize("role", ["service", "admin"])
async def test_service_or_admin_creates_for_another_owner(app_api: Api, cast: Cast, role: str):
    r = await app_api.client.post(
        "/v1/sessions",
        json={"owner_id": cast.owner, "work_in_progress": {"by": role}},
        headers=app_api.h(f"{role}-{cast.admin}", (role,)),
    )
    assert r.status_code == 201, r.text
    assert r.json()["owner_id"] == cast.owner
    got = await app_api.full(r.json()["id"], cast.owner)
    assert got["owner_id"] == cast.owner
    assert got["work_in_progress"] == {"by": role}
    assert [s["id"] for s in await app_api.list_all(cast.owner)] == [r.json()["id"]]


# -- leases --------------------------------------------------------------------------------


def lease_path(session: dict[str, Any], mad: str) -> str:
    return f"/v1/sessions/{session['id']}/participants/{mad}/lease"


@pytest.mark.parametrize("renewer", ["itself", "owner"])
async def test_a_mad_or_its_owner_renews_its_lease(app_api: Api, cast: Cast, renewer: str):
    session = await seed(app_api, cast)
    token = session["participants"][cast.mad]["token"]
    sub = cast.member if renewer == "itself" else cast.owner
    r = await app_api.client.put(lease_path(session, cast.mad), headers=app_api.h(sub))
    assert r.status_code == 200, r.text
    expires = datetime.fromisoformat(r.json()["expires_at"].replace("Z", "+00:00"))
    assert expires > datetime.now(UTC) + timedelta(seconds=20)
    assert r.json()["token"] == token  # a renewal keeps the fencing token
    after = await app_api.full(session["id"], cast.owner)
    assert after["participants"][cast.mad]["active"] is True
    assert after["version"] == session["version"]


async def test_another_mad_cannot_renew_a_lease(app_api: Api, cast: Cast):
    session = await seed(app_api, cast)
    path = lease_path(session, cast.mad)
    r = await app_api.client.put(path, headers=app_api.h(cast.other_member))
    assert_problem(r, 403)


async def test_a_lease_on_a_dormant_session_is_409_and_does_not_wake_it(
    app_api: Api, raw_redis: Any, cast: Cast
):
    session = await seed(app_api, cast)
    await app_api.suspend(session["id"], cast.owner)
    before = await app_api.full(session["id"], cast.owner)

    renew = await app_api.client.put(lease_path(session, cast.mad), headers=app_api.h(cast.member))
    join = await app_api.client.post(
        f"/v1/sessions/{session['id']}/participants",
        json={"mad_name": "latecomer"},
        headers=app_api.h(cast.owner),
    )

    for r in (renew, join):
        assert assert_problem(r, 409)["type"].endswith("#dormant")
    assert not is_hot(raw_redis, session["id"])
    assert await app_api.full(session["id"], cast.owner) == before


@pytest.mark.parametrize("dormant", [False, True], ids=["active", "dormant"])
@pytest.mark.parametrize("intruder", ["stranger", "unlisted_mad", "removed_mad"])
async def test_outsiders_cannot_renew_a_lease(
    app_api: Api, raw_redis: Any, cast: Cast, intruder: str, dormant: bool
):
    """Only a MAD that is in the session (or a caller with write access) may renew a lease.

    An outsider MAD naming itself in the path is no participant: "that MAD" of DESIGN §4 must
    not let any `mad:*` token wake a session it has no place in.
    """
    session = await seed(app_api, cast)
    sid = session["id"]
    if intruder == "removed_mad":
        r = await app_api.client.delete(
            f"/v1/sessions/{sid}/participants/{cast.other_mad}", headers=app_api.h(cast.owner)
        )
        assert r.status_code == 204, r.text
        sub, mad = cast.other_member, cast.other_mad
    elif intruder == "unlisted_mad":
        sub, mad = f"mad:intruder-{cast.mad}", f"intruder-{cast.mad}"
    else:
        sub, mad = cast.stranger, cast.mad
    if dormant:
        await app_api.suspend(sid, cast.owner)
    before = await app_api.full(sid, cast.owner)

    r = await app_api.client.put(lease_path(before, mad), headers=app_api.h(sub))

    after = await app_api.full(sid, cast.owner)
    seen = {"status": r.status_code, "state": after["state"], "hot": is_hot(raw_redis, sid)}
    assert seen == {"status": 403, "state": before["state"], "hot": not dormant}, r.text
    assert_problem(r, 403)
    assert stable(after) == stable(before)


# -- bad tokens over HTTP ------------------------------------------------------------------


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def bad_token(kind: str, sub: str) -> str:
    now = int(time.time())
    claims: dict[str, Any] = {"sub": sub, "roles": ["admin"], "iat": now, "exp": now + 600}
    if kind == "alg_none":
        return f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(claims)}."
    if kind == "wrong_key":
        return jwt.encode(claims, "another-secret-that-is-long-enough-987654321", "HS256")
    if kind == "expired":
        claims.update(iat=now - 7200, exp=now - 3600)
    elif kind == "no_exp":
        del claims["exp"]
    elif kind == "no_sub":
        del claims["sub"]
    elif kind == "tampered":
        good = jwt.encode(claims, JWT_SECRET, "HS256")
        head, _, sig = good.split(".")
        return f"{head}.{_b64({**claims, 'sub': 'someone-else'})}.{sig}"
    return jwt.encode(claims, JWT_SECRET, "HS256")


TOKENS = ["alg_none", "wrong_key", "expired", "no_exp", "no_sub", "tampered"]


@pytest.mark.parametrize("kind", TOKENS)
@pytest.mark.parametrize("action", ["patch", "delete", "get"])
async def test_bad_token_is_401_and_touches_nothing(
    app_api: Api, cast: Cast, kind: str, action: str
):
    session = await seed(app_api, cast)
    sid = session["id"]
    headers = {"Authorization": f"Bearer {bad_token(kind, cast.owner)}"}
    if action == "patch":
        r = await app_api.client.patch(
            f"/v1/sessions/{sid}",
            json={"expected_version": session["version"], "patch": {"work_in_progress": {}}},
            headers=headers,
        )
    elif action == "delete":
        r = await app_api.client.delete(f"/v1/sessions/{sid}", headers=headers)
    else:
        r = await app_api.client.get(f"/v1/sessions/{sid}", headers=headers)
    assert_problem(r, 401)
    assert r.headers["www-authenticate"].lower().startswith("bearer")
    assert stable(await app_api.full(sid, cast.owner)) == stable(session)


@pytest.mark.parametrize(
    "header",
    ["", "Bearer", "Bearer ", "Basic YWxpY2U6cHc=", "Bearer a.b.c", "Bearer " + "x" * 9000],
)
async def test_malformed_authorization_header_is_401(app_api: Api, header: str):
    r = await app_api.client.get("/v1/sessions", headers={"Authorization": header})
    assert_problem(r, 401)
    assert r.headers["www-authenticate"].lower().startswith("bearer")


# -- an Idempotency-Key is the caller's own ------------------------------------------------


@pytest.mark.parametrize("route", ["patch", "append", "add_participant", "suspend"])
async def test_a_stranger_cannot_replay_the_owners_idempotent_answer(
    app_api: Api, cast: Cast, route: str
):
    """Same key, same body, other caller: a 403, never the owner's cached answer."""
    spec = next(r for r in ROUTES if r.name == route)
    session = await seed(app_api, cast)
    path = spec.path.format(sid=session["id"], mad=cast.mad, other=cast.other_mad)
    body = spec.body
    if body is not None and body.get("expected_version") == "{version}":
        body = {**body, "expected_version": session["version"]}
    key = {"Idempotency-Key": f"shared-{cast.mad}"}
    first = await app_api.client.request(
        spec.method, path, json=body, headers=app_api.h(cast.owner, **key)
    )
    assert first.status_code == 200, first.text
    before = await app_api.full(session["id"], cast.owner)

    r = await app_api.client.request(
        spec.method, path, json=body, headers=app_api.h(cast.stranger, **key)
    )

    assert_problem(r, 403)
    assert session["id"] not in r.text.replace(path, "")
    assert stable(await app_api.full(session["id"], cast.owner)) == stable(before)
