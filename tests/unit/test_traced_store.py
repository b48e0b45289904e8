"""`traced()`: any store's coroutine methods in client spans, whatever the tier."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode, Tracer

from sessionmgr.domain.errors import BackendUnavailable, SessionNotFound
from sessionmgr.services.ports import CREATE_SCOPE, Idempotency
from sessionmgr.storage.traced import traced
from tests.unit.factories import SessionRecordFactory


class ArchiveStore:
    """A made-up cold tier: the proxy knows nothing of it in advance."""

    bucket = "archive"

    def __init__(self) -> None:
        self.fail_with: BaseException | None = None

    async def put(self, record: object, body: bytes) -> int:
        if self.fail_with is not None:
            raise self.fail_with
        return len(body)

    async def fetch(self, session_id: str) -> bytes:
        raise SessionNotFound(session_id)

    async def claim(self, scope: str, idem: Idempotency) -> None:
        return None

    async def ping(self) -> None:
        return None

    def key_for(self, session_id: str) -> str:
        return f"sessions/{session_id}.json.gz"


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    yield exporter
    exporter.shutdown()


@pytest.fixture
def tracer(exporter: InMemorySpanExporter) -> Tracer:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider.get_tracer("test")


def only(exporter: InMemorySpanExporter) -> ReadableSpan:
    [span] = exporter.get_finished_spans()
    return span


async def test_a_call_is_a_client_span_with_the_records_session_id(
    tracer: Tracer, exporter: InMemorySpanExporter
) -> None:
    record = SessionRecordFactory.build()
    store = traced(ArchiveStore(), tracer, "s3")

    assert await store.put(record, body=b"abc") == 3

    span = only(exporter)
    assert (span.name, span.kind, span.status.status_code) == (
        "s3 put",
        SpanKind.CLIENT,
        StatusCode.OK,
    )
    assert dict(span.attributes or {}) == {
        "db.system": "s3",
        "db.operation": "put",
        "sessionmgr.session_id": record.id,
        "sessionmgr.outcome": "ok",
    }


@pytest.mark.parametrize(
    "error", [BackendUnavailable("s3", "timed out"), ConnectionResetError("reset by peer")]
)
async def test_a_backend_failure_is_an_error_span_and_still_raises(
    tracer: Tracer, exporter: InMemorySpanExporter, error: Exception
) -> None:
    inner = ArchiveStore()
    inner.fail_with = error
    store = traced(inner, tracer, "s3")

    with pytest.raises(type(error)):
        await store.put(SessionRecordFactory.build(), b"")

    span = only(exporter)
    assert span.status.status_code is StatusCode.ERROR
    assert (span.attributes or {})["sessionmgr.outcome"] == "error"
    assert [e.name for e in span.events] == ["exception"]


async def test_a_domain_answer_is_named_but_not_an_error(
    tracer: Tracer, exporter: InMemorySpanExporter
) -> None:
    store = traced(ArchiveStore(), tracer, "s3")

    with pytest.raises(SessionNotFound):
        await store.fetch(session_id="abc")

    span = only(exporter)
    assert span.status.status_code is StatusCode.UNSET
    assert (span.attributes or {})["sessionmgr.outcome"] == "SessionNotFound"
    assert (span.attributes or {})["sessionmgr.session_id"] == "abc"


async def test_an_idempotency_scope_is_a_session_id_unless_it_is_create(
    tracer: Tracer, exporter: InMemorySpanExporter
) -> None:
    store = traced(ArchiveStore(), tracer, "redis")
    idem = Idempotency(key_digest="k", fingerprint="f")

    await store.claim("abc", idem)
    await store.claim(CREATE_SCOPE, idem)
    await store.ping()

    first, second, ping = exporter.get_finished_spans()
    assert (first.attributes or {})["sessionmgr.session_id"] == "abc"
    assert "sessionmgr.session_id" not in (second.attributes or {})
    assert "sessionmgr.session_id" not in (ping.attributes or {})


def test_plain_attributes_and_methods_pass_through_untraced(
    tracer: Tracer, exporter: InMemorySpanExporter
) -> None:
    store = traced(ArchiveStore(), tracer, "s3")
    assert store.bucket == "archive"
    assert store.key_for("abc") == "sessions/abc.json.gz"
    assert exporter.get_finished_spans() == ()
