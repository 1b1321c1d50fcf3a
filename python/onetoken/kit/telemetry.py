"""The control process's traces over OTLP/HTTP (docs/observability.md): a span per control
API request (FastAPI) and per database query (SQLAlchemy), sampled by ratio, queued and
sent by a background thread so a request never waits on the collector.

What leaves the process is metadata only: every span is rebuilt from an allowlist of
attribute names (method, route template, status, database system and operation) with its
events and status text dropped, so a query string, a SQL statement, an exception message
or a header value never reaches the collector, whatever the instrumentation recorded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from fastapi import FastAPI
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
    from sqlalchemy.engine import Engine

# The attributes a control span may carry, old and stable semantic-convention names alike.
ALLOWED_ATTRIBUTES: Final = frozenset({
    "http.method", "http.request.method", "http.route", "http.status_code",
    "http.response.status_code", "http.scheme", "url.scheme", "http.flavor",
    "network.protocol.version",
    "db.system", "db.system.name", "db.name", "db.namespace", "db.operation",
    "db.operation.name",
})


@dataclass(frozen=True)
class Export:
    """Where spans go and how many: the collector's OTLP/HTTP base URL, the head-sampling
    ratio, the service name and how often queued spans are sent."""

    endpoint: str
    ratio: float
    service_name: str
    interval_ms: int


def _scrub(span: ReadableSpan) -> ReadableSpan:
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.trace import Status

    attrs = {k: v for k, v in (span.attributes or {}).items() if k in ALLOWED_ATTRIBUTES}
    return ReadableSpan(
        name=span.name,
        context=span.context,
        parent=span.parent,
        resource=span.resource,
        attributes=attrs,
        kind=span.kind,
        # The code only: a description is an exception's text.
        status=Status(span.status.status_code),
        start_time=span.start_time,
        end_time=span.end_time,
        instrumentation_scope=span.instrumentation_scope,
    )


def _allowlisted(inner: SpanExporter) -> SpanExporter:
    from opentelemetry.sdk.trace.export import SpanExporter

    class Allowlisted(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            return inner.export([_scrub(s) for s in spans])

        def shutdown(self) -> None:
            inner.shutdown()

        def force_flush(self, timeout_millis: int = 30000) -> bool:
            return inner.force_flush(timeout_millis)

    return Allowlisted()


def instrument(app: FastAPI, engine: Engine, export: Export) -> None:
    """Trace `app`'s requests and `engine`'s queries. A W3C traceparent on a control API
    request is continued (its sampled flag decides); otherwise `export.ratio` does."""
    # Imported here: only a process that traces pays the SDK's import time.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
    from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    provider = TracerProvider(
        resource=Resource.create({"service.name": export.service_name}),
        sampler=ParentBased(TraceIdRatioBased(export.ratio)),
    )
    exporter = OTLPSpanExporter(endpoint=f"{export.endpoint.rstrip('/')}/v1/traces")
    # A bounded queue (spans beyond it are dropped) drained by the processor's thread.
    provider.add_span_processor(
        BatchSpanProcessor(_allowlisted(exporter), schedule_delay_millis=export.interval_ms)
    )
    # The ASGI body events (receive/send) are per message: noise, and nothing to learn.
    FastAPIInstrumentor.instrument_app(
        app, tracer_provider=provider, exclude_spans=["receive", "send"]
    )
    # Its declared range stops below SQLAlchemy 2.1, whose engine events it uses unchanged
    # (tests/integration/test_otel.py sees the queries' spans).
    SQLAlchemyInstrumentor().instrument(
        engine=engine, tracer_provider=provider, skip_dep_check=True
    )
    app.state.otel_provider = provider
