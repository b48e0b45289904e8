"""The inspector in a real headless Chromium against a running `sessionmgr serve`.

Debian's `chromium` (installed by .ci/run) driven by Playwright through `executable_path`;
Playwright never downloads a browser. Every request the browser makes that leaves the
service's origin is aborted and fails the test; so does any CSP violation or page error.
`SESSIONMGR_UI_SCREENSHOTS=1` also writes docs/ui-list.png and docs/ui-session.png.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.served import Served, headers, serve
from tests.support.redis_server import RedisServer

CHROMIUM = os.environ.get("SESSIONMGR_TEST_CHROMIUM", "/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DOCS = Path(__file__).resolve().parents[2] / "docs"
LIVE_TIMEOUT_MS = 15_000  # the page polls every 3 s where no change feed answers

try:
    from playwright.sync_api import Browser, Page, Playwright, Route, sync_playwright
except ImportError:  # pragma: no cover - the tests group installs it
    sync_playwright = None  # type: ignore[assignment]

pytestmark = [
    pytest.mark.skipif(
        sync_playwright is None, reason="playwright is not installed (pip install playwright)"
    ),
    pytest.mark.skipif(
        shutil.which(CHROMIUM) is None,
        reason=f"no Chromium at {CHROMIUM} (apt-get install -y chromium; .ci/run does)",
    ),
]


@pytest.fixture(scope="module")
def served(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    if redis_server.process is None:  # another test stopped it
        redis_server.start()
    env = {"SESSIONMGR_REDIS_URL": redis_server.url, "SESSIONMGR_RATE_LIMIT_PER_S": "0"}
    with serve(env, tmp_path_factory.mktemp("ui") / "serve.log") as running:
        yield running


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = _launch(playwright)
        yield launched
        launched.close()


def _launch(playwright: Playwright) -> Browser:
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)


class Watched:
    """A browser context whose requests must all stay on the service's origin."""

    def __init__(self, browser: Browser, base_url: str) -> None:
        self.base_url = base_url
        self.external: list[str] = []
        self.errors: list[str] = []
        self.context = browser.new_context(
            base_url=base_url, viewport={"width": 1280, "height": 900}
        )
        self.context.route("**/*", self._only_here)
        self.page = self.context.new_page()
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))

    def _only_here(self, route: Route) -> None:
        url = route.request.url
        if url.startswith((self.base_url + "/", "data:", "blob:")) or url == self.base_url:
            route.continue_()
        else:
            self.external.append(url)
            route.abort()

    def _console(self, message: Any) -> None:
        if message.type == "error" and "Content Security Policy" in message.text:
            self.errors.append(message.text)

    def sign_in(self, token: str) -> Page:
        self.page.goto("/ui/sign-in")
        self.page.fill("#token", token)
        self.page.click("button[type=submit]")
        self.page.wait_for_url(re.compile(r"/ui/?$"))
        return self.page

    def close(self) -> None:
        self.context.close()
        assert self.external == [], f"requests left the service: {self.external}"
        assert self.errors == [], f"CSP violations or page errors: {self.errors}"


def _token(served: Served, sub: str) -> str:
    return headers(sub)["Authorization"].removeprefix("Bearer ")


def _create(http: httpx.Client, sub: str, wip: dict[str, Any]) -> str:
    created = http.post("/v1/sessions", json={"work_in_progress": wip}, headers=headers(sub))
    assert created.status_code == 201, created.text
    session_id: str = created.json()["id"]
    return session_id


def test_sign_in_list_open_follow_live_suspend_and_resume(served: Served, browser: Browser) -> None:
    watched = Watched(browser, served.base_url)
    with served.client() as http:
        session_id = _create(http, "ui-owner", {"step": 1, "plan": ["draft", "review"]})
        other = _create(http, "ui-owner", {"step": 7})
        joined = http.post(
            f"/v1/sessions/{session_id}/participants",
            json={"mad_name": "planner"},
            headers=headers("ui-owner"),
        )
        assert joined.status_code in (200, 201), joined.text
        http.post(
            f"/v1/sessions/{session_id}/timeline",
            json={"events": [{"kind": "plan", "data": {"steps": 2}}]},
            headers=headers("mad:planner"),
        )

        page = watched.sign_in(_token(served, "ui-owner"))
        rows = page.locator("table.sessions tbody tr")
        assert rows.count() == 2
        assert page.locator(f"a[href='/ui/sessions/{session_id}']").is_visible()
        assert page.locator(f"a[href='/ui/sessions/{other}']").is_visible()
        # most recently active first: the session with the append is on top
        assert session_id in rows.first.inner_text()
        assert "planner" in rows.first.inner_text()
        if os.environ.get("SESSIONMGR_UI_SCREENSHOTS"):
            page.screenshot(path=str(DOCS / "ui-list.png"), full_page=True)

        page.click(f"a[href='/ui/sessions/{session_id}']")
        page.wait_for_selector("#wip")
        assert '"plan"' in page.inner_text("#wip")
        assert page.inner_text("#state") == "active"
        page.wait_for_selector(".countdown:has-text('expires in')")
        # The service has its change feed: the page follows it (through /ui/changes, as the
        # cookie's principal), not the polling fallback.
        page.wait_for_selector("#live-status:has-text('live')")

        # an append made through the API appears without a reload
        appended = http.post(
            f"/v1/sessions/{session_id}/timeline",
            json={"events": [{"kind": "verdict", "data": {"ok": True}}]},
            headers=headers("mad:planner"),
        )
        assert appended.status_code == 200, appended.text
        page.wait_for_selector("tr.event:has-text('verdict')", timeout=LIVE_TIMEOUT_MS)
        assert page.locator("tr.event").first.inner_text().startswith("2")  # newest first
        if os.environ.get("SESSIONMGR_UI_SCREENSHOTS"):
            page.screenshot(path=str(DOCS / "ui-session.png"), full_page=True)

        page.click("#do-suspend")
        page.wait_for_selector("#state:has-text('dormant')")
        got = http.get(f"/v1/sessions/{session_id}", headers=headers("ui-owner")).json()
        assert got["state"] == "dormant"
        page.click("#do-resume")
        page.wait_for_selector("#state:has-text('active')")
        got = http.get(f"/v1/sessions/{session_id}", headers=headers("ui-owner")).json()
        assert got["state"] == "active"

        # the API documentation renders from local assets only
        page.goto("/schema")
        page.wait_for_selector("text=sessionmgr", timeout=LIVE_TIMEOUT_MS)
        page.wait_for_selector("h2:has-text('Create a session')", timeout=LIVE_TIMEOUT_MS)

        page.goto("/ui")
        page.click("text=Sign out")
        page.wait_for_url(re.compile(r"/ui/sign-in$"))
        page.goto(f"/ui/sessions/{session_id}")
        assert page.url.endswith("/ui/sign-in")
    watched.close()


def test_a_stranger_sees_nothing_of_anothers_sessions(served: Served, browser: Browser) -> None:
    with served.client() as http:
        session_id = _create(http, "ui-alice", {"secret": "alice-only-42"})
    watched = Watched(browser, served.base_url)
    page = watched.sign_in(_token(served, "ui-stranger"))
    assert session_id not in page.content()
    assert page.locator("#empty").is_visible()
    response = page.goto(f"/ui/sessions/{session_id}")
    assert response is not None and response.status == 403
    assert "alice-only-42" not in page.content()
    panel = page.request.get(f"/ui/sessions/{session_id}/panel")
    assert panel.status == 403
    assert "alice-only-42" not in panel.text()
    watched.close()


def test_no_cookie_or_a_forged_one_is_refused(served: Served, browser: Browser) -> None:
    with served.client() as http:
        session_id = _create(http, "ui-bob", {"secret": "bob-only-17"})
    watched = Watched(browser, served.base_url)
    page = watched.page
    page.goto(f"/ui/sessions/{session_id}")
    assert page.url.endswith("/ui/sign-in")
    assert "bob-only-17" not in page.content()

    page = watched.sign_in(_token(served, "ui-bob"))
    cookie = next(c for c in watched.context.cookies() if c["name"] == "sessionmgr_ui")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert page.evaluate("document.cookie") == ""  # not readable by scripts
    body, _, mac = cookie["value"].rpartition(".")
    watched.context.clear_cookies()
    watched.context.add_cookies(
        [{**cookie, "value": f"{body}.{'A' * len(mac)}"}]  # type: ignore[typeddict-item]
    )
    page.goto(f"/ui/sessions/{session_id}")
    assert page.url.endswith("/ui/sign-in")
    assert "bob-only-17" not in page.content()
    # and a form posted without the cookie (as another site would) changes nothing
    refused = page.request.post(
        f"/ui/sessions/{session_id}/suspend",
        form={"csrf": "x", "version": "1", "idem": "a" * 20},
        max_redirects=0,
    )
    assert refused.status in (401, 403), refused.status
    with served.client() as http:
        state = http.get(f"/v1/sessions/{session_id}", headers=headers("ui-bob")).json()["state"]
    assert state == "active"
    watched.close()


def test_the_operator_view_is_for_admin_only(served: Served, browser: Browser) -> None:
    watched = Watched(browser, served.base_url)
    page = watched.sign_in(_token(served, "ui-dev"))
    assert page.locator("a[href='/ui/operator']").count() == 0
    response = page.goto("/ui/operator")
    assert response is not None and response.status == 403
    watched.close()

    watched = Watched(browser, served.base_url)
    page = watched.sign_in(headers("ui-ops", ("admin",))["Authorization"].removeprefix("Bearer "))
    page.click("a[href='/ui/operator']")
    page.wait_for_selector("#backlog")
    assert page.inner_text("#read-only") == "off"
    assert page.inner_text("#breaker-redis") == "closed"
    assert page.inner_text("#dead-letters").isdigit()
    watched.close()
