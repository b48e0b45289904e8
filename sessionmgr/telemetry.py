"""Telemetry set-up: JSON logs that carry the trace id, and tracing from the `OTEL_*` variables.

Tracing is on only when the standard variables ask for it: `OTEL_TRACES_EXPORTER` names an
exporter other than `none`, or an OTLP endpoint is set (`OTEL_EXPORTER_OTLP_ENDPOINT`,
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`); `OTEL_SDK_DISABLED=true` turns it off whatever else is
set. Off, the provider samples nothing and has no processor, so no span is recorded or exported
and no thread is started; every request still gets a trace id (its caller's `traceparent`, or
a fresh one) so that its log lines can be found together.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from typing import Any

import msgspec
from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

import sessionmgr
from sessionmgr.settings import ConfigError

DEFAULT_SERVICE_NAME = "sessionmgr"
TRACER_NAME = "sessionmgr"
EXPORTERS = frozenset({"otlp", "console"})
OTLP_PROTOCOLS = frozenset({"http/protobuf"})

# uvicorn adds `color_message`, the same text with terminal colours: not for a JSON log.
_RESERVED = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "color_message"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            event["trace_id"] = trace.format_trace_id(span.trace_id)
            event["span_id"] = trace.format_span_id(span.span_id)
        event.update((k, v) for k, v in record.__dict__.items() if k not in _RESERVED)
        if record.exc_info:
            event["exc"] = self.formatException(record.exc_info)
        return msgspec.json.encode(event, enc_hook=str).decode()


def configure_logging(level: str = "INFO") -> None:
    """Route every logger (ours, uvicorn's, litestar's) to one JSON handler on stderr."""
    root = logging.getLogger()
    if not any(isinstance(h.formatter, JsonFormatter) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
        root.addHandler(handler)
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "litestar"):
        logging.getLogger(name).handlers = []
        logging.getLogger(name).propagate = True


def trace_exporters(environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The span exporters the `OTEL_*` variables ask for; empty when tracing is off."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return ()
    named = tuple(e.strip().lower() for e in env.get("OTEL_TRACES_EXPORTER", "").split(","))
    named = tuple(dict.fromkeys(e for e in named if e))
    if not named:
        endpoints = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
        named = ("otlp",) if any(env.get(v, "").strip() for v in endpoints) else ()
    if "none" in named:
        return ()
    if unknown := sorted(set(named) - EXPORTERS):
        raise ConfigError(
            f"OTEL_TRACES_EXPORTER names {unknown}: sessionmgr exports spans with "
            f"{sorted(EXPORTERS)} or 'none'"
        )
    if "otlp" in named:
        _check_protocol(env)
    return named


def _check_protocol(env: Mapping[str, str]) -> None:
    for var in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        protocol = env.get(var, "").strip()
        if protocol:
            if protocol not in OTLP_PROTOCOLS:
                raise ConfigError(
                    f"{var}={protocol!r} is not supported: sessionmgr sends OTLP as "
                    "http/protobuf (the collector's port 4318)"
                )
            return


def tracer_provider_from_env(environ: Mapping[str, str] | None = None) -> TracerProvider:
    """A provider that exports as the variables say, or one that records nothing."""
    env = os.environ if environ is None else environ
    exporters = trace_exporters(env)
    if not exporters:
        return TracerProvider(sampler=ALWAYS_OFF, resource=_resource())
    # The sampler (OTEL_TRACES_SAMPLER) and the exporter's endpoint, headers and timeout are
    # read from the process environment by the SDK itself.
    provider = TracerProvider(resource=_resource())
    for name in exporters:
        provider.add_span_processor(_processor(name))
    return provider


def _resource() -> Resource:
    # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES win; "sessionmgr" only replaces the
    # SDK's `unknown_service` placeholder.
    resource = Resource.create({SERVICE_VERSION: sessionmgr.__version__})
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    return resource


def _processor(exporter: str) -> SpanProcessor:
    if exporter == "console":
        return BatchSpanProcessor(ConsoleSpanExporter())
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return BatchSpanProcessor(OTLPSpanExporter())


def open_tracing() -> Iterator[TracerProvider]:
    """The container's tracer provider; closing it flushes the spans still queued."""
    provider = tracer_provider_from_env()
    try:
        yield provider
    finally:
        provider.shutdown()


def tracer_of(provider: trace.TracerProvider) -> trace.Tracer:
    return provider.get_tracer(TRACER_NAME, sessionmgr.__version__)


def records(tracer: trace.Tracer) -> bool:
    """False when `tracer` can record no span: tracing off (the SDK's tracer that samples
    nothing) or a no-op tracer. Then a span is pure cost, and callers skip it."""
    if isinstance(tracer, trace.NoOpTracer):
        return False
    return getattr(tracer, "sampler", None) is not ALWAYS_OFF
