"""The security-log side of incidents: the events an incident is made of, read from
ClickHouse's `security_log` (where they stay immutable) through the caller's runner."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from onetoken.analytics.columns import SECURITY_LOG_TABLE
from onetoken.security import log as security_log
from onetoken.security.log import SECURITY_LOG_COLUMNS, ClientRunner


@dataclass(frozen=True, slots=True)
class LoggedEvent:
    """One row of the security log (metadata only, as the writer shaped it)."""

    ts: datetime
    event_id: str
    kind: str
    severity: str
    org_id: str
    actor_id: str
    subject_id: str
    source_ip: str
    user_agent: str
    detail: dict[str, Any]


def fetch(
    run: ClientRunner, event_ids: Sequence[str], *, org_id: str | None
) -> dict[str, LoggedEvent]:
    """The logged events among `event_ids`, by id; only `org_id`'s when it is given (an
    event of another org is then simply not found)."""
    if not event_ids:
        return {}
    writer = security_log.current()
    if writer is not None:
        writer.flush(run)  # an event recorded a moment ago can be handled now
    columns = ", ".join(
        "toUnixTimestamp64Micro(ts)" if c == "ts" else c for c in SECURITY_LOG_COLUMNS
    )
    where = ["event_id IN {ids:Array(String)}"]
    params: dict[str, Any] = {"ids": list(dict.fromkeys(event_ids))}
    if org_id is not None:
        where.append("org_id = {org:String}")
        params["org"] = org_id
    sql = (
        f"SELECT {columns} FROM {SECURITY_LOG_TABLE} FINAL WHERE "  # noqa: S608 (fixed names)
        + " AND ".join(where)
    )
    rows = run(lambda c: c.query(sql, parameters=params).result_rows)
    out: dict[str, LoggedEvent] = {}
    for row in rows:
        fields = dict(zip(SECURITY_LOG_COLUMNS, row, strict=True))
        fields["ts"] = datetime.fromtimestamp(int(row[0]) / 1_000_000, UTC)
        fields["detail"] = orjson.loads(row[-1]) if row[-1] else {}
        event = LoggedEvent(**fields)
        out[event.event_id] = event
    return out
