"""The control process's traces and metrics over OTLP/HTTP (docs/observability.md): a span
per control API request (FastAPI) and per database query (SQLAlchemy), sampled by ratio,
queued and sent by a background thread so a request never waits on the collector; and,
every interval, the metrics its /metrics serves, under the same names and labels.

What leaves the process is metadata only: every span is rebuilt from an allowlist of
attribute names (method, route template, status, database system and operation) with its
events and status text dropped, so a query string, a SQL statement, an exception message
or a header value never reaches the collector, whatever the instrumentation recorded.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import httpx

from onetoken.kit.metrics import Metric, Registry

if TYPE_CHECKING:
    from fastapi import FastAPI
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
    from sqlalchemy.engine import Engine

log = logging.getLogger("onetoken.telemetry")

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


# -- metrics ---------------------------------------------------------------------------------


def metrics_request(
    families: Sequence[Metric], service_name: str, start_ns: int, now_ns: int
) -> bytes:
    """The families of a /metrics scrape as one OTLP ExportMetricsServiceRequest
    (protobuf): counters as cumulative monotonic sums since `start_ns`, gauges as gauges,
    histograms with the scrape's buckets; names and labels unchanged."""
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
        ExportMetricsServiceRequest,
    )
    from opentelemetry.proto.common.v1.common_pb2 import (
        AnyValue,
        InstrumentationScope,
        KeyValue,
    )
    from opentelemetry.proto.metrics.v1 import metrics_pb2 as pb
    from opentelemetry.proto.resource.v1.resource_pb2 import Resource

    def attrs(labels: dict[str, str]) -> list[KeyValue]:
        return [KeyValue(key=k, value=AnyValue(string_value=v)) for k, v in labels.items()]

    def number(value: float, labels: dict[str, str]) -> pb.NumberDataPoint:
        point = pb.NumberDataPoint(attributes=attrs(labels), start_time_unix_nano=start_ns,
                                   time_unix_nano=now_ns)
        if isinstance(value, int):
            point.as_int = value
        else:
            point.as_double = value
        return point

    out: list[pb.Metric] = []
    for family in families:
        metric = pb.Metric(name=family.name, description=family.help)
        if family.kind == "counter":
            metric.sum.CopyFrom(pb.Sum(
                aggregation_temporality=pb.AGGREGATION_TEMPORALITY_CUMULATIVE,
                is_monotonic=True,
                data_points=[number(v, labels) for _, labels, v in family.samples],
            ))
        elif family.kind == "gauge":
            metric.gauge.CopyFrom(pb.Gauge(
                data_points=[number(v, labels) for _, labels, v in family.samples]
            ))
        else:
            metric.histogram.CopyFrom(pb.Histogram(
                aggregation_temporality=pb.AGGREGATION_TEMPORALITY_CUMULATIVE,
                data_points=_histogram_points(family, attrs, start_ns, now_ns),
            ))
        out.append(metric)
    request = ExportMetricsServiceRequest(resource_metrics=[pb.ResourceMetrics(
        resource=Resource(attributes=attrs({"service.name": service_name})),
        scope_metrics=[pb.ScopeMetrics(scope=InstrumentationScope(name="onetoken"),
                                       metrics=out)],
    )])
    return bytes(request.SerializeToString())


def _histogram_points(
    family: Metric, attrs: Callable[[dict[str, str]], Any], start_ns: int, now_ns: int
) -> list[Any]:
    """Prometheus' cumulative `_bucket{le=...}` samples, per label set, as OTLP's counts
    per bucket."""
    from opentelemetry.proto.metrics.v1.metrics_pb2 import HistogramDataPoint

    series: dict[tuple[tuple[str, str], ...], dict[str, Any]] = {}
    for suffix, labels, value in family.samples:
        key = tuple(sorted((k, v) for k, v in labels.items() if k != "le"))
        one = series.setdefault(key, {"buckets": {}, "sum": 0.0, "count": 0})
        if suffix == "_bucket":
            one["buckets"][float(labels["le"])] = int(value)
        elif suffix == "_sum":
            one["sum"] = float(value)
        elif suffix == "_count":
            one["count"] = int(value)
    points = []
    for key, one in series.items():
        bounds = sorted(b for b in one["buckets"] if b != float("inf"))
        cumulative = [one["buckets"][b] for b in bounds] + [one["count"]]
        counts = [c - (cumulative[i - 1] if i else 0) for i, c in enumerate(cumulative)]
        points.append(HistogramDataPoint(
            attributes=attrs(dict(key)), start_time_unix_nano=start_ns, time_unix_nano=now_ns,
            count=one["count"], sum=one["sum"], bucket_counts=counts, explicit_bounds=bounds,
        ))
    return points


class MetricsExport:
    """Posts `registry`'s metrics (what /metrics serves) to the collector every interval,
    from a daemon thread: a slow or refusing collector delays only the next post."""

    def __init__(self, registry: Registry, export: Export) -> None:
        self.registry = registry
        self.export = export
        self.url = f"{export.endpoint.rstrip('/')}/v1/metrics"
        self.failures = 0
        self._start_ns = time.time_ns()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="otlp-metrics", daemon=True)

    def start(self) -> MetricsExport:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def post(self, client: httpx.Client) -> None:
        body = metrics_request(self.registry.collect(), self.export.service_name,
                               self._start_ns, time.time_ns())
        try:
            client.post(self.url, content=body,
                        headers={"content-type": "application/x-protobuf"}).raise_for_status()
        except httpx.HTTPError as exc:
            self.failures += 1
            log.warning("otel.metrics_export_failed", extra={"exc_type": type(exc).__name__})

    def _run(self) -> None:
        interval = self.export.interval_ms / 1000
        # One post ends well within the interval's tens of times, whatever the collector.
        with httpx.Client(timeout=max(1.0, min(10.0, interval * 10))) as client:
            while not self._stop.wait(interval):
                self.post(client)
            self.post(client)  # the last values on the way out
