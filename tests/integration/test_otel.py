"""Traces and metrics over OTLP (docs/observability.md), received by a real OTLP/HTTP
receiver in the test: the gateway's trace tree (phases, attempts on a fallback), a client
traceparent continued only for an org that allows it (and only then sent upstream), the
control process's FastAPI and SQLAlchemy spans, metrics, a refusing collector costing
only dropped spans, and a canary over everything exported. Sampling ratio 0 and a dead
collector: rust/gateway/tests/otel.rs."""

from __future__ import annotations

import secrets
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from onetoken.kit.telemetry import ALLOWED_ATTRIBUTES
from tests.otlp_receiver import Receiver, Span, otlp_receiver
from tests.support import parse_metrics, sample, wait_until

from .catalog import admin_org, put, write_providers_file
from .harness import Admin, deployed

CANARY = f"CANARY-{uuid.uuid4().hex}"
PHASES = ["admit", "authenticate", "route", "reserve", "forward", "relay", "settle"]


class _Primary(BaseHTTPRequestHandler):
    """The fallback's primary: answers 500 and keeps the traceparent it was sent."""

    server: _PrimaryServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        self.server.traceparents.append(self.headers.get("traceparent"))
        body = b'{"error": {"message": "failing on purpose", "type": "server_error"}}'
        self.send_response(500)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _PrimaryServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Primary)
        self.traceparents: list[str | None] = []


@pytest.fixture(scope="module")
def primary() -> Iterator[_PrimaryServer]:
    srv = _PrimaryServer()
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def sink() -> Iterator[Receiver]:
    with otlp_receiver() as r:
        yield r


def _catalog(mock: str, primary: _PrimaryServer) -> dict[str, Any]:
    host, port = primary.server_address[:2]
    return {
        "providers": [
            {"name": "otel-primary", "base_url": f"http://{host!s}:{port}/v1",
             "models": [{"name": "ot-fb", "upstream_model": "mock-gpt", "priority": 0,
                         "input_price": "5", "output_price": "5"}]},
            {"name": "otel-secondary", "base_url": f"http://{mock}/v1",
             "models": [{"name": "ot-fb", "upstream_model": "mock-gpt", "priority": 1,
                         "input_price": "3", "output_price": "7"}]},
        ],
        "routes": [{"name": "ot-fb", "strategy": "priority"}],
        "routing": {"max_attempts": 3, "retry_deadline_ms": 10000, "backoff_ms": 10,
                    "breaker_failures": 50, "breaker_open_ms": 1000},
    }


@pytest.fixture(scope="module")
def deployment(  # overrides the shared fixture: this module's server traces
    tmp_path_factory: pytest.TempPathFactory, mock_addr: str, primary: _PrimaryServer,
    sink: Receiver,
) -> Iterator[dict[str, Any]]:
    data_dir: Path = tmp_path_factory.mktemp("onetoken-otel")
    catalog = write_providers_file(data_dir / "providers.yaml", _catalog(mock_addr, primary))
    env = {
        "ONETOKEN_PROVIDERS_FILE": str(catalog),
        "ONETOKEN_OTEL_ENDPOINT": sink.url,
        "ONETOKEN_OTEL_RATIO": "1",
        "ONETOKEN_OTEL_EXPORT_INTERVAL_MS": "100",
    }
    with deployed(data_dir, mock_addr, env) as d:
        yield d


def _traceparent() -> tuple[str, str, str]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def _chat(deployment: dict[str, Any], model: str, headers: dict[str, str],
          **extra: Any) -> httpx.Response:
    key = deployment["creds"]["api_key"]
    body = {"model": model, "messages": [{"role": "user", "content": CANARY}],
            "mock": {"echo": True, "chunks": 3}, **extra}
    r = httpx.post(f"{deployment['server'].gateway_url}/v1/chat/completions",
                   headers={"Authorization": f"Bearer {key}", **headers}, json=body, timeout=30)
    assert r.status_code == 200, r.text
    if not extra.get("stream"):
        assert CANARY in r.text  # the client does get its answer: the canary is in it
    return r


def _trace_of(sink: Receiver, request_id: str) -> list[Span]:
    """Every gateway span of the request's trace, once its root has arrived."""

    def root() -> Span | None:
        spans = sink.snapshot()[0]
        return next((s for s in spans if s.name == "request"
                     and s.attrs.get("onetoken.request_id") == request_id), None)

    r = wait_until(root, message=f"the trace of {request_id}")
    return [s for s in sink.snapshot()[0] if s.trace_id == r.trace_id
            and s.service == "onetoken-gateway"]


def _tree(spans: list[Span]) -> tuple[Span, dict[str, Span], list[Span]]:
    root = next(s for s in spans if s.name == "request")
    phases = {s.name: s for s in spans if s.parent == root.span_id}
    upstream = sorted((s for s in spans if s.name == "upstream"), key=lambda s: s.start)
    return root, phases, upstream


@pytest.fixture(scope="module")
def admin_org_id(admin: Admin) -> str:
    return admin_org(admin)


def test_a_fallback_is_one_trace_continuing_the_clients_when_the_org_allows_it(
    deployment: dict[str, Any], admin: Admin, admin_org_id: str, sink: Receiver,
    primary: _PrimaryServer,
) -> None:
    put(admin, f"/api/v1/orgs/{admin_org_id}/policy", {"trace_context": True})
    try:
        header, client_trace, client_span = _traceparent()
        before = len(primary.traceparents)
        r = _chat(deployment, "ot-fb", {"traceparent": header})
        spans = _trace_of(sink, r.headers["x-request-id"])
    finally:
        put(admin, f"/api/v1/orgs/{admin_org_id}/policy", {})
    root, phases, upstream = _tree(spans)
    # The client's trace, the client's span as the parent of the gateway's.
    assert root.trace_id == client_trace and root.parent == client_span
    assert root.kind == 2 and root.status == 0
    assert sorted(phases, key=PHASES.index) == PHASES
    assert all(root.start <= p.start <= p.end <= root.end for p in phases.values())
    # Two attempts under forward: the primary's 500, then the secondary's answer.
    forward = phases["forward"]
    assert [u.parent for u in upstream] == [forward.span_id] * 2
    # Provider ids, as in the call records: two providers, the second one served.
    providers = [u.attrs["onetoken.provider"] for u in upstream]
    assert len(set(providers)) == 2 and root.attrs["onetoken.provider"] == providers[1]
    assert [u.attrs["http.response.status_code"] for u in upstream] == [500, 200]
    assert [u.attrs["onetoken.attempt"] for u in upstream] == [1, 2]
    assert upstream[0].status == 2 and upstream[1].status == 0
    # The primary was sent the trace, naming its attempt's span as the parent.
    assert primary.traceparents[before:] == [f"00-{client_trace}-{upstream[0].span_id}-01"]
    a = root.attrs
    assert (a["onetoken.org_id"], a["onetoken.model_requested"], a["onetoken.model_served"],
            a["onetoken.attempts"], a["http.response.status_code"]) == (
        admin_org_id, "ot-fb", "mock-gpt", 2, 200)
    assert a["onetoken.key_id"] and a["onetoken.error_code"] == ""
    assert a["onetoken.tokens.completion"] == 3 and a["onetoken.tokens.prompt"] > 0
    assert a["onetoken.cost"] > 0 and a["onetoken.usage_source"] == "upstream"


def test_without_the_orgs_consent_a_client_trace_is_neither_continued_nor_sent_upstream(
    deployment: dict[str, Any], sink: Receiver, primary: _PrimaryServer,
) -> None:
    header, client_trace, _ = _traceparent()
    before = len(primary.traceparents)
    r = _chat(deployment, "ot-fb", {"traceparent": header})
    root, _, upstream = _tree(_trace_of(sink, r.headers["x-request-id"]))
    assert root.trace_id != client_trace and root.parent == ""
    assert len(upstream) == 2
    assert primary.traceparents[before:] == [None]


def test_a_stream_relays_until_its_end_then_settles(
    deployment: dict[str, Any], sink: Receiver
) -> None:
    r = _chat(deployment, "demo-chat", {}, stream=True,
              stream_options={"include_usage": True})
    root, phases, upstream = _tree(_trace_of(sink, r.headers["x-request-id"]))
    assert root.attrs["onetoken.streamed"] is True
    assert len(upstream) == 1 and upstream[0].parent == phases["forward"].span_id
    assert phases["forward"].end <= phases["relay"].start
    assert phases["relay"].end <= phases["settle"].start <= phases["settle"].end <= root.end


def test_an_audio_upload_is_traced_through_its_phases_with_one_attempt(
    deployment: dict[str, Any], sink: Receiver
) -> None:
    # The canary is in the audio and in the transcript; the last test looks for it in
    # every exported byte.
    r = httpx.post(
        f"{deployment['server'].gateway_url}/v1/audio/transcriptions",
        headers={"Authorization": f"Bearer {deployment['creds']['api_key']}"},
        files={"file": ("a.wav", b"RIFF" + CANARY.encode() * 20, "audio/wav")},
        data={"model": "demo-whisper", "mock_text": CANARY},
        timeout=30,
    )
    assert r.status_code == 200 and r.json()["text"] == CANARY
    root, phases, upstream = _tree(_trace_of(sink, r.headers["x-request-id"]))
    assert {"route", "reserve", "forward", "relay", "settle"} <= set(phases)
    assert len(upstream) == 1 and upstream[0].parent == phases["forward"].span_id
    assert root.attrs["http.response.status_code"] == 200


def test_a_refused_request_is_traced_with_its_error(
    deployment: dict[str, Any], sink: Receiver
) -> None:
    r = httpx.post(f"{deployment['server'].gateway_url}/v1/chat/completions",
                   headers={"Authorization": f"Bearer ot-{CANARY}"},
                   json={"model": "demo-chat", "messages": [{"role": "user", "content": CANARY}]})
    assert r.status_code == 401
    root, phases, upstream = _tree(_trace_of(sink, r.headers["x-request-id"]))
    assert root.attrs["onetoken.error_code"] == "invalid_api_key"
    assert root.attrs["http.response.status_code"] == 401
    assert root.attrs["onetoken.org_id"] == ""
    assert set(phases) == {"admit", "authenticate", "settle"} and upstream == []


def test_the_control_process_traces_requests_and_their_queries(
    deployment: dict[str, Any], admin: Admin, sink: Receiver
) -> None:
    admin.get("/api/v1/keys", params={"q": CANARY})

    def control_tree() -> tuple[Span, list[Span]] | None:
        spans = [s for s in sink.snapshot()[0] if s.service == "onetoken-control"]
        for s in spans:
            if s.kind == 2 and s.attrs.get("http.route") == "/api/v1/keys":
                queries = [q for q in spans if q.parent == s.span_id and "db.system" in q.attrs]
                if queries:
                    return s, queries
        return None

    request, queries = wait_until(control_tree, message="a control request with its queries")
    status = request.attrs.get("http.status_code", request.attrs.get("http.response.status_code"))
    assert status == 200
    assert {q.trace_id for q in queries} == {request.trace_id}
    assert queries[0].attrs["db.system"] in ("postgresql", "sqlite")


def test_metrics_are_exported_and_spans_counted(
    deployment: dict[str, Any], sink: Receiver
) -> None:
    def exported() -> dict[str, Any] | None:
        # The gateway's exports (the control process posts its own too).
        metrics = [m for m in sink.snapshot()[1] if "onetoken_requests_total" in m]
        return metrics[-1] if metrics else None

    last = wait_until(exported, message="an OTLP metrics export")
    requests = last["onetoken_requests_total"]["sum"]["dataPoints"]
    chat = next(p for p in requests if p["attributes"][0]["value"]["stringValue"]
                == "/v1/chat/completions")
    assert int(chat["asInt"]) >= 1
    assert "onetoken_request_duration_seconds" in last
    tokens = {p["attributes"][0]["value"]["stringValue"]: int(p["asInt"])
              for p in last["onetoken_tokens_total"]["sum"]["dataPoints"]}
    assert tokens["completion"] >= 3 and tokens["prompt"] > 0
    cost = int(last["onetoken_cost_nano_total"]["sum"]["dataPoints"][0]["asInt"])
    assert cost > 0
    # The same series as /metrics, no label of higher cardinality.
    text = httpx.get(deployment["server"].metrics_url).text
    samples = parse_metrics(text)
    assert sample(samples, "onetoken_tokens_total", kind="completion") >= tokens["completion"]
    assert sample(samples, "onetoken_cost_nano_total") >= cost
    assert sample(samples, "onetoken_otel_spans_exported_total") > 0


def test_the_control_process_exports_its_metrics_too(
    deployment: dict[str, Any], admin: Admin, sink: Receiver
) -> None:
    admin.get("/api/v1/keys")

    def keys_counted() -> int | None:
        for export in reversed(sink.snapshot()[1]):
            total = export.get("onetoken_control_requests_total")
            if total is None:
                continue
            for p in total["sum"]["dataPoints"]:
                labels = {a["key"]: a["value"]["stringValue"] for a in p["attributes"]}
                if labels["route"] == "/api/v1/keys" and labels["code"] == "200":
                    return int(p["asInt"])
        return None

    assert wait_until(keys_counted, message="the control API's requests over OTLP") >= 1
    # The rest of its /metrics comes along (ingestion, the collectors' health).
    last = next(m for m in reversed(sink.snapshot()[1]) if "onetoken_collector_up" in m)
    assert "onetoken_control_request_duration_seconds" in last


def test_a_refusing_collector_costs_only_dropped_spans(
    deployment: dict[str, Any], sink: Receiver
) -> None:
    metrics_url = deployment["server"].metrics_url

    def dropped() -> float:
        return sample(parse_metrics(httpx.get(metrics_url).text),
                      "onetoken_otel_spans_dropped_total")

    before = dropped()
    sink.refuse = True
    try:
        for _ in range(3):
            _chat(deployment, "demo-chat", {})
        wait_until(lambda: dropped() >= before + 3 * 8, message="the spans counted dropped")
    finally:
        sink.refuse = False


def test_no_exported_byte_carries_content_or_the_key(
    deployment: dict[str, Any], sink: Receiver
) -> None:
    """Runs last: the canary went through every request above, in prompts and answers,
    as the key of a refused request and in a control API query string."""
    key = deployment["creds"]["api_key"]
    spans, _, bodies = sink.snapshot()
    assert spans and bodies
    for body in bodies:
        assert CANARY.encode() not in body
        assert key.encode() not in body
    for s in spans:
        for v in [s.name, *map(str, s.attrs.values())]:
            assert CANARY not in v and key not in v
        if s.service == "onetoken-control":
            assert set(s.attrs) <= ALLOWED_ATTRIBUTES, s.attrs
