"""deploy/prometheus: the rules load, their unit tests pass (promtool), and every metric
they read is one a real gateway serves on /metrics, so renaming a metric in
rust/gateway/src/metrics.rs fails here instead of silencing an alert in production."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from onetoken import _core
from tests.support import RedisServer, wait_until

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
RULES = PROMETHEUS / "onetoken.rules.yml"
RULE_TESTS = PROMETHEUS / "tests" / "onetoken.rules.test.yml"
CONTRACT = ROOT / "tests" / "contract"
DASHBOARDS = ROOT / "deploy" / "grafana" / "dashboards"

# A metric name in PromQL: recording rules' names hold a colon, label names and functions
# are told apart by what follows them.
_METRIC = re.compile(r"\b(onetoken_[a-z0-9_]+|up)\b(?!\s*\()")
# Prometheus's own series: `up` is written by the scraper, not the gateway.
_SCRAPER_SERIES = frozenset({"up"})
_CODE_MATCHER = re.compile(r'code=~"([^"]+)"')


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        message = "promtool is not installed (apt-get install prometheus)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def _run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_promtool(), *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )


def _rule_exprs() -> list[str]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule["expr"] for group in doc["groups"] for rule in group["rules"]]


def _dashboard_exprs() -> list[str]:
    """The PromQL of the Grafana dashboards' Prometheus panels."""
    boards = [json.loads(p.read_text()) for p in sorted(DASHBOARDS.glob("*.json"))]
    return [
        t["expr"]
        for board in boards
        for panel in board["panels"]
        if panel["datasource"]["type"] == "prometheus"
        for t in panel["targets"]
    ]


def _test_series() -> list[str]:
    doc = yaml.safe_load(RULE_TESTS.read_text())
    return [s["series"] for case in doc["tests"] for s in case["input_series"]]


def _names(texts: list[str]) -> set[str]:
    return {m for text in texts for m in _METRIC.findall(text)}


@pytest.fixture(scope="module")
def metrics_text(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """/metrics of a gateway engine that shares its limits through Redis (the shared-limit
    series exist only then), fetched over its metrics listener."""
    tmp = tmp_path_factory.mktemp("gateway")
    with RedisServer(tmp / "redis") as redis:
        cfg: dict[str, Any] = json.loads((CONTRACT / "engine_config.json").read_text())
        cfg["spool_dir"] = str(tmp / "spool")
        cfg["metrics_listen"] = "127.0.0.1:0"
        cfg["shared"] = {"redis_url": redis.url}
        engine = _core.Engine(json.dumps(cfg).encode())
        engine.start()
        try:
            engine.load_snapshot((CONTRACT / "snapshot.json").read_bytes())
            url = f"http://{engine.metrics_address}/metrics"

            def scrape() -> str:
                with urllib.request.urlopen(url, timeout=5) as resp:
                    body: str = resp.read().decode()
                    return body

            # The shared-limit series appear with the refiller's first pass.
            wait_until(lambda: "onetoken_redis_up 1" in scrape(), timeout=10)
            yield scrape()
        finally:
            engine.stop(1.0)


def _exported(text: str) -> set[str]:
    """Series names in an exposition: a histogram's _bucket/_sum/_count are their own."""
    return {
        line.split("{", 1)[0].split(" ", 1)[0]
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def test_config_and_rules_load() -> None:
    result = _run("check", "config", PROMETHEUS / "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_fires_and_stays_quiet_as_its_unit_test_says() -> None:
    result = _run("test", "rules", RULE_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_unit_test_that_makes_it_fire() -> None:
    doc = yaml.safe_load(RULES.read_text())
    alerts = {r["alert"] for g in doc["groups"] for r in g["rules"] if "alert" in r}
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    fired = {
        t["alertname"]
        for case in tests
        for t in case.get("alert_rule_test", [])
        if t.get("exp_alerts")
    }
    assert alerts - fired == set()


def test_rules_read_only_metrics_a_gateway_serves(metrics_text: str) -> None:
    exported = _exported(metrics_text)
    used = _names(_rule_exprs())
    assert "onetoken_request_duration_seconds_bucket" in used
    assert used - _SCRAPER_SERIES - exported == set()
    # So do the Grafana panels that read the gateways through Prometheus.
    dashboard = _names(_dashboard_exprs())
    assert "onetoken_in_flight_requests" in dashboard
    assert dashboard - exported == set()
    # The unit tests feed the same names, or they would test rules against fiction.
    assert _names(_test_series()) - _SCRAPER_SERIES - exported == set()


def test_error_codes_the_rules_name_are_codes_the_gateway_counts(metrics_text: str) -> None:
    counted = set(re.findall(r'^onetoken_errors_total\{code="([^"]+)"\}', metrics_text, re.M))
    named = {c for e in _rule_exprs() for m in _CODE_MATCHER.findall(e) for c in m.split("|")}
    assert named
    assert named - counted == set()


def test_a_renamed_metric_would_be_caught(metrics_text: str) -> None:
    # The check above must be able to fail: a name the gateway does not serve is found.
    renamed = _names(["rate(onetoken_request_latency_seconds_bucket[5m])"])
    assert renamed - _exported(metrics_text) == {"onetoken_request_latency_seconds_bucket"}
