"""The HTTP contract, black-box against a real `sessionmgr serve` (issue 12).

Preconditions (RFC 9110 §13): a stale If-Match on each mutating route is 412 and changes
nothing; conditional GETs never miss a change and never download an unchanged body; HEAD.
One problem shape for every error (each answer checked as it arrives, see `served.py`);
problem types that resolve; trace ids on every answer; the archive stub; lists by recency.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from sessionmgr.api.problem_types import CATALOGUE, render_markdown
from tests.e2e.conftest import stable
from tests.e2e.served import Served, check_problem, headers, serve
from tests.support.redis_server import RedisServer
from tests.support.s3_server import S3_BUCKET, S3Server

LEASE_TTL_S = 4  # short, for the lapse; long enough that no other test sees one
DOCS = Path(__file__).parents[2] / "docs" / "problems.md"


@pytest.fixture(scope="module")
def served(
    redis_server: RedisServer, s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    if redis_server.process is None:  # another test stopped it
        redis_server.start()
    env = {
        "SESSIONMGR_REDIS_URL": redis_server.url,
        "SESSIONMGR_S3_ENDPOINT_URL": s3_server.url,
        "SESSIONMGR_S3_BUCKET": S3_BUCKET,
        "SESSIONMGR_LEASE_TTL_S": str(LEASE_TTL_S),
    }
    with serve(env, tmp_path_factory.mktemp("contract") / "serve.log") as server:
        yield server
        assert server.process.poll() is None, "sessionmgr serve died during the tests"


@pytest.fixture
def http(served: Served) -> Iterator[httpx.Client]:
    with served.client() as client:
        yield client


@pytest.fixture
def owner() -> str:
    return f"alice-{secrets.token_hex(4)}"


@pytest.fixture
def mad() -> str:
    return f"planner-{secrets.token_hex(4)}"


def create(http: httpx.Client, owner: str, **body: Any) -> dict[str, Any]:
    r = http.post("/v1/sessions", json=body, headers=headers(owner))
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


def full(http: httpx.Client, sid: str, owner: str) -> dict[str, Any]:
    r = http.get(f"/v1/sessions/{sid}?include=full", headers=headers(owner))
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def join(http: httpx.Client, sid: str, owner: str, mad: str) -> dict[str, Any]:
    r = http.post(
        f"/v1/sessions/{sid}/participants", json={"mad_name": mad}, headers=headers(owner)
    )
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


# -- If-Match on every route that changes a session ----------------------------------------

# name -> (method, path, body); `{sid}` the session, `{mad}` a participant.
WRITES: dict[str, tuple[str, str, dict[str, Any] | None]] = {
    "updateSession": ("PATCH", "/v1/sessions/{sid}", {"patch": {"work_in_progress": {"x": 1}}}),
    "appendTimeline": ("POST", "/v1/sessions/{sid}/timeline", {"events": [{"kind": "note"}]}),
    "addParticipant": ("POST", "/v1/sessions/{sid}/participants", {"mad_name": "helper"}),
    "renewLease": ("PUT", "/v1/sessions/{sid}/participants/{mad}/lease", None),
    "removeParticipant": ("DELETE", "/v1/sessions/{sid}/participants/{mad}", None),
    "suspendSession": ("POST", "/v1/sessions/{sid}/suspend", None),
    "resumeSession": ("POST", "/v1/sessions/{sid}/resume", None),
    "archiveSession": ("POST", "/v1/sessions/{sid}/archive", None),
    "deleteSession": ("DELETE", "/v1/sessions/{sid}", None),
}


def write(
    http: httpx.Client, route: str, session: dict[str, Any], owner: str, mad: str, if_match: str
) -> httpx.Response:
    method, path, body = WRITES[route]
    return http.request(
        method,
        path.format(sid=session["id"], mad=mad),
        json=body,
        headers=headers(owner, **{"If-Match": if_match}),
    )


@pytest.fixture
def session(http: httpx.Client, owner: str, mad: str) -> dict[str, Any]:
    """alice's session at version 3, with one MAD; dormant for the resume test."""
    created = create(http, owner, work_in_progress={"step": 1})
    join(http, created["id"], owner, mad)
    r = http.patch(
        f"/v1/sessions/{created['id']}",
        json={"expected_version": 2, "patch": {"context_summary": {"goal": "ship"}}},
        headers=headers(owner),
    )
    assert r.status_code == 200, r.text
    return full(http, created["id"], owner)


@pytest.mark.parametrize("route", WRITES)
def test_a_stale_if_match_is_412_and_changes_nothing(
    http: httpx.Client, session: dict[str, Any], owner: str, mad: str, route: str
):
    if route == "resumeSession":
        assert http.post(f"/v1/sessions/{session['id']}/suspend", headers=headers(owner)).is_success
        session = full(http, session["id"], owner)
    stale = f'"{session["version"] - 1}"'

    r = write(http, route, session, owner, mad, stale)

    problem = check_problem(r)
    assert r.status_code == 412, problem
    assert problem["type"] == "/problems#precondition-failed"
    assert problem["current_version"] == session["version"]
    assert r.headers["etag"] == f'"{session["version"]}"'
    assert stable(full(http, session["id"], owner)) == stable(session), "a 412 changed it"


@pytest.mark.parametrize("route", WRITES)
def test_a_current_if_match_lets_the_write_through(
    http: httpx.Client, session: dict[str, Any], owner: str, mad: str, route: str
):
    if route == "resumeSession":
        assert http.post(f"/v1/sessions/{session['id']}/suspend", headers=headers(owner)).is_success
    read = http.get(f"/v1/sessions/{session['id']}", headers=headers(owner))
    r = write(http, route, session, owner, mad, read.headers["etag"])  # the ETag as read
    assert r.is_success, r.text


@pytest.mark.parametrize(
    ("if_match", "status"),
    [
        ("*", 200),
        ('"1", "{v}", "99"', 200),  # a list matches if any member does
        ('W/"{v}"', 412),  # strong comparison: a weak tag never matches
        ('"{v}-0123456789ab"', 200),  # a tag of this version, whatever lease state it saw
        ('"1", W/"{v}"', 412),
    ],
)
def test_if_match_forms(
    http: httpx.Client, session: dict[str, Any], owner: str, if_match: str, status: int
):
    value = if_match.replace("{v}", str(session["version"]))
    r = http.patch(
        f"/v1/sessions/{session['id']}",
        json={"patch": {"work_in_progress": {"y": 2}}},
        headers=headers(owner, **{"If-Match": value}),
    )
    assert r.status_code == status, r.text


def test_if_match_star_on_a_missing_session_is_404(http: httpx.Client, owner: str):
    r = http.post(
        f"/v1/sessions/{secrets.token_hex(16)}/suspend", headers=headers(owner, **{"If-Match": "*"})
    )
    assert check_problem(r)["status"] == 404


def test_a_stale_body_version_stays_409(http: httpx.Client, session: dict[str, Any], owner: str):
    r = http.patch(
        f"/v1/sessions/{session['id']}",
        json={"expected_version": 1, "patch": {"work_in_progress": {"x": 1}}},
        headers=headers(owner),
    )
    problem = check_problem(r)
    assert (r.status_code, problem["current_version"]) == (409, session["version"])


def test_a_stranger_learns_nothing_from_if_match(http: httpx.Client, session: dict[str, Any]):
    r = http.post(
        f"/v1/sessions/{session['id']}/suspend",
        headers=headers(f"mallory-{secrets.token_hex(4)}", **{"If-Match": '"1"'}),
    )
    problem = check_problem(r)
    assert r.status_code == 403 and "current_version" not in problem, problem


# -- If-None-Match and HEAD ----------------------------------------------------------------


class Poller:
    """A client that polls one session with If-None-Match, as a MAD watching it would."""

    def __init__(self, http: httpx.Client, sid: str, owner: str, query: str = "") -> None:
        self.http, self.url, self.owner = http, f"/v1/sessions/{sid}{query}", owner
        first = http.get(self.url, headers=headers(owner))
        assert first.status_code == 200, first.text
        self.etag, self.body = first.headers["etag"], first.json()

    def poll(self) -> httpx.Response:
        r = self.http.get(self.url, headers=headers(self.owner, **{"If-None-Match": self.etag}))
        if r.status_code == 200:
            # Never download an unchanged body: a 200 always brings something new.
            assert r.json() != self.body, "a 200 with the body the client already had"
            assert r.headers["etag"] != self.etag
            self.etag, self.body = r.headers["etag"], r.json()
        else:
            assert r.status_code == 304, r.text
            assert r.content == b""
            assert r.headers["etag"] == self.etag
        return r

    def unchanged(self) -> None:
        """Nothing changed: 304. (A live lease's expiry is shown to the second; a read that
        straddles a second boundary may show the next one, a real change of the body.)"""
        answers = [self.poll().status_code for _ in range(3)]
        assert 304 in answers, answers

    def changed(self, check: Callable[[dict[str, Any]], bool] | None = None) -> None:
        r = self.poll()
        assert r.status_code == 200, "a change was missed: 304 after the session changed"
        if check is not None:
            assert check(self.body), self.body


def test_a_poller_sees_every_change_and_nothing_else(http: httpx.Client, owner: str, mad: str):
    sid = create(http, owner, work_in_progress={"step": 1})["id"]
    poller = Poller(http, sid, owner)
    poller.unchanged()

    r = http.patch(
        f"/v1/sessions/{sid}",
        json={"patch": {"work_in_progress": {"step": 2}}},
        headers=headers(owner, **{"If-Match": poller.etag}),
    )
    assert r.status_code == 200, r.text
    poller.changed(lambda b: b["work_in_progress"] == {"step": 2})
    poller.unchanged()

    r = http.post(
        f"/v1/sessions/{sid}/timeline", json={"events": [{"kind": "note"}]}, headers=headers(owner)
    )
    assert r.status_code == 200, r.text
    poller.changed(lambda b: len(b["recent_timeline"]) == 1)
    poller.unchanged()

    join(http, sid, owner, mad)
    poller.changed(lambda b: b["participants"][mad]["active"] is True)
    poller.unchanged()

    time.sleep(LEASE_TTL_S + 0.5)  # the lease lapses: no new version, but the body changes
    poller.changed(lambda b: b["participants"][mad]["active"] is False)
    poller.unchanged()

    join(http, sid, owner, mad)  # a lapsed lease is not renewed: the MAD rejoins (a new grant)
    poller.changed(lambda b: b["participants"][mad]["active"] is True)

    r = http.post(f"/v1/sessions/{sid}/suspend", headers=headers(owner))
    assert r.status_code == 200, r.text
    poller.changed(lambda b: b["state"] == "dormant")
    poller.unchanged()


def test_include_full_has_an_etag_of_its_own(http: httpx.Client, owner: str):
    sid = create(http, owner)["id"]
    plain = Poller(http, sid, owner)
    whole = Poller(http, sid, owner, "?include=full")
    assert plain.etag != whole.etag
    whole.unchanged()
    r = http.patch(
        f"/v1/sessions/{sid}",
        json={"expected_version": 1, "patch": {"full_context": {"doc": "v2"}}},
        headers=headers(owner),
    )
    assert r.status_code == 200, r.text
    whole.changed(lambda b: b["full_context"] == {"doc": "v2"})
    plain.changed(lambda b: b["version"] == 2)


def test_if_none_match_star_and_lists(http: httpx.Client, owner: str):
    sid = create(http, owner)["id"]
    url = f"/v1/sessions/{sid}"
    etag = http.get(url, headers=headers(owner)).headers["etag"]
    for value in ("*", f'"7", {etag}', f"W/{etag}"):  # If-None-Match compares weakly
        r = http.get(url, headers=headers(owner, **{"If-None-Match": value}))
        assert r.status_code == 304, (value, r.text)
    assert http.get(url, headers=headers(owner, **{"If-None-Match": '"7"'})).status_code == 200


def test_head_answers_the_headers_of_a_get(http: httpx.Client, owner: str):
    sid = create(http, owner, work_in_progress={"step": 1})["id"]
    got = http.get(f"/v1/sessions/{sid}", headers=headers(owner))
    head = http.head(f"/v1/sessions/{sid}", headers=headers(owner))
    assert head.status_code == 200
    assert head.content == b""
    assert head.headers["etag"] == got.headers["etag"]
    assert head.headers["content-length"] == str(len(got.content))
    again = http.head(
        f"/v1/sessions/{sid}", headers=headers(owner, **{"If-None-Match": got.headers["etag"]})
    )
    assert again.status_code == 304
    missing = http.head(f"/v1/sessions/{secrets.token_hex(16)}", headers=headers(owner))
    assert (missing.status_code, missing.content) == (404, b"")


# -- one error shape -------------------------------------------------------------------------


def test_a_create_without_a_body_is_a_create_with_defaults(http: httpx.Client, owner: str):
    r = http.post("/v1/sessions", headers=headers(owner))
    assert r.status_code == 201, r.text
    body = r.json()
    assert (body["owner_id"], body["work_in_progress"], body["version"]) == (owner, {}, 1)
    assert r.headers["location"] == f"/v1/sessions/{body['id']}"


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/sessions", {"work_in_progress": 3}, "/work_in_progress"),
        ("/v1/sessions", {"owner_id": 5}, "/owner_id"),
        ("/v1/sessions", {"nope": 1}, "/nope"),
        ("{sid}/timeline", {"events": [{"kind": "ok"}, {"kind": 7}]}, "/events/1/kind"),
        ("{sid}/timeline", {"events": [{"kind": "bad kind!"}]}, "/events/0/kind"),
        (
            "{sid}",
            {"expected_version": "3", "patch": {"work_in_progress": {}}},
            "/expected_version",
        ),
        ("{sid}", {"expected_version": 1, "patch": {"acl": []}}, "/patch/acl"),
        ("{sid}", {"expected_version": 1}, "/patch"),
    ],
)
def test_validation_errors_name_the_field_as_a_json_pointer(
    http: httpx.Client, owner: str, path: str, body: dict[str, Any], field: str
):
    sid = create(http, owner)["id"]
    url = path.replace("{sid}", f"/v1/sessions/{sid}")
    method = "PATCH" if url == f"/v1/sessions/{sid}" else "POST"
    r = http.request(method, url, json=body, headers=headers(owner))
    problem = check_problem(r)
    assert r.status_code == 422, problem
    assert [e["field"] for e in problem["errors"]] == [field], problem


def test_query_and_header_errors_name_the_parameter(http: httpx.Client, owner: str):
    r = http.get("/v1/sessions?limit=0", headers=headers(owner))
    assert [e["field"] for e in check_problem(r)["errors"]] == ["limit"]
    r = http.post("/v1/sessions", headers=headers(owner, **{"Idempotency-Key": "a b"}), json={})
    assert [e["field"] for e in check_problem(r)["errors"]] == ["Idempotency-Key"]
    sid = create(http, owner)["id"]
    r = http.post(f"/v1/sessions/{sid}/suspend", headers=headers(owner, **{"Lease-Token": "x"}))
    assert [e["field"] for e in check_problem(r)["errors"]] == ["Lease-Token"]
    r = http.get("/v1/sessions?order=oldest", headers=headers(owner))
    assert [e["field"] for e in check_problem(r)["errors"]] == ["order"]


def test_the_413_names_the_limit(http: httpx.Client, owner: str):
    r = http.post(
        "/v1/sessions",
        content=b'{"work_in_progress": {"x": "' + b"x" * 1_100_000 + b'"}}',
        headers=headers(owner, **{"Content-Type": "application/json"}),
    )
    problem = check_problem(r)
    assert r.status_code == 413
    assert "1048576 bytes" in problem["detail"], problem


def test_problem_types_resolve_to_their_explanation(served: Served, http: httpx.Client):
    """Each `type` is `/problems#<name>`: the page has that anchor; so does docs/problems.md."""
    seen = {p["type"] for p in served.problems}
    assert {"/problems#precondition-failed", "/problems#invalid-input"} <= seen, seen
    page = http.get("/problems")  # no token needed, like /schema
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    anchors = set(re.findall(r'id="([a-z-]+)"', page.text))
    assert {t.split("#")[1] for t in seen} <= anchors
    assert {t.slug for t in CATALOGUE} <= anchors
    assert DOCS.read_text() == render_markdown() + "\n", (
        "docs/problems.md is stale: python -m sessionmgr.api.problem_types > docs/problems.md"
    )


def test_every_error_this_module_met_had_the_one_shape(served: Served):
    """Runs last in the module: each problem was checked on arrival; here, that there were
    many, of many kinds."""
    statuses = {p["status"] for p in served.problems}
    assert {403, 404, 409, 412, 413, 422} <= statuses, statuses


# -- also ------------------------------------------------------------------------------------


def test_every_answer_carries_the_request_id(http: httpx.Client, owner: str):
    given = http.get("/v1/sessions", headers=headers(owner, **{"X-Request-ID": "req-42"}))
    assert given.headers["x-request-id"] == "req-42"
    trace_id = secrets.token_hex(16)
    parent = f"00-{trace_id}-{secrets.token_hex(8)}-01"
    traced = http.get("/v1/sessions", headers=headers(owner, traceparent=parent))
    assert traced.headers["x-request-id"] == trace_id
    for answer in (
        http.get("/v1/sessions"),  # 401
        http.get(f"/v1/sessions/{secrets.token_hex(16)}", headers=headers(owner)),  # 404
        http.get("/health/live"),
    ):
        assert re.fullmatch(r"[0-9a-f]{32}", answer.headers["x-request-id"]), answer.headers


def test_removing_an_absent_participant_is_404(http: httpx.Client, owner: str, mad: str):
    sid = create(http, owner)["id"]
    r = http.delete(f"/v1/sessions/{sid}/participants/{mad}", headers=headers(owner))
    assert check_problem(r)["status"] == 404
    join(http, sid, owner, mad)
    assert (
        http.delete(f"/v1/sessions/{sid}/participants/{mad}", headers=headers(owner)).status_code
        == 204
    )
    assert (
        http.delete(f"/v1/sessions/{sid}/participants/{mad}", headers=headers(owner)).status_code
        == 404
    )


def test_the_archive_answer_is_the_stub_and_says_how_to_get_the_body(
    http: httpx.Client, owner: str
):
    sid = create(http, owner, work_in_progress={"step": 7})["id"]
    r = http.post(f"/v1/sessions/{sid}/archive", headers=headers(owner))
    assert r.status_code == 200, r.text
    stub = r.json()
    assert stub["state"] == "archived"
    assert stub["body_archived"] is True
    assert f"GET /v1/sessions/{sid}" in stub["restore"]
    assert set(stub["archive"]) == {"key", "sha256", "size", "archived_at"}
    assert stub["archive"]["size"] > 0 and len(stub["archive"]["sha256"]) == 64
    assert "work_in_progress" not in stub and "participants" not in stub  # no empty look-alikes
    back = http.get(f"/v1/sessions/{sid}", headers=headers(owner))
    assert back.json()["work_in_progress"] == {"step": 7}


def test_lists_by_recency_walk_each_unchanged_session_once(http: httpx.Client, owner: str):
    ids = []
    for n in range(4):
        ids.append(create(http, owner, work_in_progress={"n": n})["id"])
        time.sleep(0.005)  # distinct last_active, so the expected order is the creation order
    newest_first = ids[::-1]

    def walk(changing: str | None = None) -> list[str]:
        seen: list[str] = []
        cursor = None
        while True:
            params = {"order": "recent", "limit": 1, **({"cursor": cursor} if cursor else {})}
            page = http.get("/v1/sessions", params=params, headers=headers(owner))
            assert page.status_code == 200, page.text
            seen += [item["id"] for item in page.json()["items"]]
            if changing and len(seen) == 1:  # a session not seen yet becomes the most recent
                r = http.patch(
                    f"/v1/sessions/{changing}",
                    json={"patch": {"work_in_progress": {"n": "again"}}},
                    headers=headers(owner, **{"If-Match": "*"}),
                )
                assert r.status_code == 200, r.text
            cursor = page.json()["next_cursor"]
            if not cursor:
                return seen

    assert walk() == newest_first
    oldest = ids[0]
    during = walk(changing=oldest)
    assert len(during) == len(set(during)), f"a session was listed twice: {during}"
    assert [i for i in during if i != oldest] == newest_first[:-1], "an unchanged one was lost"
    deadline = time.monotonic() + 10  # MongoDB learns last_active from the write-behind
    while walk()[0] != oldest:
        assert time.monotonic() < deadline, "the changed session never came to the front"
        time.sleep(0.1)
    assert walk() == [oldest, *newest_first[:-1]]


def test_a_cursor_of_another_order_is_refused(http: httpx.Client, owner: str):
    for _ in range(2):
        create(http, owner)
    by_id = http.get("/v1/sessions", params={"limit": 1}, headers=headers(owner)).json()
    r = http.get(
        "/v1/sessions",
        params={"order": "recent", "cursor": by_id["next_cursor"]},
        headers=headers(owner),
    )
    assert [e["field"] for e in check_problem(r)["errors"]] == ["cursor"]
