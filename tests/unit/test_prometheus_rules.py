"""deploy/prometheus: the rules load, their unit tests pass (promtool), and every metric
they read is one a real gateway, a real `onetoken control` or a real `onetoken ingest`
serves on /metrics, so renaming a metric in rust/gateway/src/metrics.rs or
python/onetoken/ingest/metrics.py fails here instead of silencing an alert in production."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import yaml

from onetoken import _core
from onetoken.db.migrate import upgrade
from onetoken.db.session import make_engine
from tests.support import (
    TEST_SECRET,
    MetricsProcess,
    RedisServer,
    parse_metrics,
    sample,
    wait_until,
)
from tests.unit.journal_files import append, live, record

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


# ClickHouse where nothing listens: the processes start without one (and chDB's start-up
# cost), and the call_log consumer's backlog is there to see.
_NO_CLICKHOUSE = "http://127.0.0.1:9/onetoken"


def _caught_up(proc: MetricsProcess, instance: str, size: int) -> str | None:
    """The scrape once the process's ingestion has read the instance's journal into the
    ledger (the call_log consumer still waits for ClickHouse)."""
    text = proc.scrape()
    m = parse_metrics(text)
    labels = {"engine_instance": instance}
    unread = "onetoken_journal_unread_bytes"
    try:
        done = (sample(m, unread, consumer="ledger", **labels) == 0
                and sample(m, unread, consumer="call_log", **labels) == size)
    except KeyError:
        return None
    return text if done else None


@pytest.fixture(scope="module")
def process_metrics(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """/metrics of a real `onetoken control` (limits shared through a private Redis: the
    cap publisher's series exist only then) and a real `onetoken ingest`, each with a live
    engine's journal in its spool dir, scraped once its ingestion has read it."""
    tmp = tmp_path_factory.mktemp("processes")
    with ExitStack() as stack:
        redis = stack.enter_context(RedisServer(tmp / "redis"))
        env = {"ONETOKEN_SECRET_KEY": TEST_SECRET, "ONETOKEN_CLICKHOUSE_DSN": _NO_CLICKHOUSE,
               "ONETOKEN_FLUSH_INTERVAL_MS": "100"}
        dirs = {name: tmp / name for name in ("control", "ingest")}
        sizes = {}
        for name, data in dirs.items():
            env[f"{name}_db"] = f"sqlite:///{data / 'control.db'}"
            stack.enter_context(live(data / "spool", f"i_{name}"))
            path = append(data / "spool", f"i_{name}", 1, [record("r1"), record("r2")])
            sizes[name] = path.stat().st_size
        # Ingest never migrates: the control plane's migrate step has run.
        engine = make_engine(env["ingest_db"])
        upgrade(engine)
        engine.dispose()
        common = {k: v for k, v in env.items() if k.startswith("ONETOKEN_")}
        control = MetricsProcess(
            ["control"],
            {**common, "ONETOKEN_DATA_DIR": str(dirs["control"]),
             "ONETOKEN_DATABASE_URL": env["control_db"], "ONETOKEN_REDIS_URL": redis.url,
             "ONETOKEN_CONTROL_LISTEN": "127.0.0.1:0",
             "ONETOKEN_CONTROL_METRICS_LISTEN": "127.0.0.1:0"},
            tmp / "control-out", "control metrics: ",
        )
        ingest = MetricsProcess(
            ["ingest", "--metrics-listen", "127.0.0.1:0"],
            {**common, "ONETOKEN_DATA_DIR": str(dirs["ingest"]),
             "ONETOKEN_DATABASE_URL": env["ingest_db"]},
            tmp / "ingest-out", "metrics: ",
        )
        # Both asked to stop at once: each catches up with its journal on the way out.
        stack.callback(lambda: [p.stop() for p in (control, ingest)])
        stack.callback(lambda: [p.terminate() for p in (control, ingest)])
        control.wait_ready()
        ingest.wait_ready()
        # One request through the control API, so that its request series exist.
        api = wait_until(lambda: control.line("control: "), message="the control API")
        with urllib.request.urlopen(f"{api}/healthz", timeout=10) as resp:  # noqa: S310
            assert resp.status == 200
        yield {
            name: wait_until(lambda p=proc, n=name: _caught_up(p, f"i_{n}", sizes[n]),
                             timeout=30, message=f"{name} ingested its journal")
            for name, proc in (("control", control), ("ingest", ingest))
        }


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


def test_rules_read_only_metrics_a_gateway_or_the_control_and_ingest_processes_serve(
    metrics_text: str, process_metrics: dict[str, str]
) -> None:
    exported = _exported(metrics_text) | _exported(process_metrics["control"])
    used = _names(_rule_exprs())
    assert "onetoken_request_duration_seconds_bucket" in used
    assert {"onetoken_journal_unread_bytes", "onetoken_journal_oldest_unread_age_seconds",
            "onetoken_security_log_spool_files", "onetoken_cap_publisher_failing_rounds",
            "onetoken_control_requests_total"} <= used
    assert used - _SCRAPER_SERIES - exported == set()
    # So do the Grafana panels that read the gateways through Prometheus.
    dashboard = _names(_dashboard_exprs())
    assert {"onetoken_in_flight_requests", "onetoken_cap_publisher_failing_rounds"} <= dashboard
    assert dashboard - exported == set()
    # The unit tests feed the same names, or they would test rules against fiction.
    assert _names(_test_series()) - _SCRAPER_SERIES - exported == set()


def test_error_codes_the_rules_name_are_codes_the_gateway_counts(metrics_text: str) -> None:
    counted = set(re.findall(r'^onetoken_errors_total\{code="([^"]+)"\}', metrics_text, re.M))
    # The gateway's error codes; the control API's status codes (code=~"5..") are others.
    named = {
        c
        for e in _rule_exprs()
        if "onetoken_errors_total" in e
        for m in _CODE_MATCHER.findall(e)
        for c in m.split("|")
    }
    assert named
    assert named - counted == set()


def test_a_renamed_metric_would_be_caught(metrics_text: str) -> None:
    # The check above must be able to fail: a name the gateway does not serve is found.
    renamed = _names(["rate(onetoken_request_latency_seconds_bucket[5m])"])
    assert renamed - _exported(metrics_text) == {"onetoken_request_latency_seconds_bucket"}


def test_an_ingest_process_serves_what_the_control_process_does_but_its_own_parts(
    process_metrics: dict[str, str],
) -> None:
    # Where ingestion runs apart (`onetoken ingest` beside each gateway), the journal,
    # ingestion and spool alerts read it there: only the control API's, the cap
    # publisher's and the SIEM forwarder's series are the control process's alone.
    control = _exported(process_metrics["control"])
    ingest = _exported(process_metrics["ingest"])
    assert ingest <= control
    assert {n for n in control - ingest if not n.startswith(
        ("onetoken_control_", "onetoken_cap_publisher_", "onetoken_siem_"))} == set()


def test_the_processes_expositions_pass_promtool(process_metrics: dict[str, str]) -> None:
    for name, text in process_metrics.items():
        result = subprocess.run([_promtool(), "check", "metrics"], input=text,
                                capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0, (name, result.stdout + result.stderr)
