"""bench/run.py's tracing rows count only when their gateway exported spans: the local
OTLP sink counts the spans of the gateway's OTLP/JSON, and a row whose sink got none is
refused."""

from __future__ import annotations

import importlib.util
import json
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "run.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_run", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def sink(bench: ModuleType) -> Iterator[Any]:
    s = bench.OtlpSink()
    yield s
    s.close()


def _post(url: str, path: str, doc: dict[str, Any]) -> int:
    req = urllib.request.Request(  # noqa: S310 - the sink on loopback
        url + path, data=json.dumps(doc, separators=(",", ":")).encode(),
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310
        return int(resp.status)


def _spans(n: int) -> dict[str, Any]:
    spans = [{"traceId": "ab" * 16, "spanId": f"{i + 1:016x}", "name": "request"}
             for i in range(n)]
    return {"resourceSpans": [{"scopeSpans": [{"spans": spans}]}]}


def test_a_row_without_an_exported_span_is_refused(bench: ModuleType, sink: Any) -> None:
    # Metrics alone do not make a traced row.
    assert _post(sink.url, "/v1/metrics", {"resourceMetrics": []}) == 200
    with pytest.raises(bench.BenchError, match="no span reached the OTLP sink"):
        bench.require_spans(sink, timeout=0.2)


def test_the_sink_counts_every_span_it_receives(bench: ModuleType, sink: Any) -> None:
    assert _post(sink.url, "/v1/traces", _spans(3)) == 200
    assert _post(sink.url, "/v1/traces", _spans(2)) == 200
    assert bench.require_spans(sink, timeout=5) == 5


def test_the_rows_sit_beside_onetoken(bench: ModuleType) -> None:
    assert [name for name, _ in bench.OTLP_ROWS] == ["onetoken+otlp1%", "onetoken+otlp100%"]
    assert [ratio for _, ratio in bench.OTLP_ROWS] == [0.01, 1.0]
