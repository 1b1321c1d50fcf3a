"""docs/analytics.md, generated: `python -m onetoken.analytics.docs docs/analytics.md`
(`make docs`).

Every table and column comes from a freshly migrated ClickHouse (system.tables and
system.columns), so a table a migration adds shows up without touching this module; what
each call_log column means comes from the engine's declaration (CALL_LOG_DOCS), and every
other column's from its ClickHouse comment. A column with neither stops the generator:
the page never lists a column without saying what it holds. The example queries are
examples.sql (onetoken.analytics.examples).
"""

from __future__ import annotations

import re
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from onetoken.analytics.clickhouse import (
    LOGIN_KINDS_CONDITION,
    current_ttl,
    default_dsn,
    open_client,
)
from onetoken.analytics.columns import CALL_LOG_DOCS, SHARED_DATABASE
from onetoken.analytics.examples import Example, load_examples
from onetoken.settings import Settings

#: The settings that set a table's retention (ensure_ttls rewrites its TTL from them at
#: every start); a table missing here keeps the TTL its migration gives it, if any.
RETENTION_SETTINGS: Final[dict[str, tuple[str, ...]]] = {
    "call_log": ("call_log_ttl_days",),
    # Its TTL moves with call_log's (analytics.clickhouse.set_call_log_ttl_days).
    "call_stats_1m": ("call_log_ttl_days",),
    "security_log": ("security_log_ttl_days", "login_records_ttl_days"),
}

#: A sentence about a table, where system.tables has no comment for it.
TABLE_NOTES: Final[dict[str, str]] = {
    "call_log": "One row per request a gateway answered: call metadata only, never request "
    "or response content. The engine writes the rows through its journal "
    "(docs/metering.md).",
    "security_log": "Security and risk events: who, what kind, how severe, and metadata.",
    "schema_migrations": "Which of the migrations in onetoken/analytics/sql have run.",
}


class DocsError(Exception):
    """The schema holds something the page cannot describe (a column without a comment)."""


@dataclass(frozen=True)
class DefaultSettings:
    """The retention settings at their defaults (ClickHouseSettings and what ensure_ttls
    reads), whatever the environment says: the page shows the defaults."""

    data_dir: Path
    clickhouse_dsn: str
    call_log_ttl_days: int
    security_log_ttl_days: int
    login_records_ttl_days: int


def default_settings(data_dir: Path) -> DefaultSettings:
    fields = Settings.model_fields
    return DefaultSettings(
        data_dir=data_dir,
        clickhouse_dsn=default_dsn(data_dir),
        call_log_ttl_days=int(fields["call_log_ttl_days"].default),
        security_log_ttl_days=int(fields["security_log_ttl_days"].default),
        login_records_ttl_days=int(fields["login_records_ttl_days"].default),
    )


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    description: str


@dataclass(frozen=True)
class Table:
    name: str
    engine: str
    sorting_key: str
    partition_key: str
    ttl: str
    comment: str
    #: The table a materialized view writes to; "" for other engines.
    feeds: str
    columns: tuple[Column, ...]


_VIEW_ENGINES: Final = frozenset({"MaterializedView", "View"})
_VIEW_TARGET = re.compile(r"\bTO\s+([A-Za-z0-9_.`]+)")


def read_tables(client: Any, database: str = SHARED_DATABASE) -> list[Table]:
    """The tables of `database` with their columns; DocsError names each column that has
    no description."""
    tables = client.query(
        "SELECT name, engine, sorting_key, partition_key, comment, create_table_query "
        "FROM system.tables WHERE database = {db:String} AND NOT startsWith(name, '.') "
        "ORDER BY name",
        parameters={"db": database},
    ).result_rows
    columns = client.query(
        "SELECT table, name, type, comment FROM system.columns WHERE database = {db:String} "
        "ORDER BY table, position",
        parameters={"db": database},
    ).result_rows
    views = {str(t[0]) for t in tables if t[1] in _VIEW_ENGINES}
    by_table: dict[str, list[Column]] = {}
    undescribed: list[str] = []
    for table, name, ch_type, comment in columns:
        if table in views:
            # A view's columns are those of the table it feeds: described there.
            continue
        description = CALL_LOG_DOCS.get(name, "") if table == "call_log" else str(comment)
        if not description.strip():
            undescribed.append(f"{database}.{table}.{name}")
        by_table.setdefault(str(table), []).append(Column(str(name), str(ch_type), description))
    if undescribed:
        raise DocsError(
            "columns without a description (a COMMENT in their migration; call_log's are the "
            "engine's declaration): " + ", ".join(undescribed)
        )
    out: list[Table] = []
    for name, engine, sorting_key, partition_key, comment, create in tables:
        target = _VIEW_TARGET.search(str(create)) if name in views else None
        out.append(Table(
            name=str(name),
            engine=str(engine),
            sorting_key=str(sorting_key),
            partition_key=str(partition_key),
            ttl="" if name in views else current_ttl(client, f"{database}.{name}"),
            comment=str(comment) or TABLE_NOTES.get(str(name), ""),
            feeds=target[1].replace("`", "") if target else "",
            columns=tuple(by_table.get(str(name), ())),
        ))
    return out


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _retention(table: Table) -> str:
    settings = RETENTION_SETTINGS.get(table.name)
    if not table.ttl:
        return "Retention: kept until deleted (no TTL)."
    line = f"Retention: `TTL {table.ttl}` with the defaults"
    if settings is None:
        return line + ", as its migration sets it."
    fields = Settings.model_fields
    named = ", ".join(
        f"`ONETOKEN_{s.upper()}` (default {fields[s].default} days)" for s in settings
    )
    return (
        f"{line}; set by {named}, which the control plane applies at every start "
        "(`ALTER TABLE ... MODIFY TTL`, docs/retention.md)."
    )


def _table_section(table: Table) -> list[str]:
    out = [f"### {SHARED_DATABASE}.{table.name}", ""]
    if table.comment:
        out += [table.comment, ""]
    if table.feeds:
        out += [
            f"Materialized view: each insert into its source table also goes, aggregated, "
            f"to `{table.feeds}`. It holds no rows of its own.",
            "",
        ]
        return out
    shape = [f"Engine `{table.engine}`"]
    if table.sorting_key:
        shape.append(f"sorted by `({table.sorting_key})`")
    if table.partition_key:
        shape.append(f"partitioned by `{table.partition_key}`")
    out += [", ".join(shape) + ".", "", _retention(table), ""]
    out += ["| column | type | meaning |", "|---|---|---|"]
    out += [f"| `{c.name}` | `{c.type}` | {_cell(c.description)} |" for c in table.columns]
    out.append("")
    return out


def _example_section(example: Example) -> list[str]:
    out = [f"### {example.name}", "", example.description, ""]
    out.append("Returns " + ", ".join(f"`{c}`" for c in example.columns) + ".")
    if example.needs:
        out.append("Reads " + ", ".join(f"`{n}`" for n in example.needs) + ".")
    out += ["", "```sql", example.sql, "```", ""]
    return out


_INTRO: Final = """\
# Analytics: the ClickHouse tables

<!-- Generated by `python -m onetoken.analytics.docs docs/analytics.md` (`make docs`) from a
freshly migrated ClickHouse, the engine's call_log declaration (rust/gateway/src/call_log.rs)
and python/onetoken/analytics/examples.sql. Edit those and regenerate, not this file:
tests/unit/test_analytics_docs.py fails while the two differ. -->

For analysts and SREs who query what onetoken records. Every request a gateway answers
leaves one row in `call_log`: who called (org, account, key), which model and provider
served it, tokens, cost, status, latency. Metadata only: no prompt, response or other body
content is ever stored (docs/security.md). Security and risk events go to `security_log`.

Where to query: `onetoken sql` and the control API's read-only SQL endpoint (SELECT only,
rows limited to your org: [sql.md](sql.md)); the Grafana dashboards in `deploy/grafana`
read the same tables. The embedded default is chDB under `<data_dir>/clickhouse`; a
ClickHouse server or cluster is set with `ONETOKEN_CLICKHOUSE_DSN`
([clickhouse-cluster.md](clickhouse-cluster.md)). The column meanings below are also the
columns' ClickHouse comments: `DESCRIBE TABLE onetoken.call_log` shows them.

## Reading it right

**Duplicates.** Records reach ClickHouse at least once. Every insert carries an
`insert_deduplication_token` naming its batch, so ClickHouse drops a batch sent again
within its deduplication window (`non_replicated_deduplication_window`, the last 1000
inserts; `replicated_deduplication_window` on a cluster). A batch re-read after a restart
can still land twice ([metering.md](metering.md), Idempotency). `call_log` and
`security_log` are `ReplacingMergeTree` tables sorted by `(org_id, ts, request_id)` and
`(org_id, ts, event_id)`: copies of one record collapse into one row, but only when
ClickHouse merges the parts holding them, at a time of its choosing. So:

- Sums (cost, tokens) and exact counts: read `FROM onetoken.call_log FINAL`, which
  collapses copies while reading.
- Counting calls without `FINAL` (cheaper over long ranges): `uniqExact(request_id)`
  (`uniqExact(event_id)` for events). `count()` without `FINAL` counts copies too.

**Money.** `cost` is an integer of nano-units: 10^-9 of the deployment's currency
(`ONETOKEN_CURRENCY`, default USD), so sums are exact. To show units of the currency
without rounding, divide as a decimal that holds every nano-unit:
`toDecimal128(sum(cost), 9) / 1000000000`, never a float (`sum(cost) / 1e9`). Invoices and
statements come from the ledger in the control DB, not from ClickHouse: `onetoken billing
reconcile` checks that both agree per org and day ([metering.md](metering.md)).

**Time.** `ts` is the request's start in UTC with microsecond precision; durations
(`latency_us`, `ttfb_us`) are microseconds. Partitions are months of `ts`: a filter on
`ts` skips whole months, and `org_id` first in the sort key makes one org's range cheap.

**Errors.** A call failed when `error_code` is not empty: it is the code of the
OpenAI-shaped error the client got. Most failures also have `status >= 400` (499: the
client went away first), but a stream that broke after its 200 went out keeps status 200
with `upstream_stream_cut` or `shutting_down`.

## Pools

A dedicated gateway pool may keep its orgs' call records in a database of its own,
`onetoken_<name>` ([pools.md](pools.md)), holding its own `call_log` and
`schema_migrations` with the same columns. To read every call, shared and pooled, select
from all log databases as one table:

```sql
SELECT ... FROM merge(REGEXP('^onetoken(_[a-z0-9_]{1,40})?$'), '^call_log$') ...
```

`FINAL` applies to each table read, and the `_database` column says which database a
row came from. The examples below read the shared database, but for one that shows
this.
"""

_ROLLUP: Final = """\
## Rollup

`call_stats_1m` holds, per minute, org, served model, provider, status and error code, the
number of calls, tokens, cost and latency quantile states; a materialized view fills it on
every insert into `call_log`, so dashboards stay fast at billions of rows. Read it with
`sum(...)` over the counters and `quantilesTDigestMerge(0.5, 0.95, 0.99)(latency_us_q)`
over the states. It is for dashboards: each insert is counted as it arrives, so a batch
inserted twice (a replay ClickHouse did not deduplicate) counts twice there, while
`call_log FINAL` reads it once. Exact money comes from `call_log FINAL` and the ledger.
"""

_NAMES: Final = """\
## Names

`call_log` holds ids (`org_id`, `provider`, `key_id`, `application_id`); their names live
in the control DB, which copies them into the dimension tables `dim_orgs`,
`dim_providers`, `dim_models`, `dim_keys` and `dim_applications` of the shared database
(names and display ids only, never secrets). They are
`ReplacingMergeTree(updated_at)`: read them with `FINAL` for the latest version of each
row, as the examples below do. A deleted thing keeps its row with `deleted = 1`, so past
calls keep their names; an id the tables do not know yet joins to empty names.
"""

_OUTRO: Final = """\
## See also

- [sql.md](sql.md): read-only SQL over these tables (`onetoken sql`, the control API).
- `deploy/grafana`: dashboards over these tables.
- [retention.md](retention.md): retention periods, erasure of an account's rows.
- [metering.md](metering.md): how records get from the gateway to `call_log` and the ledger.
- [clickhouse-cluster.md](clickhouse-cluster.md): the same tables on a sharded cluster.
"""


def render(client: Any) -> str:
    """The page, from the schema `client` sees (migrated, TTLs at their defaults)."""
    tables = read_tables(client)
    names = {t.name for t in tables}
    out = [_INTRO]
    if "call_stats_1m" in names:
        out.append(_ROLLUP)
    if any(n.startswith("dim_") for n in names):
        out.append(_NAMES)
    body = ["## Tables", ""]
    body += [
        "Every table of the shared database `onetoken`, as the migrations create it. "
        f"`security_log` keeps login records (kinds where `{LOGIN_KINDS_CONDITION}`) for "
        "their own period.",
        "",
    ]
    for table in tables:
        body += _table_section(table)
    body += ["## Example queries", ""]
    for example in load_examples():
        body += _example_section(example)
    out.append("\n".join(body))
    out.append(_OUTRO)
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    """Write the page to the path given (stdout without one), from a chDB migrated in a
    temporary directory."""
    args = list(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory(prefix="onetoken-docs-") as tmp:
        client = open_client(default_settings(Path(tmp)))
        try:
            page = render(client)
        finally:
            client.close()
    if args:
        Path(args[0]).write_text(page, encoding="utf-8")
    else:
        sys.stdout.write(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
