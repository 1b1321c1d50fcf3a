"""Read-only SQL with its audit record: the one function the control API, the ops
channel and the CLI run (docs/sql.md).

Every query, answered or refused, leaves an `analytics.sql` security event with the
query's hash and length (onetoken.analytics.sqlaccess.query_fingerprint), never its text.
"""

from __future__ import annotations

from typing import Any

from onetoken.analytics.sqlaccess import (
    READABLE_TABLES,
    SqlLimits,
    SqlQueryError,
    SqlResult,
    query_fingerprint,
    run_sql,
)
from onetoken.security.audit import Actor, event
from onetoken.security.permissions import PERMISSIONS, holds


def readable_tables(role: str, is_operator: bool) -> tuple[str, ...]:
    """The tables a caller's SQL may read: the security log only for those who may read
    it through the API (security.read); the rest for everyone who may run SQL."""
    may_read_security = holds(PERMISSIONS["security.read"], role, is_operator)
    return tuple(t for t in READABLE_TABLES if t != "security_log" or may_read_security)


def run_audited(
    actor: Actor,
    client: Any,
    query: str,
    *,
    org_id: str | None,
    limits: SqlLimits,
    tables: tuple[str, ...] = READABLE_TABLES,
) -> SqlResult:
    """run_sql for `actor`, recorded whatever the outcome. `org_id` None reads every org
    (operators who asked for it)."""
    detail: dict[str, Any] = {
        **query_fingerprint(query),
        "scope": "org" if org_id is not None else "all_orgs",
    }
    try:
        result = run_sql(client, query, org_id=org_id, limits=limits, tables=tables)
    except SqlQueryError as exc:
        event(actor, "analytics.sql", "low", org_id=org_id,
              detail={**detail, "outcome": exc.code})
        raise
    event(actor, "analytics.sql", "info", org_id=org_id, detail={
        **detail, "outcome": "ok", "rows": result.row_count, "truncated": result.truncated,
    })
    return result
