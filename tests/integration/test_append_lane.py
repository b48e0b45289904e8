"""The append lane (sessionmgr/api/append_lane.py): a plain append by a token already verified
is answered in front of Litestar's request cycle, with the cycle's own answer; every other
append, and every append the lane cannot answer, goes the whole way, verified, charged,
counted and appended at most once."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import msgspec
import pytest

from sessionmgr.api import append_lane, lane
from sessionmgr.container import Container, build_container
from sessionmgr.domain.errors import BackendUnavailable
from sessionmgr.settings import Settings
from tests.integration.conftest import serving
from tests.integration.session_api import comparable, create_session

Headers = Callable[..., dict[str, str]]
# The whole way: a media type the lane leaves to the cycle, which takes it as JSON.
WHOLE_WAY = {"Content-Type": "application/json; charset=utf-8"}
JSON = {"Content-Type": "application/json"}
REQUESTS = "sessionmgr_http_requests_total"
ROUTE = "/v1/sessions/{session_id}/timeline"
EVENTS = {"events": [{"kind": "note", "data": {"text": "hello"}}]}


@pytest.fixture
def lane_answers(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The answers the lane gave itself."""
    answered: list[bytes] = []
    encode = append_lane._encode

    def counted(result: Any) -> bytes:
        body = encode(result)
        answered.append(body)
        return body

    monkeypatch.setattr(append_lane, "_encode", counted)
    return answered


async def _events(api: httpx.AsyncClient, headers: dict[str, str], sid: str) -> list[Any]:
    page = await api.get(f"/v1/sessions/{sid}/timeline", headers=headers)
    assert page.status_code == 200, page.text
    return page.json()["items"]  # type: ignore[no-any-return]


def sample(container: Container, name: str, **labels: str) -> float:
    return container.metrics().registry.get_sample_value(name, labels) or 0.0


async def test_a_plain_append_with_a_known_token_is_the_lanes_with_the_cyclescomparable(
    auth: Headers, api: httpx.AsyncClient, lane_answers: list[bytes]
) -> None:
    owner = auth()
    by_lane_sid = (await create_session(api, owner, work_in_progress={"step": 1}))["id"]
    whole_way_sid = (await create_session(api, owner, work_in_progress={"step": 1}))["id"]

    body = {**EVENTS, "expected_version": 1}
    by_lane = await api.post(f"/v1/sessions/{by_lane_sid}/timeline", json=body, headers=owner)
    whole_way = await api.post(
        f"/v1/sessions/{whole_way_sid}/timeline", json=body, headers={**owner, **WHOLE_WAY}
    )

    assert by_lane.status_code == 200, by_lane.text
    assert by_lane.json() == {"version": 2, "appended": 1, "first_seq": 1, "last_seq": 1}
    assert comparable(by_lane) == comparable(whole_way)
    assert len(by_lane.headers["x-request-id"]) == 32
    assert lane_answers == [by_lane.content]
    events = await _events(api, owner, by_lane_sid)
    assert [(e["seq"], e["actor"], e["data"]) for e in events] == [(1, "alice", {"text": "hello"})]


@pytest.mark.parametrize("first", ["lane", "whole way"])
async def test_a_keyed_append_retried_either_way_is_appended_once_and_replayed(
    auth: Headers, api: httpx.AsyncClient, lane_answers: list[bytes], first: str
) -> None:
    """The lane's fingerprint of a request is the cycle's: a retry with the same key and body
    is the first answer again (Idempotent-Replayed), whichever way each of them went."""
    owner = auth()
    sid = (await create_session(api, owner))["id"]
    keyed = {**owner, "Idempotency-Key": "append-1"}
    ways = [keyed, {**keyed, **WHOLE_WAY}]
    if first != "lane":
        ways.reverse()
    url = f"/v1/sessions/{sid}/timeline"
    original = await api.post(url, json=EVENTS, headers=ways[0])
    retried = await api.post(url, json=EVENTS, headers=ways[1])
    assert original.status_code == 200, original.text
    assert "idempotent-replayed" not in original.headers
    assert retried.status_code == 200, retried.text
    assert retried.headers["idempotent-replayed"] == "true"
    assert retried.content == original.content
    assert len(await _events(api, owner, sid)) == 1
    assert len(lane_answers) == 1  # the lane answered its own request, first or replayed

    again = await api.post(url, json=EVENTS, headers=keyed)  # by the lane: a replay too
    assert comparable(again) == comparable(retried)
    other_body = await api.post(url, json={"events": [{"kind": "other"}]}, headers=keyed)
    assert other_body.status_code == 422, other_body.text  # the key is this request's
    assert len(await _events(api, owner, sid)) == 1


async def test_if_match_and_lease_token_are_read_as_the_cycle_reads_them(
    auth: Headers, api: httpx.AsyncClient, lane_answers: list[bytes]
) -> None:
    owner = auth()
    mad = auth("mad:planner")
    sid = (await create_session(api, owner))["id"]
    url = f"/v1/sessions/{sid}/timeline"
    joined = await api.post(
        f"/v1/sessions/{sid}/participants", json={"mad_name": "planner"}, headers=owner
    )
    assert joined.status_code == 200, joined.text
    token = str(joined.json()["participants"]["planner"]["token"])
    version = joined.json()["version"]
    assert (await api.get(f"/v1/sessions/{sid}", headers=mad)).status_code == 200  # verified

    answers = []
    for way in ({}, WHOLE_WAY):
        stale = await api.post(url, json=EVENTS, headers={**owner, **way, "If-Match": '"1"'})
        fenced = await api.post(url, json=EVENTS, headers={**mad, **way, "Lease-Token": "999"})
        bad_token = await api.post(url, json=EVENTS, headers={**mad, **way, "Lease-Token": "x"})
        answers.append([comparable(a) for a in (stale, fenced, bad_token)])
    assert [a[0] for a in answers[0]] == [412, 409, 422]
    assert answers[0] == answers[1]
    assert lane_answers == []

    current = await api.post(
        url, json=EVENTS, headers={**mad, "If-Match": f'"{version}"', "Lease-Token": token}
    )
    assert current.status_code == 200, current.text
    assert lane_answers == [current.content]
    assert [e["actor"] for e in await _events(api, owner, sid)] == ["mad:planner"]


@pytest.mark.parametrize(
    "content",
    [
        b"{",  # not JSON
        b'{"events": [], "extra": 1}',  # a field the body does not have
        b'{"events": [{"kind": 3}]}',  # a wrong type
        b'{"events": [{"kind": "a"}], "expected_version": "2"}',  # "2" is no integer
        b'{"events": []}',  # nothing to append
        b'{"events": [{"kind": "a", "data": {"x": ' + b"[" * 5000 + b"]" * 5000 + b"}}]}",  # deep
        b"",
    ],
)
async def test_a_body_the_handler_refuses_is_the_cycles_answer_and_appends_nothing(
    auth: Headers, api: httpx.AsyncClient, lane_answers: list[bytes], content: bytes
) -> None:
    owner = auth()
    sid = (await create_session(api, owner))["id"]
    url = f"/v1/sessions/{sid}/timeline"
    json_body = {**owner, "Content-Type": "application/json"}
    by_lane = await api.post(url, content=content, headers=json_body)
    whole_way = await api.post(url, content=content, headers={**owner, **WHOLE_WAY})
    assert 400 <= by_lane.status_code < 500, by_lane.text
    assert by_lane.headers["content-type"] == "application/problem+json"
    assert comparable(by_lane) == comparable(whole_way)
    assert await _events(api, owner, sid) == []
    assert lane_answers == []


async def test_a_body_over_the_limit_is_the_cycles_413_unread(
    auth: Headers, settings: Settings, lane_answers: list[bytes]
) -> None:
    owner = auth()
    small = msgspec.structs.replace(settings, max_body_bytes=2048)
    async with serving(build_container(small)) as http:
        sid = (await create_session(http, owner))["id"]
        big = {"events": [{"kind": "note", "data": {"text": "x" * 4096}}]}
        answer = await http.post(f"/v1/sessions/{sid}/timeline", json=big, headers=owner)
        assert answer.status_code == 413, answer.text
        assert await _events(http, owner, sid) == []
    assert lane_answers == []


async def test_an_append_the_service_refuses_is_handed_over_once_under_the_lanes_trace_id(
    auth: Headers, api: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    owner = auth()
    sid = (await create_session(api, owner))["id"]
    spans: list[str] = []
    log_span = lane._log_span

    def noted(scope: Any) -> Any:
        span = log_span(scope)
        spans.append(f"{span.get_span_context().trace_id:032x}")
        return span

    monkeypatch.setattr(lane, "_log_span", noted)
    missing = await api.post(f"/v1/sessions/{'0' * 32}/timeline", json=EVENTS, headers=owner)
    whole_way = await api.post(
        f"/v1/sessions/{'0' * 32}/timeline", json=EVENTS, headers={**owner, **WHOLE_WAY}
    )
    assert missing.status_code == 404
    assert comparable(missing) == comparable(whole_way)
    assert spans == [missing.headers["x-request-id"]]
    bob = auth("bob")
    refused = await api.post(f"/v1/sessions/{sid}/timeline", json=EVENTS, headers=bob)
    assert refused.status_code == 403  # bob's token was seen first here: the whole way
    again = await api.post(f"/v1/sessions/{sid}/timeline", json=EVENTS, headers=bob)
    assert comparable(again) == comparable(refused)  # the lane's, handed over
    assert len(spans) == 2
    assert await _events(api, owner, sid) == []


async def test_a_backend_failure_handed_over_is_one_503_appended_at_most_once(
    auth: Headers,
    api: httpx.AsyncClient,
    app_container: Container,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The outcome is unknown (the commit may have applied): the cycle answers the lane's
    error, it must not append again."""
    owner = auth()
    sid = (await create_session(api, owner))["id"]
    service = type(await app_container.sessions())
    append = service.append
    calls: list[str] = []

    async def applied_then_lost(
        self: Any, principal: Any, session_id: str, *a: Any, **kw: Any
    ) -> Any:
        calls.append(session_id)
        await append(self, principal, session_id, *a, **kw)
        raise BackendUnavailable("redis", "the reply was lost", retryable=False)

    monkeypatch.setattr(service, "append", applied_then_lost)
    with caplog.at_level(logging.WARNING, logger="sessionmgr.api.problems"):
        answer = await api.post(f"/v1/sessions/{sid}/timeline", json=EVENTS, headers=owner)
    assert answer.status_code == 503, answer.text
    assert answer.headers["content-type"] == "application/problem+json"
    assert answer.json()["backend"] == "redis"
    assert calls == [sid]
    monkeypatch.setattr(service, "append", append)
    assert len(await _events(api, owner, sid)) == 1
    logged = [r for r in caplog.records if r.name == "sessionmgr.api.problems"]
    assert len(logged) == 1, caplog.text


async def test_the_lane_spends_one_request_of_the_budget_per_append_answered_or_refused(
    auth: Headers, limited_api: httpx.AsyncClient, limited: Container, lane_answers: list[bytes]
) -> None:
    owner = auth()
    sid = (await create_session(limited_api, owner))["id"]  # 1: verified, charged
    url = f"/v1/sessions/{sid}/timeline"
    assert (await limited_api.post(url, json=EVENTS, headers=owner)).status_code == 200  # 2
    bad = await limited_api.post(url, content=b"{", headers={**owner, **JSON})
    assert bad.status_code == 400  # 3: read by the lane, handed on uncharged, charged there
    missing = f"/v1/sessions/{'0' * 32}/timeline"
    assert (await limited_api.post(missing, json=EVENTS, headers=owner)).status_code == 404  # 4
    assert (await limited_api.post(url, json=EVENTS, headers=owner)).status_code == 200  # 5
    assert len(lane_answers) == 2

    refused = await limited_api.post(url, json=EVENTS, headers=owner)
    assert refused.status_code == 429
    assert refused.headers["retry-after"]
    assert sample(limited, "sessionmgr_rate_limited_requests_total") == 1  # the cycle's count
    assert len(lane_answers) == 2
    assert len(await _events(limited_api, auth("root", ("admin",)), sid)) == 2  # its budget


async def test_each_append_is_counted_once_under_the_routes_template(
    auth: Headers, api: httpx.AsyncClient, app_container: Container, lane_answers: list[bytes]
) -> None:
    owner = auth()
    sid = (await create_session(api, owner))["id"]
    for _ in range(3):
        answer = await api.post(f"/v1/sessions/{sid}/timeline", json=EVENTS, headers=owner)
        assert answer.status_code == 200
    missing = f"/v1/sessions/{'0' * 32}/timeline"
    assert (await api.post(missing, json=EVENTS, headers=owner)).status_code == 404
    for status, count in (("200", 3), ("404", 1)):
        counted = sample(app_container, REQUESTS, route=ROUTE, method="POST", status=status)
        assert counted == count, status
    assert len(lane_answers) == 3


def _raw_post(
    app: Any, path: str, headers: list[tuple[bytes, bytes]], parts: list[dict[str, Any]]
) -> Any:
    """POST `path` straight to the ASGI `app`, its body in `parts` as a server hands it over
    (after them, a client that sends nothing more); the messages the app sent."""
    sent: list[dict[str, Any]] = []
    queue = list(parts)

    async def receive() -> dict[str, Any]:
        if queue:
            part = queue.pop(0)
            await asyncio.sleep(part.pop("after_s", 0))
            return part
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"test"), *headers],
        "client": ("127.0.0.1", 5555),
        "server": ("127.0.0.1", 8080),
        "state": {},
    }

    async def run() -> list[dict[str, Any]]:
        await asyncio.wait_for(app(scope, receive, send), 10)
        return sent

    return run()


def _parts(*chunks: bytes) -> list[dict[str, Any]]:
    return [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
        for i, c in enumerate(chunks)
    ]


async def test_a_body_sent_in_many_parts_is_read_whole(
    auth: Headers, api: httpx.AsyncClient, lane_answers: list[bytes]
) -> None:
    """As an HTTP server hands a body over in pieces; and a client gone before its body's end
    is never appended (the whole way sees it leave)."""
    owner = auth()
    sid = (await create_session(api, owner))["id"]
    body = msgspec.json.encode(EVENTS)
    app = api._transport.app  # type: ignore[attr-defined]
    headers = [
        (b"authorization", owner["Authorization"].encode()),
        (b"content-type", b"application/json"),
        (b"content-length", b"%d" % len(body)),
    ]
    path = f"/v1/sessions/{sid}/timeline"
    sent = await _raw_post(app, path, headers, _parts(body[:5], body[5:20], body[20:]))
    assert sent[0]["status"] == 200
    assert len(lane_answers) == 1
    # All of it, but "more to come", then gone: neither the lane nor the cycle appends it.
    whole_then_gone = [
        {"type": "http.request", "body": body, "more_body": True},
        {"type": "http.disconnect"},
    ]
    gone = await _raw_post(app, path, headers, whole_then_gone)
    assert all(m.get("status") != 200 for m in gone), gone
    assert len(lane_answers) == 1
    assert len(await _events(api, owner, sid)) == 1


@pytest.mark.parametrize("length", [b"0" * 4400 + b"5", "\u00b2".encode("latin-1"), b"-1"])
async def test_a_content_length_no_integer_is_the_cyclescomparable(
    auth: Headers, api: httpx.AsyncClient, lane_answers: list[bytes], length: bytes
) -> None:
    """What a lenient server lets through (httptools takes 4 400 digits) is not the lane's."""
    owner = auth()
    sid = (await create_session(api, owner))["id"]
    app = api._transport.app  # type: ignore[attr-defined]
    body = msgspec.json.encode(EVENTS)
    answers = []
    for media_type in (b"application/json", b"application/json; charset=utf-8"):
        headers = [
            (b"authorization", owner["Authorization"].encode()),
            (b"content-type", media_type),
            (b"content-length", length),
        ]
        sent = await _raw_post(app, f"/v1/sessions/{sid}/timeline", headers, _parts(body))
        start = sent[0]
        answers.append((start["status"], dict(start["headers"])[b"content-type"]))
    assert answers[0] == answers[1]  # the cycle's, both (the bodies differ: each may append)
    assert lane_answers == []


async def test_a_refused_body_is_timed_from_when_the_lane_took_it(
    auth: Headers, api: httpx.AsyncClient, app_container: Container
) -> None:
    """Its upload counts, as it does for a request the cycle takes from the start."""
    owner = auth()
    sid = (await create_session(api, owner))["id"]
    app = api._transport.app  # type: ignore[attr-defined]
    body = b'{"events": [{"kind": 3}]}'
    headers = [
        (b"authorization", owner["Authorization"].encode()),
        (b"content-type", b"application/json"),
        (b"content-length", b"%d" % len(body)),
    ]
    parts = _parts(body[:10], body[10:])
    parts[1]["after_s"] = 0.5
    sent = await _raw_post(app, f"/v1/sessions/{sid}/timeline", headers, parts)
    assert sent[0]["status"] == 422
    took = app_container.metrics().registry.get_sample_value(
        "sessionmgr_http_request_duration_seconds_sum", {"route": ROUTE, "method": "POST"}
    )
    assert took is not None and took >= 0.5


@pytest.mark.parametrize(
    "extra",
    [
        [("Idempotency-Key", "k1"), ("Idempotency-Key", "k2")],
        [("Lease-Token", "1"), ("Lease-Token", "2")],
        [("Expect", "100-continue")],
        [("Host", "a b")],
    ],
    ids=["two keys", "two lease tokens", "expect", "bad host"],
)
async def test_an_append_with_headers_the_lane_does_not_read_goes_the_whole_way(
    auth: Headers, api: httpx.AsyncClient, lane_answers: list[bytes], extra: list[Any]
) -> None:
    owner = auth()
    sid = (await create_session(api, owner))["id"]
    url = f"/v1/sessions/{sid}/timeline"
    headers = httpx.Headers([*owner.items(), *extra])
    by_lane_shape = await api.post(url, json=EVENTS, headers=headers)
    whole_way = await api.post(
        url, json=EVENTS, headers=httpx.Headers([*owner.items(), *WHOLE_WAY.items(), *extra])
    )
    assert comparable(by_lane_shape)[0] == comparable(whole_way)[0]
    assert lane_answers == []


async def test_a_chunked_append_goes_the_whole_way(
    auth: Headers, api: httpx.AsyncClient, lane_answers: list[bytes]
) -> None:
    owner = auth()
    sid = (await create_session(api, owner))["id"]

    async def chunks() -> AsyncIterator[bytes]:
        yield msgspec.json.encode(EVENTS)

    answer = await api.post(
        f"/v1/sessions/{sid}/timeline", content=chunks(), headers={**owner, **JSON}
    )
    assert answer.status_code == 200, answer.text
    assert lane_answers == []
    assert len(await _events(api, owner, sid)) == 1


def test_an_error_handed_over_is_raised_for_that_request_only() -> None:
    scope: dict[str, Any] = {"state": {}}
    failed = BackendUnavailable("redis", "down")
    scope["state"][lane.FAILED] = (scope, failed)
    inner = {"state": dict(scope["state"])}  # a request made inside the app from its state
    assert lane.handed_over_error(inner) is None  # type: ignore[arg-type]
    assert lane.handed_over_error(scope) is failed  # type: ignore[arg-type]
    assert lane.handed_over_error(scope) is None  # type: ignore[arg-type]  # taken out
