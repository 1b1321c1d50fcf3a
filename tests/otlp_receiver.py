"""A real OTLP/HTTP receiver for the tracing tests: a stdlib http.server on 127.0.0.1:0
that takes `/v1/traces` and `/v1/metrics` in both OTLP encodings (JSON, as the gateway
sends; protobuf, as the Python SDK sends, decoded with opentelemetry-proto), keeps every
raw body for the canary check, and flattens spans into plain dicts."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from google.protobuf.json_format import MessageToDict
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest


@dataclass
class Span:
    service: str
    trace_id: str
    span_id: str
    parent: str
    name: str
    kind: int
    start: int
    end: int
    status: int
    attrs: dict[str, Any]


def _value(v: dict[str, Any]) -> Any:
    if "stringValue" in v:
        return v["stringValue"]
    if "intValue" in v:
        return int(v["intValue"])
    if "boolValue" in v:
        return bool(v["boolValue"])
    if "doubleValue" in v:
        return float(v["doubleValue"])
    return v


def _attrs(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {a["key"]: _value(a.get("value", {})) for a in items}


def _hex_id(v: str, *, protobuf: bool) -> str:
    """OTLP JSON carries ids as hex; protobuf's JSON mapping as base64 bytes."""
    if not v:
        return ""
    return base64.b64decode(v).hex() if protobuf else v


_KINDS = {"SPAN_KIND_INTERNAL": 1, "SPAN_KIND_SERVER": 2, "SPAN_KIND_CLIENT": 3}
_STATUS = {"STATUS_CODE_UNSET": 0, "STATUS_CODE_OK": 1, "STATUS_CODE_ERROR": 2}


@dataclass
class Receiver:
    bodies: list[bytes] = field(default_factory=list)
    spans: list[Span] = field(default_factory=list)
    # Each export's metrics, by name: the decoded OTLP metric objects.
    metrics: list[dict[str, Any]] = field(default_factory=list)
    # Answer 503 to every export (a collector that refuses).
    refuse: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def take(self, path: str, content_type: str, body: bytes) -> int:
        if self.refuse:
            return 503
        protobuf = content_type.startswith("application/x-protobuf")
        if path == "/v1/traces":
            if protobuf:
                doc = MessageToDict(ExportTraceServiceRequest.FromString(body))
            else:
                doc = json.loads(body)
            spans = list(self._spans(doc, protobuf=protobuf))
            with self._lock:
                self.bodies.append(body)
                self.spans.extend(spans)
            return 200
        if path == "/v1/metrics":
            if protobuf:
                doc = MessageToDict(ExportMetricsServiceRequest.FromString(body))
            else:
                doc = json.loads(body)
            by_name = {
                m["name"]: m
                for rm in doc.get("resourceMetrics", [])
                for sm in rm.get("scopeMetrics", [])
                for m in sm.get("metrics", [])
            }
            with self._lock:
                self.bodies.append(body)
                self.metrics.append(by_name)
            return 200
        return 404

    @staticmethod
    def _spans(doc: dict[str, Any], *, protobuf: bool) -> Iterator[Span]:
        for rs in doc.get("resourceSpans", []):
            service = _attrs(rs.get("resource", {}).get("attributes", [])).get("service.name", "")
            for ss in rs.get("scopeSpans", []):
                for s in ss.get("spans", []):
                    kind = s.get("kind", 0)
                    status = s.get("status", {}).get("code", 0)
                    yield Span(
                        service=service,
                        trace_id=_hex_id(s["traceId"], protobuf=protobuf),
                        span_id=_hex_id(s["spanId"], protobuf=protobuf),
                        parent=_hex_id(s.get("parentSpanId", ""), protobuf=protobuf),
                        name=s["name"],
                        kind=_KINDS.get(kind, kind) if isinstance(kind, str) else kind,
                        start=int(s["startTimeUnixNano"]),
                        end=int(s["endTimeUnixNano"]),
                        status=_STATUS.get(status, status) if isinstance(status, str) else status,
                        attrs=_attrs(s.get("attributes", [])),
                    )

    def snapshot(self) -> tuple[list[Span], list[dict[str, Any]], list[bytes]]:
        with self._lock:
            return list(self.spans), list(self.metrics), list(self.bodies)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:  # keep test output quiet
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        status = self.server.receiver.take(
            self.path, self.headers.get("content-type", ""), body
        )
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"{}")


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, receiver: Receiver) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.receiver = receiver


@contextmanager
def otlp_receiver() -> Iterator[Receiver]:
    receiver = Receiver()
    srv = _Server(receiver)
    receiver._server = srv
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield receiver
    finally:
        srv.shutdown()
        srv.server_close()
