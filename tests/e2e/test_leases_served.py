"""Leases, fencing tokens, reaping, participant rights and merge patches, black-box against a
running `sessionmgr serve` (its own process) with 1 s leases and a 2 s grace period.

Waits are real: a lease lapses when its Redis key expires, not when a test says so.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from sessionmgr.api.auth import issue_token
from sessionmgr.devstack import free_port
from tests.conftest import JWT_SECRET
from tests.e2e.conftest import assert_problem
from tests.support.redis_server import RedisServer

LEASE_TTL_S = 1
LEASE_GRACE_S = 2
LAPSE_S = LEASE_TTL_S + 0.3  # past a lease's end, with room for the key's expiry
START_TIMEOUT_S = 30.0
MERGE_PATCH = "application/merge-patch+json"


@pytest.fixture(scope="module")
def base_url(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if redis_server.process is None:  # another test stopped it
        redis_server.start()
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {
        **os.environ,
        "SESSIONMGR_REDIS_URL": redis_server.url,
        "SESSIONMGR_MONGODB_URI": "mongomock://",
        "SESSIONMGR_JWT_SECRET": JWT_SECRET,
        "SESSIONMGR_RATE_LIMIT_PER_S": "0",
        "SESSIONMGR_LEASE_TTL_S": str(LEASE_TTL_S),
        "SESSIONMGR_LEASE_GRACE_S": str(LEASE_GRACE_S),
        "SESSIONMGR_GC_FREEZE": "false",
    }
    with log.open("wb") as sink:
        process = subprocess.Popen(  # fixed argv, no shell
            [
                *(sys.executable, "-m", "sessionmgr", "serve"),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=sink,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_live(url, process, log)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_until_live(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{url}/health/live", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"sessionmgr serve did not start: {log.read_text(errors='replace')[-2000:]}")


class Caller:
    """One principal talking to the served API."""

    def __init__(self, http: httpx.Client, sub: str, roles: tuple[str, ...] = ()) -> None:
        self.http = http
        self.sub = sub
        self.auth = {"Authorization": f"Bearer {issue_token(JWT_SECRET, sub, roles=roles)}"}

    def __call__(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {**self.auth, **kwargs.pop("headers", {})}
        return self.http.request(method, path, headers=headers, **kwargs)

    def session(self, sid: str) -> dict[str, Any]:
        r = self("GET", f"/v1/sessions/{sid}")
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    def join(self, sid: str, mad: str) -> dict[str, Any]:
        r = self("POST", f"/v1/sessions/{sid}/participants", json={"mad_name": mad})
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    def note(self, sid: str, token: int | None = None) -> httpx.Response:
        headers = {} if token is None else {"Lease-Token": str(token)}
        events = {"events": [{"kind": "note", "data": {"by": self.sub}}]}
        return self("POST", f"/v1/sessions/{sid}/timeline", json=events, headers=headers)


@pytest.fixture
def http(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=10) as client:
        yield client


@pytest.fixture
def cast(http: httpx.Client) -> dict[str, Caller]:
    tag = secrets.token_hex(4)
    return {
        "owner": Caller(http, f"alice-{tag}"),
        "planner": Caller(http, f"mad:planner-{tag}"),
        "coder": Caller(http, f"mad:coder-{tag}"),
    }


def mad(caller: Caller) -> str:
    return caller.sub.removeprefix("mad:")


def problem_type(r: httpx.Response, status: int) -> str:
    return str(assert_problem(r, status)["type"]).rsplit("#", 1)[-1]


def when(raw: str) -> datetime:
    return datetime.fromisoformat(raw.replace("Z", "+00:00"))


def new_session(owner: Caller, *mads: Caller, **body: Any) -> dict[str, Any]:
    r = owner("POST", "/v1/sessions", json=body)
    assert r.status_code == 201, r.text
    session: dict[str, Any] = r.json()
    for m in mads:
        session = owner.join(session["id"], mad(m))
    return session


def test_an_expired_mads_write_is_refused(cast: dict[str, Caller]) -> None:
    owner, planner = cast["owner"], cast["planner"]
    sid = new_session(owner, planner)["id"]
    assert planner.note(sid).status_code == 200
    time.sleep(LAPSE_S)

    refused = planner.note(sid)
    patched = planner(
        "PATCH",
        f"/v1/sessions/{sid}",
        json={"expected_version": 3, "patch": {"work_in_progress": {"late": True}}},
    )

    assert problem_type(refused, 409) == problem_type(patched, 409) == "lease-expired"
    assert f"POST /v1/sessions/{sid}/participants" in refused.json()["detail"]
    after = owner.session(sid)
    assert (after["version"], after["work_in_progress"]) == (3, {})
    assert planner.session(sid)["participants"][mad(planner)]["active"] is False  # reads go on
    assert owner.note(sid).status_code == 200  # the owner needs no lease


def test_an_older_token_is_fenced_after_a_rejoin(cast: dict[str, Caller]) -> None:
    owner, planner, coder = cast["owner"], cast["planner"], cast["coder"]
    session = new_session(owner, planner, coder)
    sid = session["id"]
    first = session["participants"][mad(planner)]["token"]
    assert planner.note(sid, first).status_code == 200
    time.sleep(LAPSE_S)  # the first holder stalls; a second instance rejoins

    rejoined = planner.join(sid, mad(planner))
    second = rejoined["participants"][mad(planner)]["token"]
    assert second > max(first, session["participants"][mad(coder)]["token"])

    stale = planner.note(sid, first)
    assert problem_type(stale, 409) == "fenced"
    renew = planner("PUT", f"/v1/sessions/{sid}/participants/{mad(planner)}/lease")
    assert renew.status_code == 200 and renew.json()["token"] == second
    assert planner.note(sid, second).status_code == 200
    assert planner.note(sid).status_code == 200  # no token: the live lease decides
    stale_leave = planner(
        "DELETE",
        f"/v1/sessions/{sid}/participants/{mad(planner)}",
        headers={"Lease-Token": str(first)},
    )
    assert problem_type(stale_leave, 409) == "fenced"
    assert f"mad:{mad(planner)}" in owner.session(sid)["acl"]


def test_a_lapsed_participant_is_reaped_from_the_acl_after_the_grace(
    cast: dict[str, Caller],
) -> None:
    owner, planner = cast["owner"], cast["planner"]
    sid = new_session(owner, planner)["id"]
    time.sleep(0.4)
    renewed = planner("PUT", f"/v1/sessions/{sid}/participants/{mad(planner)}/lease").json()
    time.sleep(LAPSE_S)

    lapsed = owner.session(sid)
    seen = lapsed["participants"][mad(planner)]
    assert seen["active"] is False
    assert when(seen["lease_expires_at"]) == when(seen["lapsed_at"])
    assert abs((when(seen["lapsed_at"]) - when(renewed["expires_at"])).total_seconds()) < 0.05
    assert f"mad:{mad(planner)}" in lapsed["acl"]  # inside the grace period
    assert planner("GET", f"/v1/sessions/{sid}").status_code == 200

    time.sleep(LEASE_GRACE_S)
    reaped = owner.session(sid)
    assert (reaped["participants"], reaped["acl"]) == ({}, [])
    assert_problem(planner("GET", f"/v1/sessions/{sid}"), 403)
    assert_problem(planner("PUT", f"/v1/sessions/{sid}/participants/{mad(planner)}/lease"), 403)
    assert_problem(planner("DELETE", f"/v1/sessions/{sid}/participants/{mad(planner)}"), 403)

    assert owner.note(sid).status_code == 200  # the next write stores the reaping
    r = owner("GET", "/v1/sessions?limit=100")
    assert sid in {s["id"] for s in r.json()["items"]}
    assert owner.session(sid)["acl"] == []


def test_delete_removes_a_participant_at_once_and_then_404(cast: dict[str, Caller]) -> None:
    owner, planner = cast["owner"], cast["planner"]
    sid = new_session(owner, planner)["id"]
    path = f"/v1/sessions/{sid}/participants/{mad(planner)}"
    assert owner("DELETE", path).status_code == 204
    assert owner.session(sid)["acl"] == []
    assert_problem(planner.note(sid), 403)
    assert problem_type(owner("DELETE", path), 404) == "not-found"


def test_a_mad_cannot_remove_or_add_the_owners_other_participants(
    cast: dict[str, Caller],
) -> None:
    owner, planner, coder = cast["owner"], cast["planner"], cast["coder"]
    session = new_session(owner, planner, coder)
    sid = session["id"]

    assert_problem(planner("DELETE", f"/v1/sessions/{sid}/participants/{mad(coder)}"), 403)
    assert_problem(
        planner("POST", f"/v1/sessions/{sid}/participants", json={"mad_name": "friend"}), 403
    )
    assert_problem(planner("PUT", f"/v1/sessions/{sid}/participants/{mad(coder)}/lease"), 403)
    assert_problem(planner("POST", f"/v1/sessions/{sid}/suspend"), 403)
    after = owner.session(sid)
    assert (after["acl"], after["version"], after["state"]) == (
        session["acl"],
        session["version"],
        "active",
    )

    assert planner("DELETE", f"/v1/sessions/{sid}/participants/{mad(planner)}").status_code == 204
    assert owner.session(sid)["acl"] == [f"mad:{mad(coder)}"]  # it left; coder stays


def test_a_lease_on_a_dormant_session_is_409_until_it_is_resumed(
    cast: dict[str, Caller],
) -> None:
    owner, planner = cast["owner"], cast["planner"]
    sid = new_session(owner, planner)["id"]
    assert owner("POST", f"/v1/sessions/{sid}/suspend").status_code == 200

    renew = planner("PUT", f"/v1/sessions/{sid}/participants/{mad(planner)}/lease")
    assert problem_type(renew, 409) == "dormant"
    assert problem_type(planner.note(sid), 409) == "lease-expired"  # and it stays asleep
    assert owner.session(sid)["state"] == "dormant"

    assert planner("POST", f"/v1/sessions/{sid}/resume").status_code == 200
    lapsed = planner("PUT", f"/v1/sessions/{sid}/participants/{mad(planner)}/lease")
    assert problem_type(lapsed, 409) == "lease-expired"  # a suspend ended the lease
    rejoined = planner.join(sid, mad(planner))
    assert rejoined["participants"][mad(planner)]["token"] == 2  # the counter survived suspend
    assert planner.note(sid, 2).status_code == 200


def test_merge_patch_changes_nested_keys(cast: dict[str, Caller]) -> None:
    owner = cast["owner"]
    session = new_session(
        owner,
        work_in_progress={"plan": {"step": 1, "draft": "x", "steps": [1, 2]}, "keep": True},
        context_summary={"goal": "ship"},
    )
    sid = session["id"]
    document = {"work_in_progress": {"plan": {"step": 2, "draft": None}}}

    r = owner(
        "PATCH",
        f"/v1/sessions/{sid}",
        json=document,
        headers={"Content-Type": MERGE_PATCH, "If-Match": '"1"'},
    )

    assert r.status_code == 200, r.text
    assert r.headers["etag"] == '"2"'
    assert r.json()["work_in_progress"] == {"plan": {"step": 2, "steps": [1, 2]}, "keep": True}
    assert r.json()["context_summary"] == {"goal": "ship"}
    assert owner.session(sid)["work_in_progress"] == r.json()["work_in_progress"]

    no_version = owner(
        "PATCH", f"/v1/sessions/{sid}", json=document, headers={"Content-Type": MERGE_PATCH}
    )
    assert problem_type(no_version, 428) == "version-required"
    stale = owner(
        "PATCH",
        f"/v1/sessions/{sid}",
        json=document,
        headers={"Content-Type": MERGE_PATCH, "If-Match": '"1"'},
    )
    assert_problem(stale, (409, 412))  # 412 once If-Match answers as RFC 9110 says
    plain_shape = owner(
        "PATCH",
        f"/v1/sessions/{sid}",
        json={"expected_version": 2, "patch": {"work_in_progress": {}}},
        headers={"Content-Type": MERGE_PATCH, "If-Match": '"2"'},
    )
    assert problem_type(plain_shape, 422) == "invalid-input"
    other_json = owner(
        "PATCH",
        f"/v1/sessions/{sid}",
        content=b'{"expected_version": 2, "patch": {"work_in_progress": {}}}',
        headers={"Content-Type": "application/vnd.example+json"},
    )
    assert_problem(other_json, 415)
    assert owner.session(sid)["version"] == 2
