"""Tracing on or off from the `OTEL_*` variables, and JSON log lines that carry the trace id."""

from __future__ import annotations

import http.server
import json
import logging
import threading
from collections.abc import Iterator
from typing import ClassVar

import pytest
from opentelemetry.sdk.trace import TracerProvider

from sessionmgr.settings import ConfigError
from sessionmgr.telemetry import (
    JsonFormatter,
    open_tracing,
    trace_exporters,
    tracer_of,
    tracer_provider_from_env,
)


@pytest.mark.parametrize(
    ("environ", "exporters"),
    [
        ({}, ()),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, ("otlp",)),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, ("otlp",)),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "  "}, ()),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, ("otlp",)),
        ({"OTEL_TRACES_EXPORTER": "console"}, ("console",)),
        ({"OTEL_TRACES_EXPORTER": "OTLP, console,otlp"}, ("otlp", "console")),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, ()),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}, ()),
        ({"OTEL_SDK_DISABLED": "TRUE", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, ()),
        ({"OTEL_SDK_DISABLED": "false", "OTEL_TRACES_EXPORTER": "otlp"}, ("otlp",)),
        (
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            },
            ("otlp",),
        ),
    ],
)
def test_tracing_is_on_only_when_the_variables_ask(
    environ: dict[str, str], exporters: tuple[str, ...]
) -> None:
    assert trace_exporters(environ) == exporters


@pytest.mark.parametrize(
    ("environ", "variable"),
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER"),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ),
        (
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc"},
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        ),
    ],
)
def test_an_exporter_sessionmgr_cannot_use_names_the_variable(
    environ: dict[str, str], variable: str
) -> None:
    with pytest.raises(ConfigError, match=variable):
        trace_exporters(environ)


def test_off_records_nothing_and_starts_no_thread() -> None:
    before = threading.active_count()
    provider = tracer_provider_from_env({})
    with tracer_of(provider).start_as_current_span("request") as span:
        assert not span.is_recording()
        assert span.get_span_context().is_valid  # log lines still get a trace id
    assert threading.active_count() == before
    provider.shutdown()


class _Collector(http.server.BaseHTTPRequestHandler):
    received: ClassVar[list[tuple[str, str, bytes]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append((self.path, self.headers["Content-Type"], body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def collector() -> Iterator[tuple[str, list[tuple[str, str, bytes]]]]:
    """A stand-in OTLP/HTTP collector on this machine."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    received: list[tuple[str, str, bytes]] = []
    _Collector.received = received
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", received
    server.shutdown()
    server.server_close()


def test_on_exports_over_otlp_and_flushes_when_closed(
    monkeypatch: pytest.MonkeyPatch, collector: tuple[str, list[tuple[str, str, bytes]]]
) -> None:
    endpoint, received = collector
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
    resource = open_tracing()
    provider = next(resource)
    assert provider.resource.attributes["service.name"] == "sessionmgr"
    with tracer_of(provider).start_as_current_span("GET /v1/sessions/{session_id}"):
        pass
    with pytest.raises(StopIteration):
        next(resource)  # the container's shutdown
    [(path, content_type, body)] = received
    assert (path, content_type) == ("/v1/traces", "application/x-protobuf")
    assert b"GET /v1/sessions/{session_id}" in body
    assert b"sessionmgr" in body


def test_otel_service_name_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_SERVICE_NAME", "sessionmgr-eu")
    provider = tracer_provider_from_env({})
    assert provider.resource.attributes["service.name"] == "sessionmgr-eu"


def _line(formatter: logging.Formatter, message: str) -> dict[str, object]:
    record = logging.LogRecord("sessionmgr", logging.WARNING, __file__, 1, message, (), None)
    record.session_id = "abc"
    return json.loads(formatter.format(record))  # type: ignore[no-any-return]


def test_a_log_line_inside_a_span_carries_its_trace_and_span_id() -> None:
    provider = TracerProvider()
    formatter = JsonFormatter()
    with tracer_of(provider).start_as_current_span("request") as span:
        line = _line(formatter, "redis answered 503")
    context = span.get_span_context()
    assert line["trace_id"] == format(context.trace_id, "032x")
    assert line["span_id"] == format(context.span_id, "016x")
    assert (line["level"], line["msg"]) == ("warning", "redis answered 503")
    assert line["session_id"] == "abc"


def test_a_log_line_outside_any_span_has_no_trace_id() -> None:
    line = _line(JsonFormatter(), "started")
    assert "trace_id" not in line
    assert "span_id" not in line
