"""deploy/grafana: every dashboard is well formed, addresses the provisioned data sources,
and every ClickHouse query (panels and template variables), expanded as the Grafana
ClickHouse plugin expands it (tests/grafana.py), runs on the migrated schema in chDB with
calls and security events in it and returns rows in the shape its panel reads."""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from clickhouse_connect.driver.client import Client

from onetoken.analytics import clickhouse as ch
from onetoken.analytics.columns import (
    CALL_LOG_COLUMNS,
    CALL_LOG_READ,
    CALL_STATS_READ,
    call_log_table,
)
from onetoken.security.log import SecurityEvent, insert_rows
from onetoken.settings import Settings
from tests.grafana import ALL, TimeRange, Variable, expand, template_variables

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
CLICKHOUSE_TYPE = "grafana-clickhouse-datasource"
#: The plugin's query formats (sqlds FormatQueryOption): what the backend makes of the rows.
TIME_SERIES, TABLE = 0, 1
#: Panels that draw series over time, and those that show rows or one value.
SERIES_PANELS = frozenset({"timeseries"})
TABLE_PANELS = frozenset({"table", "stat", "bargauge", "piechart"})

POOL_DB = "onetoken_eu"
NOW = datetime.now(UTC).replace(second=0, microsecond=0)
# One org on the shared gateways, one pinned to a pool (its own database), one whose name
# the dimension tables do not have yet (dashboards show its id).
ORGS = {"org_acme": ("Acme", "onetoken"), "org_globex": ("Globex", POOL_DB),
        "org_unsynced": ("", "onetoken")}
PROVIDERS = {"prv_openai": ("OpenAI EU", "openai"), "prv_anthropic": ("Anthropic", "anthropic")}
MODELS = {"gpt-4o": "prv_openai", "claude-3-5-sonnet": "prv_anthropic"}
KEYS = {"key_1": ("org_acme", "ot-…a1", "ci"), "key_2": ("org_globex", "ot-…b2", "batch"),
        "key_3": ("org_unsynced", "ot-…c3", "")}


def _load(path: Path) -> dict[str, Any]:
    board: dict[str, Any] = json.loads(path.read_text())
    return board


def _provisioned_uids() -> dict[str, str]:
    doc = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "onetoken.yaml").read_text())
    return {d["uid"]: d["type"] for d in doc["datasources"]}


def _panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])


def _clickhouse_panels() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    return [
        (path.stem, board, panel)
        for path in DASHBOARDS
        for board in [_load(path)]
        for panel in _panels(board)
        if panel.get("datasource", {}).get("type") == CLICKHOUSE_TYPE
    ]


def _query_variables() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    return [
        (path.stem, board, var)
        for path in DASHBOARDS
        for board in [_load(path)]
        for var in board["templating"]["list"]
        if var["type"] == "query"
    ]


# -- structure ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_dashboard_is_well_formed(path: Path) -> None:
    board = _load(path)
    uids = _provisioned_uids()
    assert re.fullmatch(r"onetoken-[a-z-]+", board["uid"]) and board["uid"] == path.stem
    panels = list(_panels(board))
    assert panels
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique within a dashboard"
    names = [v["name"] for v in board["templating"]["list"]]
    assert len(names) == len(set(names))
    for panel in panels:
        where = f"{path.stem}: {panel['title']}"
        ds = panel["datasource"]
        assert uids.get(ds["uid"]) == ds["type"], f"{where}: data source {ds} is not provisioned"
        assert panel["targets"], where
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), where
        for target in panel["targets"]:
            assert target["datasource"] == ds, f"{where}: target and panel data sources differ"
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, where
        if ds["type"] == CLICKHOUSE_TYPE:
            for target in panel["targets"]:
                assert target["editorType"] == "sql", where
                expected = TIME_SERIES if panel["type"] in SERIES_PANELS else TABLE
                assert panel["type"] in SERIES_PANELS | TABLE_PANELS, where
                assert target["format"] == expected, f"{where}: format for a {panel['type']}"
                assert target["queryType"] == ("timeSeries" if expected == TIME_SERIES else "table")
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            assert uids.get(var["datasource"]["uid"]) == var["datasource"]["type"]
    # Panels do not overlap: Grafana would push them around and the layout would drift.
    cells = [(p["gridPos"]["x"] + dx, p["gridPos"]["y"] + dy) for p in panels
             for dx in range(p["gridPos"]["w"]) for dy in range(p["gridPos"]["h"])]
    assert len(cells) == len(set(cells)), f"{path.stem}: panels overlap"


def test_queries_read_every_log_database_as_the_package_does() -> None:
    """Calls of an org pinned to a pool live in its own database: a panel reads the rollup
    and call_log of every log database through the package's own merge() expressions."""
    for dashboard, _, panel in _clickhouse_panels():
        for target in panel["targets"]:
            sql = target["rawSql"]
            bare = re.sub(r"merge\(REGEXP\('[^']*'\), '\^(call_log|call_stats_1m)\$'\)", "", sql)
            assert not re.search(r"\b(call_log|call_stats_1m)\b", bare), (
                f"{dashboard}: {panel['title']} reads one database only")
            assert ("call_stats_1m" not in sql) or CALL_STATS_READ in sql
            assert ("call_log" not in sql) or f"{CALL_LOG_READ} FINAL" in sql


def test_expansion_follows_the_plugin() -> None:
    start = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    r = TimeRange(start, start + timedelta(hours=1), interval_s=0.5)
    org = {"org": Variable(["a", "b"], ["a", "b", "c"])}
    assert expand("$__conditionalAll(org_id IN (${org}), $org) AND f(x, y)", org, r) == (
        "org_id IN ('a','b') AND f(x, y)")
    assert expand("$__conditionalAll(org_id IN ($org), $org)",
                  {"org": Variable([ALL], ["a"])}, r) == "1=1"
    assert expand("$__timeFilter(ts) AND $__timeFilter_ms(ts)", org, r) == (
        "ts >= toDateTime(1767323045) AND ts <= toDateTime(1767326645) AND "
        "ts >= fromUnixTimestamp64Milli(1767323045000) "
        "AND ts <= fromUnixTimestamp64Milli(1767326645000)")
    # Below one second the plugin still groups by whole seconds.
    assert expand("$__interval_s, $__timeInterval(ts)", org, r) == (
        "1, toStartOfInterval(toDateTime(ts), INTERVAL 1 second)")
    assert expand("$__fromTime() < $__toTime", org, r) == (
        "toDateTime(1767323045) < toDateTime(1767326645)")
    single = {"org": Variable(["a"], ["a"], multi=False)}
    assert template_variables("'[[org]]' ${org:raw}", single) == "'a' a"
    with pytest.raises(KeyError, match="model"):
        expand("model IN ($model)", org, r)
    with pytest.raises(ValueError, match="unexpanded"):
        expand("$__timeGroup(ts, 1m)", org, r)
    # A $ inside a string literal is SQL, not a variable.
    assert expand("match(x, '^a$')", org, r) == "match(x, '^a$')"


def test_every_dashboard_is_provisioned_from_the_directory_it_is_in() -> None:
    doc = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "onetoken.yaml").read_text())
    (provider,) = doc["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"].endswith("/onetoken")
    assert {p.stem for p in DASHBOARDS} >= {
        "onetoken-traffic", "onetoken-errors-latency", "onetoken-limits-guard-security",
        "onetoken-gateway"}


def test_the_prometheus_dashboard_reads_what_the_rules_record_or_the_gateway_serves() -> None:
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "onetoken.rules.yml").read_text())
    recorded = {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}
    exprs = [t["expr"] for path in DASHBOARDS for p in _panels(_load(path))
             if p["datasource"]["type"] == "prometheus" for t in p["targets"]]
    assert exprs
    used_records = {n for e in exprs for n in re.findall(r"\bonetoken:[a-z0-9_:]+", e)}
    assert used_records and used_records <= recorded
    # Its raw metric names are checked against a real gateway's /metrics in
    # tests/unit/test_prometheus_rules.py, with the rules'.


# -- queries against data ------------------------------------------------------------------


@dataclass(frozen=True)
class World:
    client: Client
    time_range: TimeRange


def _call_rows(rng: random.Random, org: str, n: int) -> list[list[Any]]:
    rows = []
    keys = [k for k, (o, _, _) in KEYS.items() if o == org]
    for i in range(n):
        ts = NOW - timedelta(minutes=2 + rng.randrange(300), seconds=rng.randrange(60))
        model = rng.choice(list(MODELS))
        provider = MODELS[model]
        status, code, limit = 200, "", "pass"
        roll = rng.random()
        if roll < 0.08:
            status, code, limit, model, provider = 429, "rate_limited", "limited", "", ""
        elif roll < 0.14:
            status, code = 502, "upstream_error"
        elif roll < 0.18:
            status, code, model, provider = 401, "invalid_api_key", "", ""
        ok = status == 200
        # As the engine records them: only an upstream's stream reply is streamed, and the
        # time to first byte is when the response started (the whole call when not streamed).
        streamed = ok and rng.random() < 0.5
        prompt, completion = (rng.randrange(10, 2000), rng.randrange(1, 800)) if ok else (0, 0)
        latency = rng.randrange(80_000, 20_000_000)
        row = {
            "ts": int(ts.timestamp() * 1_000_000),
            "request_id": f"req-{org}-{i}",
            "org_id": org,
            "account_id": f"acc-{org}",
            "key_id": keys[0],
            "path": "/v1/chat/completions",
            "model_requested": model,
            "model_served": model,
            "provider": provider,
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "cached_tokens": prompt // 4,
            "usage_source": "upstream" if ok else "",
            "cost": (prompt * 2_500 + completion * 10_000) if ok else 0,
            "status": status,
            "error_code": code,
            "latency_us": latency,
            "ttfb_us": rng.randrange(20_000, latency) if streamed else latency,
            "streamed": int(streamed),
            "source_ip": "203.0.113.7",
            "user_agent": "openai-python",
            "rate_limit": limit,
            "attempts": 1,
            "guard_flags": rng.choice(["", "", "", "bank_card:2,phone:1", "email:1"]) if ok else "",
            "application_id": "",
            "images": 0,
            "audio_ms": 0,
            "characters": 0,
            "search_units": 0,
        }
        rows.append([row[c] for c in CALL_LOG_COLUMNS])
    return rows


def _seed(client: Client) -> None:
    rng = random.Random(12)  # noqa: S311 - reproducible test data, not a secret
    ch.ensure_pool_database(client, POOL_DB, 30)
    for org, (_, database) in ORGS.items():
        client.insert(call_log_table(database), _call_rows(rng, org, 400),
                      column_names=list(CALL_LOG_COLUMNS))
    synced = NOW
    client.insert("onetoken.dim_orgs", [[o, name, 0, synced] for o, (name, _) in ORGS.items()
                                        if name],
                  column_names=["org_id", "name", "deleted", "updated_at"])
    client.insert("onetoken.dim_providers",
                  [[p, "", name, vendor, "eu", 0, synced]
                   for p, (name, vendor) in PROVIDERS.items()],
                  column_names=["provider_id", "org_id", "name", "vendor", "region", "deleted",
                                "updated_at"])
    client.insert("onetoken.dim_models",
                  [["", m, PROVIDERS[p][1], 0, synced] for m, p in MODELS.items()],
                  column_names=["org_id", "model", "vendor", "deleted", "updated_at"])
    client.insert("onetoken.dim_keys", [[k, o, d, n, 0, synced] for k, (o, d, n) in KEYS.items()],
                  column_names=["key_id", "org_id", "display_id", "name", "deleted", "updated_at"])
    events = [
        SecurityEvent(kind=kind, severity=severity, org_id=org, actor_id="key_1",
                      ts=NOW - timedelta(minutes=rng.randrange(2, 300)),
                      detail={"count": rng.randrange(1, 50)})
        for kind, severity in (("auth.key_invalid_burst", "high"), ("key.many_sources", "medium"),
                               ("admin.role_changed", "info"), ("attack.blocked_ip", "critical"))
        for org in ("org_acme", "org_globex")
        for _ in range(5)
    ]
    insert_rows(lambda f: f(client), [e.row() for e in events])


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    # One chDB engine for the module (one data path per process), migrated as the service
    # migrates it: the rollup's materialized view fills call_stats_1m from the inserts.
    settings = Settings(data_dir=tmp_path_factory.mktemp("grafana"), call_log_ttl_days=30)
    client = ch.open_client(settings)
    try:
        _seed(client)
        yield World(client, TimeRange(NOW - timedelta(hours=6), NOW, interval_s=20))
    finally:
        client.close()


def _selections(board: dict[str, Any]) -> list[dict[str, Variable]]:
    """All on every variable, then one value of each (where the seed has calls for it)."""
    one = {"org": "org_globex", "model": "gpt-4o", "provider": "prv_openai",
           "severity": "high"}
    options = {"org": list(ORGS), "model": list(MODELS), "provider": list(PROVIDERS),
               "severity": ["critical", "high", "medium", "low", "info"]}
    names = [v["name"] for v in board["templating"]["list"]]
    assert set(names) <= set(one), f"no test selection for {set(names) - set(one)}"
    return [
        {n: Variable([ALL], options[n]) for n in names},
        {n: Variable([one[n]], options[n]) for n in names},
    ]


def _type(name: str) -> str:
    return re.sub(r"^(LowCardinality|Nullable)\((.*)\)$", r"\2", name)


def _numeric(type_name: str) -> bool:
    return re.match(r"^(U?Int\d+|Float\d+|Decimal)", _type(type_name)) is not None


def _check_time_series(where: str, names: list[str], types: list[str], rows: list[Any]) -> None:
    assert names[0] == "time" and _type(types[0]).startswith("DateTime"), (
        f"{where}: a time series query starts with its DateTime column `time`: {names}")
    values = [i for i, t in enumerate(types[1:], 1) if _numeric(t)]
    labels = [i for i, t in enumerate(types[1:], 1) if _type(t) == "String"]
    assert values, f"{where}: no numeric column to draw"
    assert len(values) + len(labels) == len(names) - 1, f"{where}: columns {names} {types}"
    times = [r[0] for r in rows]
    assert times == sorted(times), f"{where}: rows must come in time order (long to wide)"
    for i in values:
        assert any(r[i] is not None and math.isfinite(r[i]) for r in rows), (
            f"{where}: column {names[i]} has no value")


def _check_table(where: str, panel: dict[str, Any], names: list[str], types: list[str],
                 rows: list[Any]) -> None:
    for override in panel["fieldConfig"]["overrides"]:
        matcher = override["matcher"]
        if matcher["id"] == "byName":
            assert matcher["options"] in names, (
                f"{where}: field config names {matcher['options']!r}, the query returns {names}")
    if panel["type"] == "stat":
        assert len(rows) == 1 and any(_numeric(t) for t in types), f"{where}: one number"
        assert rows[0][0] > 0, f"{where}: the seeded data should count here"


@pytest.mark.parametrize(
    ("dashboard", "board", "panel"), _clickhouse_panels(),
    ids=[f"{d}:{p['title']}" for d, _, p in _clickhouse_panels()])
def test_panel_query_returns_what_its_panel_reads(
    world: World, dashboard: str, board: dict[str, Any], panel: dict[str, Any]
) -> None:
    for variables in _selections(board):
        for interval_s in (20, 900):
            time_range = TimeRange(world.time_range.start, world.time_range.end, interval_s)
            for target in panel["targets"]:
                sql = expand(target["rawSql"], variables, time_range)
                where = (f"{dashboard}: {panel['title']} ({target['refId']}, {variables}, "
                         f"{interval_s}s)")
                result = world.client.query(sql)
                names = list(result.column_names)
                types = [t.name for t in result.column_types]
                rows = result.result_rows
                assert rows, f"{where}: no rows\n{sql}"
                if target["format"] == TIME_SERIES:
                    _check_time_series(where, names, types, rows)
                else:
                    _check_table(where, panel, names, types, rows)


@pytest.mark.parametrize(
    ("dashboard", "board", "var"), _query_variables(),
    ids=[f"{d}:{v['name']}" for d, _, v in _query_variables()])
def test_template_variable_query_lists_names_for_ids(
    world: World, dashboard: str, board: dict[str, Any], var: dict[str, Any]
) -> None:
    for variables in _selections(board):
        result = world.client.query(expand(var["query"], variables, world.time_range))
        assert result.result_rows, f"{dashboard}: ${var['name']} offers nothing"
        # (value, text) as the plugin reads two columns: ids filter, names show.
        assert 1 <= len(result.column_names) <= 2


def test_latency_quantiles_are_ordered_and_in_the_seeded_range(world: World) -> None:
    board = _load(GRAFANA / "dashboards" / "onetoken-errors-latency.json")
    variables = {n: Variable([ALL], []) for n in ("org", "model", "provider")}
    bounds = (("Latency quantiles", 0.08, 20.0), ("Time to first token", 0.02, 20.0))
    for title, low, high in bounds:
        (panel,) = [p for p in _panels(board) if p["title"] == title]
        rows = world.client.query(
            expand(panel["targets"][0]["rawSql"], variables, world.time_range)).result_rows
        assert rows
        for _, p50, p95, p99 in rows:
            assert low <= p50 <= p95 <= p99 <= high, (title, p50, p95, p99)


def test_names_come_from_the_dimension_tables(world: World) -> None:
    board = _load(GRAFANA / "dashboards" / "onetoken-traffic.json")
    (panel,) = [p for p in _panels(board) if p["title"] == "Top organisations"]
    variables = {n: Variable([ALL], []) for n in ("org", "model", "provider")}
    result = world.client.query(expand(panel["targets"][0]["rawSql"], variables, world.time_range))
    orgs = {r[0] for r in result.result_rows}
    # The pool's org by its name, the unsynced one by its id.
    assert orgs == {"Acme", "Globex", "org_unsynced"}
    calls = {r[0]: r[1] for r in result.result_rows}
    raw = world.client.query(
        "SELECT org_id, count() FROM merge(REGEXP('^onetoken(_[a-z0-9_]{1,40})?$'), '^call_log$') "
        "FINAL GROUP BY org_id").result_rows
    assert calls == {ORGS[o][0] or o: n for o, n in raw}


def test_a_selected_org_narrows_what_a_panel_counts(world: World) -> None:
    board = _load(GRAFANA / "dashboards" / "onetoken-traffic.json")
    (panel,) = [p for p in _panels(board) if p["title"] == "Calls"]
    sql = panel["targets"][0]["rawSql"]

    def calls(org: list[str]) -> int:
        variables = {"org": Variable(org, list(ORGS)), "model": Variable([ALL], list(MODELS)),
                     "provider": Variable([ALL], list(PROVIDERS))}
        return int(world.client.query(expand(sql, variables, world.time_range)).result_rows[0][0])

    assert calls([ALL]) == 1200
    assert calls(["org_globex"]) == 400
    assert calls(["org_acme", "org_globex"]) == 800
