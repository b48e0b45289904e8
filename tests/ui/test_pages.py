"""The inspector's pages in process: sign-in, cookie, CSRF, access and the actions' rules."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from litestar.testing import AsyncTestClient

from sessionmgr.api.auth import issue_token
from sessionmgr.ui.cookie import COOKIE_NAME
from tests.conftest import JWT_SECRET
from tests.ui.conftest import ORIGIN, csrf_of

Client = AsyncTestClient[Any]
IDEM = "k" * 20


async def _create(ui: Client, auth: Callable[..., dict[str, str]], sub: str) -> str:
    created = await ui.post(
        "/v1/sessions", json={"work_in_progress": {"step": 1}}, headers=auth(sub)
    )
    assert created.status_code == 201, created.text
    session_id: str = created.json()["id"]
    return session_id


async def test_pages_need_a_sign_in(ui: Client, auth: Callable[..., dict[str, str]]) -> None:
    session_id = await _create(ui, auth, "alice")
    for path in ("/ui", f"/ui/sessions/{session_id}", f"/ui/sessions/{session_id}/panel"):
        response = await ui.get(path, follow_redirects=False)
        assert response.status_code == 303, (path, response.status_code)
        assert response.headers["location"] == "/ui/sign-in"
        assert session_id not in response.text
    # a bearer token is not a sign-in: the pages read the cookie only
    response = await ui.get("/ui", headers=auth("alice"), follow_redirects=False)
    assert response.status_code == 303


async def test_sign_in_sets_a_strict_httponly_cookie(ui: Client, token: Callable[..., str]) -> None:
    response = await ui.post(
        "/ui/sign-in",
        data={"token": token("alice")},
        headers={"Origin": ORIGIN},
        follow_redirects=False,
    )
    assert response.status_code == 303
    cookie = response.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE_NAME}=")
    for attribute in ("HttpOnly", "SameSite=Strict", "Path=/ui", "Max-Age="):
        assert attribute.lower() in cookie.lower(), cookie
    assert "secure" in cookie.lower()  # testserver.local is not loopback
    assert token("alice") not in cookie  # the token is encoded, and never in a URL
    assert "token" not in response.headers["location"]


async def test_a_bad_token_is_refused_at_sign_in(ui: Client) -> None:
    response = await ui.post("/ui/sign-in", data={"token": "not-a-jwt"}, headers={"Origin": ORIGIN})
    assert response.status_code == 401
    assert "malformed" in response.text
    assert "set-cookie" not in response.headers


async def test_a_token_too_large_for_a_cookie_is_refused_at_sign_in(
    ui: Client, token: Callable[..., str]
) -> None:
    roles = tuple(f"role-{n:04d}" for n in range(400))  # verifies, but ~8 KB of claims
    large = issue_token(JWT_SECRET, "alice", roles=roles)
    response = await ui.post("/ui/sign-in", data={"token": large}, headers={"Origin": ORIGIN})
    assert response.status_code == 400, response.text
    assert "too large" in response.text
    assert "set-cookie" not in response.headers


async def test_sign_in_from_another_origin_is_refused(
    ui: Client, token: Callable[..., str]
) -> None:
    response = await ui.post(
        "/ui/sign-in", data={"token": token("alice")}, headers={"Origin": "https://evil.example"}
    )
    assert response.status_code == 403
    assert "set-cookie" not in response.headers


async def test_a_forged_or_altered_cookie_is_refused(
    ui: Client, sign_in: Callable[..., Any]
) -> None:
    await sign_in("alice")
    good = ui.cookies[COOKIE_NAME]
    body, _, mac = good.rpartition(".")
    forged = [
        f"{body}.{'A' * len(mac)}",  # another signature
        good.replace(good.split(".")[1], "9999999999", 1),  # a later expiry, same signature
        "v1.9999999999.nonce.dG9rZW4.c2ln",
        "garbage",
    ]
    for value in forged:
        ui.cookies.clear()
        ui.cookies.set(COOKIE_NAME, value)
        response = await ui.get("/ui", follow_redirects=False)
        assert response.status_code == 303, value
        assert response.headers["location"] == "/ui/sign-in"


async def test_pages_carry_a_strict_csp(ui: Client, sign_in: Callable[..., Any]) -> None:
    await sign_in("alice")
    response = await ui.get("/ui")
    csp = response.headers["content-security-policy"]
    assert "default-src 'none'" in csp
    assert "script-src 'self'" in csp
    assert "unsafe-inline" not in csp
    assert response.headers["x-frame-options"] == "DENY"
    assert "<script>" not in response.text  # only <script src=...> from /static
    for src in re.findall(r'(?:src|href)="([^"]+)"', response.text):
        assert src.startswith("/"), src  # every asset from this service


async def test_list_shows_only_readable_sessions(
    ui: Client, auth: Callable[..., dict[str, str]], sign_in: Callable[..., Any]
) -> None:
    mine = await _create(ui, auth, "alice")
    theirs = await _create(ui, auth, "bob")
    await sign_in("alice")
    page = (await ui.get("/ui")).text
    assert mine in page
    assert theirs not in page
    stranger = await ui.get(f"/ui/sessions/{theirs}")
    assert stranger.status_code == 403
    assert "step" not in stranger.text
    assert theirs not in (await ui.get("/ui?state=active&order=id")).text


async def test_suspend_and_resume_need_csrf_and_the_shown_version(
    ui: Client, auth: Callable[..., dict[str, str]], sign_in: Callable[..., Any]
) -> None:
    session_id = await _create(ui, auth, "alice")
    await sign_in("alice")
    page = (await ui.get(f"/ui/sessions/{session_id}")).text
    csrf = csrf_of(page)
    url = f"/ui/sessions/{session_id}/suspend"
    form = {"csrf": csrf, "version": "1", "idem": IDEM}

    no_csrf = await ui.post(url, data={**form, "csrf": "x"}, headers={"Origin": ORIGIN})
    assert no_csrf.status_code == 403
    cross = await ui.post(url, data=form, headers={"Origin": "https://evil.example"})
    assert cross.status_code == 403
    stale = await ui.post(url, data={**form, "version": "7"}, headers={"Origin": ORIGIN})
    assert stale.status_code == 412
    got = await ui.get(f"/v1/sessions/{session_id}", headers=auth("alice"))
    assert got.json()["state"] == "active"  # none of the refused forms did anything

    done = await ui.post(url, data=form, headers={"Origin": ORIGIN}, follow_redirects=False)
    assert done.status_code == 303
    got = await ui.get(f"/v1/sessions/{session_id}", headers=auth("alice"))
    assert got.json()["state"] == "dormant"
    # the same form sent twice is the same Idempotency-Key: the first answer, no error
    again = await ui.post(url, data=form, headers={"Origin": ORIGIN}, follow_redirects=False)
    assert again.status_code == 303

    version = got.json()["version"]
    resumed = await ui.post(
        f"/ui/sessions/{session_id}/resume",
        data={"csrf": csrf, "version": str(version), "idem": "r" * 20},
        headers={"Origin": ORIGIN},
        follow_redirects=False,
    )
    assert resumed.status_code == 303
    got = await ui.get(f"/v1/sessions/{session_id}", headers=auth("alice"))
    assert got.json()["state"] == "active"


async def test_a_participant_cannot_archive_from_the_page(
    ui: Client, auth: Callable[..., dict[str, str]], sign_in: Callable[..., Any]
) -> None:
    session_id = await _create(ui, auth, "alice")
    joined = await ui.post(
        f"/v1/sessions/{session_id}/participants",
        json={"mad_name": "planner"},
        headers=auth("alice"),
    )
    assert joined.status_code in (200, 201), joined.text
    csrf = await sign_in("mad:planner")
    page = (await ui.get(f"/ui/sessions/{session_id}")).text
    assert 'id="do-archive"' not in page
    refused = await ui.post(
        f"/ui/sessions/{session_id}/archive",
        data={"csrf": csrf, "version": "2", "idem": IDEM},
        headers={"Origin": ORIGIN},
    )
    assert refused.status_code == 403


async def test_remove_participant_and_panel_etag(
    ui: Client, auth: Callable[..., dict[str, str]], sign_in: Callable[..., Any]
) -> None:
    session_id = await _create(ui, auth, "alice")
    await ui.post(
        f"/v1/sessions/{session_id}/participants",
        json={"mad_name": "critic"},
        headers=auth("alice"),
    )
    csrf = await sign_in("alice")
    panel = await ui.get(f"/ui/sessions/{session_id}/panel")
    assert "critic" in panel.text and "countdown" in panel.text
    tag = panel.headers["etag"]
    unchanged = await ui.get(f"/ui/sessions/{session_id}/panel", headers={"If-None-Match": tag})
    assert unchanged.status_code == 304
    version = (await ui.get(f"/v1/sessions/{session_id}", headers=auth("alice"))).json()["version"]
    removed = await ui.post(
        f"/ui/sessions/{session_id}/participants/critic/remove",
        data={"csrf": csrf, "version": str(version), "idem": IDEM},
        headers={"Origin": ORIGIN},
        follow_redirects=False,
    )
    assert removed.status_code == 303
    changed = await ui.get(f"/ui/sessions/{session_id}/panel", headers={"If-None-Match": tag})
    assert changed.status_code == 200
    assert "critic" not in changed.text


async def test_timeline_is_newest_first_and_paged(
    ui: Client, auth: Callable[..., dict[str, str]], sign_in: Callable[..., Any]
) -> None:
    session_id = await _create(ui, auth, "alice")
    events = [{"kind": "note", "data": {"n": n}} for n in range(1, 26)]
    appended = await ui.post(
        f"/v1/sessions/{session_id}/timeline", json={"events": events}, headers=auth("alice")
    )
    assert appended.status_code == 200, appended.text
    await sign_in("alice")
    page = (await ui.get(f"/ui/sessions/{session_id}")).text
    seqs = [int(s) for s in re.findall(r'data-seq="(\d+)"', page)]
    assert seqs == list(range(25, 5, -1))  # the newest 20, newest first
    older = (await ui.get(f"/ui/sessions/{session_id}/timeline?before=6")).text
    assert [int(s) for s in re.findall(r'data-seq="(\d+)"', older)] == [5, 4, 3, 2, 1]


async def test_operator_view_is_for_admin(ui: Client, sign_in: Callable[..., Any]) -> None:
    await sign_in("alice")
    assert (await ui.get("/ui/operator")).status_code == 403
    await sign_in("ops", ("admin",))
    page = await ui.get("/ui/operator")
    assert page.status_code == 200
    assert 'id="backlog"' in page.text
    assert 'id="breaker-redis">closed<' in page.text
    assert 'id="read-only">off<' in page.text


async def test_sign_out_clears_the_cookie(ui: Client, sign_in: Callable[..., Any]) -> None:
    csrf = await sign_in("alice")
    refused = await ui.post("/ui/sign-out", data={"csrf": "nope"}, headers={"Origin": ORIGIN})
    assert refused.status_code == 403
    out = await ui.post(
        "/ui/sign-out", data={"csrf": csrf}, headers={"Origin": ORIGIN}, follow_redirects=False
    )
    assert out.status_code == 303
    assert (
        'sessionmgr_ui=""' in out.headers["set-cookie"] or "Max-Age=0" in out.headers["set-cookie"]
    )


async def test_the_feed_relay_needs_a_sign_in(
    ui: Client, auth: Callable[..., dict[str, str]]
) -> None:
    """Signed in, the relay streams the real feed without end (the test client would wait for
    its end): tests/ui/test_browser.py follows it in Chromium against a running serve."""
    session_id = await _create(ui, auth, "alice")
    refused = await ui.get(f"/ui/changes/{session_id}", follow_redirects=False)
    assert refused.status_code == 303
