"""The read lane (sessionmgr/api/lane.py): a plain read of a session by a token already
verified is answered in front of Litestar's request cycle, with the cycle's own answer; every
other request, and every read the lane cannot answer, goes the whole way, verified, charged
and counted once."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import httpx
import msgspec
import pytest

from sessionmgr.api import lane
from sessionmgr.container import Container, build_container
from sessionmgr.domain.errors import BackendUnavailable, SessionNotFound
from sessionmgr.settings import Settings
from tests.integration.conftest import serving
from tests.integration.session_api import comparable, create_session

Headers = Callable[..., dict[str, str]]
NO_MATCH = {"If-None-Match": '"no-such-tag"'}  # the whole way: a tag no session has
REQUESTS = "sessionmgr_http_requests_total"
ROUTE = "/v1/sessions/{session_id}"


@pytest.fixture
def lane_answers(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The session ids the lane answered itself."""
    answered: list[str] = []
    answer = lane.session_answer

    def counted(session: Any, *args: Any) -> Any:
        answered.append(session.id)
        return answer(session, *args)

    monkeypatch.setattr(lane, "session_answer", counted)
    return answered


@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_a_plain_read_with_a_known_token_is_the_lanes_with_the_cyclescomparable(
    auth: Headers, api: httpx.AsyncClient, lane_answers: list[str], method: str
) -> None:
    owner = auth()
    sid = (await create_session(api, owner, work_in_progress={"step": 1}))["id"]
    joined = await api.post(
        f"/v1/sessions/{sid}/participants", json={"mad_name": "planner"}, headers=owner
    )
    assert joined.status_code == 200  # a lease: the answer and ETag carry its expiry

    by_lane = await api.request(method, f"/v1/sessions/{sid}", headers=owner)
    whole_way = await api.request(method, f"/v1/sessions/{sid}", headers={**owner, **NO_MATCH})

    assert lane_answers == [sid]
    assert by_lane.status_code == 200
    assert comparable(by_lane) == comparable(whole_way)
    assert len(by_lane.headers["x-request-id"]) == 32


async def test_a_token_seen_first_goes_the_whole_way_then_the_lane(
    auth: Headers, api: httpx.AsyncClient, lane_answers: list[str]
) -> None:
    sid = (await create_session(api, auth()))["id"]
    first_use = auth("bob")  # bob is no reader: the cycle refuses him, and learns his token

    refused = await api.get(f"/v1/sessions/{sid}", headers=first_use)
    assert refused.status_code == 403
    again = await api.get(f"/v1/sessions/{sid}", headers=first_use)
    assert again.status_code == 403
    assert comparable(again) == comparable(refused)
    assert lane_answers == []  # an answer the lane cannot give is never the lane's

    fresh = auth("alice", ("admin",))
    assert (await api.get(f"/v1/sessions/{sid}", headers=fresh)).status_code == 200
    assert lane_answers == []  # verified the whole way the first time
    assert (await api.get(f"/v1/sessions/{sid}", headers=fresh)).status_code == 200
    assert lane_answers == [sid]


@pytest.mark.parametrize(
    "headers",
    [
        {},  # no token
        {"Authorization": "Bearer not-a-jwt"},
        {"Authorization": "Basic YWxpY2U6cHc="},
    ],
)
async def test_a_read_with_no_good_token_is_refused_the_whole_way(
    auth: Headers, api: httpx.AsyncClient, lane_answers: list[str], headers: dict[str, str]
) -> None:
    sid = (await create_session(api, auth()))["id"]
    refused = await api.get(f"/v1/sessions/{sid}", headers=headers)
    assert refused.status_code == 401
    assert refused.headers["content-type"] == "application/problem+json"
    assert lane_answers == []


async def test_two_authorization_headers_are_the_cycles_400(
    auth: Headers, api: httpx.AsyncClient
) -> None:
    owner = auth()
    sid = (await create_session(api, owner))["id"]
    twice = httpx.Headers([("authorization", owner["Authorization"])] * 2)
    answer = await api.get(f"/v1/sessions/{sid}", headers=twice)
    assert answer.status_code == 400


def sample(container: Container, name: str, **labels: str) -> float:
    return container.metrics().registry.get_sample_value(name, labels) or 0.0


async def test_the_lane_spends_one_request_of_the_budget_per_read_answered_or_refused(
    auth: Headers, limited_api: httpx.AsyncClient, limited: Container, lane_answers: list[str]
) -> None:
    owner = auth()
    sid = (await create_session(limited_api, owner))["id"]  # 1: verified, charged
    assert (await limited_api.get(f"/v1/sessions/{sid}", headers=owner)).status_code == 200
    missing = f"/v1/sessions/{'0' * 32}"
    # 3, 4: the lane admits them, then hands the 404 over; handed over, nothing is spent again.
    for _ in range(2):
        assert (await limited_api.get(missing, headers=owner)).status_code == 404
    assert (await limited_api.get(f"/v1/sessions/{sid}", headers=owner)).status_code == 200  # 5
    assert lane_answers == [sid, sid]

    refused = await limited_api.get(f"/v1/sessions/{sid}", headers=owner)
    assert refused.status_code == 429
    assert refused.headers["retry-after"]
    assert (
        sample(limited, "sessionmgr_rate_limited_requests_total") == 1
    )  # counted once, the cycle's
    assert lane_answers == [sid, sid]


async def test_each_read_is_counted_once_under_the_routes_template(
    auth: Headers, api: httpx.AsyncClient, app_container: Container, lane_answers: list[str]
) -> None:
    owner = auth()
    sid = (await create_session(api, owner))["id"]
    for _ in range(3):
        assert (await api.get(f"/v1/sessions/{sid}", headers=owner)).status_code == 200
    assert (await api.get(f"/v1/sessions/{'0' * 32}", headers=owner)).status_code == 404
    assert (await api.head(f"/v1/sessions/{sid}", headers=owner)).status_code == 200

    for method, status, count in (("GET", "200", 3), ("GET", "404", 1), ("HEAD", "200", 1)):
        counted = sample(app_container, REQUESTS, route=ROUTE, method=method, status=status)
        assert counted == count, (method, status)
    assert lane_answers == [sid] * 4


async def test_a_read_handed_over_answers_under_the_lanes_trace_id(
    auth: Headers, api: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch, lane_answers: list[str]
) -> None:
    """Its log lines (written under the lane's span) and its X-Request-ID name one request."""
    owner = auth()
    await create_session(api, owner)
    spans: list[str] = []
    log_span = lane._log_span

    def noted(scope: Any) -> Any:
        span = log_span(scope)
        spans.append(f"{span.get_span_context().trace_id:032x}")
        return span

    monkeypatch.setattr(lane, "_log_span", noted)
    missing = await api.get(f"/v1/sessions/{'0' * 32}", headers=owner)
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/problem+json"
    assert spans == [missing.headers["x-request-id"]]
    given = await api.get(f"/v1/sessions/{'0' * 32}", headers={**owner, "X-Request-ID": "mine"})
    assert given.headers["x-request-id"] == "mine"
    assert lane_answers == []


async def test_a_read_with_a_host_the_router_refuses_is_its_400_uncharged_and_unread(
    auth: Headers, limited_api: httpx.AsyncClient, limited: Container, lane_answers: list[str]
) -> None:
    owner = auth()
    sid = (await create_session(limited_api, owner))["id"]  # 1 of 5
    for _ in range(6):
        bad_host = await limited_api.get(f"/v1/sessions/{sid}", headers={**owner, "Host": "a b"})
        assert bad_host.status_code == 400
    for _ in range(4):  # 2-5: the six refusals spent nothing
        assert (await limited_api.get(f"/v1/sessions/{sid}", headers=owner)).status_code == 200
    assert lane_answers == [sid] * 4


async def test_a_handed_over_read_is_timed_from_when_the_lane_took_it(
    auth: Headers,
    api: httpx.AsyncClient,
    app_container: Container,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    owner = auth()
    sid = (await create_session(api, owner))["id"]
    service = type(await app_container.sessions())
    get = service.get
    slow: list[bool] = [True]

    async def slow_failure(self: Any, principal: Any, session_id: str, **kw: Any) -> Any:
        if slow[0]:
            slow[0] = False  # only the lane's call: the cycle does not read again
            await asyncio.sleep(0.3)
            raise SessionNotFound(session_id)
        return await get(self, principal, session_id, **kw)

    monkeypatch.setattr(service, "get", slow_failure)
    assert (await api.get(f"/v1/sessions/{sid}", headers=owner)).status_code == 404
    labels = {"route": ROUTE, "method": "GET"}
    took = app_container.metrics().registry.get_sample_value(
        "sessionmgr_http_request_duration_seconds_sum", labels
    )
    assert took is not None and took >= 0.3


async def test_a_principal_handed_over_is_trusted_for_that_request_only(
    api: httpx.AsyncClient,
) -> None:
    scope: dict[str, Any] = {"state": {}}
    scope["state"][lane.ADMITTED] = (scope, "alice")
    assert lane.admitted(scope) == "alice"  # type: ignore[arg-type]
    inner = {"state": dict(scope["state"])}  # a request made inside the app from its state
    assert lane.admitted(inner) is None  # type: ignore[arg-type]


async def test_a_head_of_a_missing_session_is_the_cycles_404_without_a_body(
    auth: Headers, api: httpx.AsyncClient, lane_answers: list[str]
) -> None:
    owner = auth()
    await create_session(api, owner)
    path = f"/v1/sessions/{'0' * 32}"
    handed_over = await api.head(path, headers=owner)
    whole_way = await api.head(path, headers={**owner, **NO_MATCH})
    assert handed_over.status_code == 404
    assert handed_over.content == b""
    assert comparable(handed_over) == comparable(whole_way)
    assert lane_answers == []


async def test_a_backend_failure_handed_over_is_one_503_read_once_and_logged_once(
    auth: Headers,
    api: httpx.AsyncClient,
    app_container: Container,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    owner = auth()
    sid = (await create_session(api, owner))["id"]
    service = type(await app_container.sessions())
    reads: list[str] = []

    async def down(self: Any, principal: Any, session_id: str, **kw: Any) -> Any:
        reads.append(session_id)
        raise BackendUnavailable("redis", "the read timed out")

    monkeypatch.setattr(service, "get", down)
    with caplog.at_level(logging.WARNING, logger="sessionmgr.api.problems"):
        answer = await api.get(f"/v1/sessions/{sid}", headers=owner)
    assert answer.status_code == 503, answer.text
    assert answer.headers["content-type"] == "application/problem+json"
    assert answer.headers["retry-after"]
    assert answer.json()["backend"] == "redis"
    assert reads == [sid]  # the lane's read: the cycle raises its error, it does not read again
    logged = [r for r in caplog.records if r.name == "sessionmgr.api.problems"]
    assert len(logged) == 1, caplog.text
    assert "503" in logged[0].getMessage() and sid in logged[0].getMessage()


async def test_a_service_callers_reads_in_the_lane_spend_the_service_budget(
    auth: Headers, settings: Settings, lane_answers: list[str]
) -> None:
    """Two requests for a person, six for a caller with role `service`; none refills."""
    budgets = msgspec.structs.replace(
        settings,
        rate_limit_per_s=0.01,
        rate_limit_burst=2,
        rate_limit_service_per_s=0.01,
        rate_limit_service_burst=6,
    )
    mad = auth("planner", ("service",))
    async with serving(build_container(budgets)) as http:
        sid = (await create_session(http, mad))["id"]  # 1 of 6: verified, charged
        for _ in range(5):  # 2-6, each the lane's
            assert (await http.get(f"/v1/sessions/{sid}", headers=mad)).status_code == 200
        assert (await http.get(f"/v1/sessions/{sid}", headers=mad)).status_code == 429
    assert lane_answers == [sid] * 5
