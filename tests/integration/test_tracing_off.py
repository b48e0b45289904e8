"""Tracing off (the default): no span is made, yet a request's log lines carry a trace id."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import httpx
import pytest

from sessionmgr.api.bridge import resolve
from sessionmgr.container import Container
from sessionmgr.services.resilience import Guarded
from sessionmgr.telemetry import records
from tests.integration.session_api import create_session
from tests.support.logs import JsonLines, captured_lines
from tests.support.redis_server import RedisServer

Headers = Callable[..., dict[str, str]]


@pytest.fixture
def lines() -> Iterator[JsonLines]:
    with captured_lines() as handler:
        yield handler


async def _a_503(api: httpx.AsyncClient, headers: dict[str, str], sid: str) -> None:
    r = await api.patch(
        f"/v1/sessions/{sid}",
        json={"expected_version": 1, "patch": {"work_in_progress": {"a": 1}}},
        headers=headers,
    )
    assert r.status_code == 503


async def test_the_stores_are_not_wrapped_in_spans(
    api: httpx.AsyncClient, app_container: Container
) -> None:
    assert not records(app_container.tracer())
    assert type(await resolve(app_container.traced_hot)) is Guarded


async def test_a_503_log_line_has_a_fresh_trace_id_per_request(
    api: httpx.AsyncClient, auth: Headers, redis_server: RedisServer, lines: JsonLines
) -> None:
    sid = (await create_session(api, auth()))["id"]
    redis_server.stop()
    await _a_503(api, auth(), sid)
    await _a_503(api, auth(), sid)

    found = [entry for entry in lines.lines if "answered 503" in entry["msg"]]
    assert len(found) == 2
    assert all(len(e["trace_id"]) == 32 and int(e["trace_id"], 16) for e in found)
    assert found[0]["trace_id"] != found[1]["trace_id"]


async def test_a_503_log_line_continues_the_callers_trace(
    api: httpx.AsyncClient, auth: Headers, redis_server: RedisServer, lines: JsonLines
) -> None:
    sid = (await create_session(api, auth()))["id"]
    redis_server.stop()
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    await _a_503(api, auth(traceparent=f"00-{trace_id}-{parent_id}-01"), sid)

    [line] = [entry for entry in lines.lines if "answered 503" in entry["msg"]]
    assert line["trace_id"] == trace_id
    assert line["span_id"] != parent_id
