"""Tracing through the app: a server span per request, a client span per backend call."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import httpx
import pytest
from dependency_injector import providers
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from redis.asyncio import Redis

from sessionmgr.container import Container, build_container
from sessionmgr.settings import Settings
from sessionmgr.storage.warm import MongoWarmStore
from tests.integration.session_api import create_session, eventually, get_session
from tests.support.logs import captured_lines
from tests.support.redis_server import RedisServer

Headers = Callable[..., dict[str, str]]
ROUTE = "/v1/sessions/{session_id}"


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    yield exporter
    exporter.shutdown()


def _recording(container: Container, exporter: InMemorySpanExporter) -> Container:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    container.tracer_provider.override(providers.Object(provider))
    return container


@pytest.fixture
def app_container(settings: Settings, exporter: InMemorySpanExporter) -> Container:
    # No write-behind worker: its spans would interleave with the request's.
    return _recording(build_container(settings, write_behind=False), exporter)


def request_span(spans: Sequence[ReadableSpan], name: str) -> ReadableSpan:
    found = [s for s in spans if s.name == name and s.kind is SpanKind.SERVER]
    assert len(found) == 1, [s.name for s in spans]
    return found[0]


def children(spans: Sequence[ReadableSpan], parent: ReadableSpan) -> list[ReadableSpan]:
    assert parent.context is not None
    return [
        s
        for s in spans
        if s.parent is not None
        and s.parent.span_id == parent.context.span_id
        and s.context is not None
        and s.context.trace_id == parent.context.trace_id
    ]


async def test_a_hot_read_is_a_request_span_with_a_redis_child(
    api: httpx.AsyncClient, auth: Headers, exporter: InMemorySpanExporter
):
    sid = (await create_session(api, auth()))["id"]
    exporter.clear()

    await get_session(api, auth(), sid)

    spans = exporter.get_finished_spans()
    root = request_span(spans, f"GET {ROUTE}")
    assert root.parent is None
    assert root.attributes is not None
    assert root.attributes["http.route"] == ROUTE
    assert root.attributes["http.response.status_code"] == 200
    assert root.attributes["sessionmgr.session_id"] == sid
    backend = children(spans, root)
    assert [(s.name, s.kind) for s in backend] == [("redis load", SpanKind.CLIENT)]
    assert backend[0].attributes is not None
    assert dict(backend[0].attributes) == {
        "db.system": "redis",
        "db.operation": "load",
        "sessionmgr.session_id": sid,
        "sessionmgr.outcome": "ok",
    }
    assert backend[0].status.status_code is StatusCode.OK


async def test_a_dormant_read_has_redis_and_mongodb_children(
    api: httpx.AsyncClient, auth: Headers, exporter: InMemorySpanExporter
):
    sid = (await create_session(api, auth()))["id"]
    r = await api.post(f"/v1/sessions/{sid}/suspend", headers=auth())
    assert r.status_code == 200, r.text
    exporter.clear()

    assert (await get_session(api, auth(), sid))["state"] == "dormant"

    spans = exporter.get_finished_spans()
    root = request_span(spans, f"GET {ROUTE}")
    backend = children(spans, root)
    assert [s.name for s in backend] == ["redis load", "mongodb get", "mongodb recent_events"]
    for span in backend:
        assert span.attributes is not None
        assert span.attributes["sessionmgr.session_id"] == sid
        assert span.attributes["sessionmgr.outcome"] == "ok"
    assert {s.attributes["db.system"] for s in backend if s.attributes} == {"redis", "mongodb"}


async def test_create_traces_the_mongodb_insert_before_the_redis_write(
    api: httpx.AsyncClient, auth: Headers, exporter: InMemorySpanExporter
):
    sid = (await create_session(api, auth()))["id"]

    spans = exporter.get_finished_spans()
    root = request_span(spans, "POST /v1/sessions")
    assert root.attributes is not None
    assert root.attributes["http.response.status_code"] == 201
    backend = children(spans, root)
    # The owner's sessions are counted first (the quota): that span names no session.
    assert [s.name for s in backend] == ["mongodb count_owned", "mongodb insert", "redis create"]
    assert backend[0].attributes is not None
    assert "sessionmgr.session_id" not in backend[0].attributes
    writes = backend[1:]
    assert all(s.attributes and s.attributes["sessionmgr.session_id"] == sid for s in writes)


async def test_a_conflict_is_the_store_answering_not_failing(
    api: httpx.AsyncClient, auth: Headers, exporter: InMemorySpanExporter
):
    sid = (await create_session(api, auth()))["id"]
    exporter.clear()

    r = await api.patch(
        f"/v1/sessions/{sid}",
        json={"expected_version": 7, "patch": {"work_in_progress": {"a": 1}}},
        headers=auth(),
    )
    assert r.status_code == 409

    spans = exporter.get_finished_spans()
    root = request_span(spans, f"PATCH {ROUTE}")
    assert root.status.status_code is StatusCode.UNSET  # a 4xx is not a server error
    [transact] = children(spans, root)
    assert transact.name == "redis transact"
    assert transact.attributes is not None
    assert transact.attributes["sessionmgr.outcome"] == "ConcurrencyConflict"
    assert transact.status.status_code is not StatusCode.ERROR
    assert [e.name for e in transact.events] == ["exception"]


async def test_a_failing_backend_is_an_error_span_with_the_exception(
    api: httpx.AsyncClient,
    auth: Headers,
    exporter: InMemorySpanExporter,
    redis_server: RedisServer,
):
    sid = (await create_session(api, auth()))["id"]
    exporter.clear()
    redis_server.stop()  # the `redis_url` fixture starts it again for the next test

    # Read-only mode: Redis fails, MongoDB answers.
    assert (await get_session(api, auth(), sid))["id"] == sid

    spans = exporter.get_finished_spans()
    root = request_span(spans, f"GET {ROUTE}")
    assert root.attributes is not None
    assert root.attributes["http.response.status_code"] == 200
    backend = children(spans, root)
    assert [s.name for s in backend] == ["redis load", "mongodb get", "mongodb recent_events"]
    failed = backend[0]
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.attributes is not None
    assert failed.attributes["sessionmgr.outcome"] == "error"
    assert failed.attributes["sessionmgr.session_id"] == sid
    [event] = failed.events
    assert event.name == "exception"
    assert event.attributes is not None
    assert event.attributes["exception.type"].endswith("BackendUnavailable")
    assert all(s.status.status_code is StatusCode.OK for s in backend[1:])


async def test_a_callers_traceparent_is_continued(
    api: httpx.AsyncClient, auth: Headers, exporter: InMemorySpanExporter
):
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    r = await api.post(
        "/v1/sessions", json={}, headers=auth(traceparent=f"00-{trace_id}-{parent_id}-01")
    )
    assert r.status_code == 201

    root = request_span(exporter.get_finished_spans(), "POST /v1/sessions")
    assert root.context is not None and root.parent is not None
    assert format(root.context.trace_id, "032x") == trace_id
    assert format(root.parent.span_id, "016x") == parent_id


async def test_probes_and_scrapes_make_no_spans(
    api: httpx.AsyncClient, exporter: InMemorySpanExporter
):
    for path in ("/health/live", "/health/ready", "/metrics"):
        assert (await api.get(path)).status_code == 200
    assert exporter.get_finished_spans() == ()


@pytest.fixture
def worker_container(settings: Settings, exporter: InMemorySpanExporter) -> Container:
    return _recording(build_container(settings), exporter)


async def test_write_behind_batches_are_root_spans_with_mongodb_children(
    worker_container: Container, auth: Headers, exporter: InMemorySpanExporter
):
    from sessionmgr.api.bridge import resolve
    from tests.integration.conftest import serving

    async with serving(worker_container) as api:
        sid = (await create_session(api, auth()))["id"]
        r = await api.patch(
            f"/v1/sessions/{sid}",
            json={"expected_version": 1, "patch": {"work_in_progress": {"step": 2}}},
            headers=auth(),
        )
        assert r.status_code == 200
        warm: MongoWarmStore = await resolve(worker_container.warm)
        redis: Redis = await resolve(worker_container.redis)
        stored = await eventually(
            lambda: warm.get(sid), lambda rec: rec is not None and rec.version == 2
        )
        assert stored is not None and stored.version == 2
        assert await redis.ping()

    spans = exporter.get_finished_spans()
    batches = [s for s in spans if s.name == "write-behind deliver"]
    assert batches, [s.name for s in spans]
    applies = [c for b in batches for c in children(spans, b)]
    assert all(b.parent is None for b in batches)
    assert any(
        c.name == "mongodb apply" and c.attributes and c.attributes["sessionmgr.session_id"] == sid
        for c in applies
    )


async def test_the_503_log_line_carries_the_requests_trace_id(
    api: httpx.AsyncClient,
    auth: Headers,
    exporter: InMemorySpanExporter,
    redis_server: RedisServer,
):
    sid = (await create_session(api, auth()))["id"]
    exporter.clear()
    redis_server.stop()
    with captured_lines() as handler:
        r = await api.patch(
            f"/v1/sessions/{sid}",
            json={"expected_version": 1, "patch": {"work_in_progress": {"a": 1}}},
            headers=auth(),
        )
    assert r.status_code == 503

    root = request_span(exporter.get_finished_spans(), f"PATCH {ROUTE}")
    assert root.context is not None
    assert root.status.status_code is StatusCode.ERROR
    [line] = [entry for entry in handler.lines if "answered 503" in entry["msg"]]
    assert line["trace_id"] == format(root.context.trace_id, "032x")
    assert line["session_id"] == sid
