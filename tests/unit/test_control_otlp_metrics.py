"""The control process's metrics over OTLP (docs/observability.md): what its /metrics
serves, posted to a real OTLP/HTTP receiver (tests/otlp_receiver.py) under the same
names, labels and values: counters as cumulative sums, gauges, histograms with the
scrape's buckets."""

from __future__ import annotations

from typing import Any

from onetoken.kit.metrics import Metric, Registry, RequestStats
from onetoken.kit.telemetry import Export, MetricsExport
from tests.otlp_receiver import Receiver, otlp_receiver
from tests.support import wait_until


def _labels(point: dict[str, Any]) -> dict[str, str]:
    return {a["key"]: a["value"]["stringValue"] for a in point.get("attributes", [])}


def _registry() -> tuple[Registry, RequestStats, list[int]]:
    requests = RequestStats("onetoken_control")
    depth = [3]
    registry = Registry()
    registry.register("control_api", requests.metrics)
    registry.register("journal", lambda: [
        Metric("onetoken_journal_depth", "gauge", "Records not yet ingested").add(
            depth[0], instance="gw-1")
    ])
    return registry, requests, depth


def _last(receiver: Receiver, name: str) -> dict[str, Any] | None:
    exports = [m for m in receiver.snapshot()[1] if name in m]
    return exports[-1][name] if exports else None


def test_the_control_metrics_reach_the_collector_as_on_metrics() -> None:
    registry, requests, depth = _registry()
    requests.observe("GET", "/api/v1/keys", 200, 0.003)
    requests.observe("GET", "/api/v1/keys", 200, 0.2)
    requests.observe("POST", "/api/v1/keys", 422, 0.04)
    with otlp_receiver() as receiver:
        export = MetricsExport(registry, Export(receiver.url, 1.0, "onetoken-control", 50))
        export.start()
        try:
            total = wait_until(lambda: _last(receiver, "onetoken_control_requests_total"),
                               message="an OTLP metrics export")
            assert total["sum"]["isMonotonic"] is True
            assert total["sum"]["aggregationTemporality"] == (
                "AGGREGATION_TEMPORALITY_CUMULATIVE")
            counts = {(p := _labels(d))["route"] + " " + p["method"] + " " + p["code"]:
                      int(d["asInt"]) for d in total["sum"]["dataPoints"]}
            assert counts == {"/api/v1/keys GET 200": 2, "/api/v1/keys POST 422": 1}
            # The histogram keeps the /metrics buckets: counts per bucket, not cumulative.
            hist = _last(receiver, "onetoken_control_request_duration_seconds")
            assert hist is not None
            (point,) = hist["histogram"]["dataPoints"]
            assert int(point["count"]) == 3 and abs(point["sum"] - 0.243) < 1e-9
            bounds = point["explicitBounds"]
            assert bounds[0] == 0.005 and len(point["bucketCounts"]) == len(bounds) + 1
            per_bucket = dict(zip([*bounds, "inf"], map(int, point["bucketCounts"]),
                                  strict=True))
            assert (per_bucket[0.005], per_bucket[0.05], per_bucket[0.25]) == (1, 1, 1)
            assert sum(per_bucket.values()) == 3
            gauge = _last(receiver, "onetoken_journal_depth")
            assert gauge is not None
            (g,) = gauge["gauge"]["dataPoints"]
            assert (int(g["asInt"]), _labels(g)) == (3, {"instance": "gw-1"})
            # Later exports carry the values of the moment.
            depth[0] = 0
            requests.observe("GET", "/api/v1/keys", 200, 0.003)
            wait_until(lambda: (last := _last(receiver, "onetoken_journal_depth")) is not None
                       and int(last["gauge"]["dataPoints"][0].get("asInt", 0)) == 0,
                       message="the gauge's new value")
            # The collector-up gauge /metrics has comes along too.
            assert _last(receiver, "onetoken_collector_up") is not None
        finally:
            export.stop()
        assert export.failures == 0


def test_a_refusing_collector_is_counted_and_does_not_stop_the_export() -> None:
    registry, _, _ = _registry()
    with otlp_receiver() as receiver:
        receiver.refuse = True
        export = MetricsExport(registry, Export(receiver.url, 1.0, "onetoken-control", 50))
        export.start()
        try:
            wait_until(lambda: export.failures >= 2, message="refused posts")
            receiver.refuse = False
            wait_until(lambda: _last(receiver, "onetoken_journal_depth"),
                       message="an export once the collector takes them")
        finally:
            export.stop()
