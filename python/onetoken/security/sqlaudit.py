"""Read-only SQL with its audit record: the one function the control API, the ops
channel and the CLI run (docs/sql.md).

Every query, answered or refused, leaves an `analytics.sql` security event with the
query's hash and length (onetoken.analytics.sqlaccess.query_fingerprint), never its text.
"""

from __future__ import annotations

from typing import Any

from onetoken.analytics.sqlaccess import (
    SqlLimits,
    SqlQueryError,
    SqlResult,
    query_fingerprint,
    run_sql,
)
from onetoken.security.audit import Actor, event


def run_audited(
    actor: Actor, client: Any, query: str, *, org_id: str | None, limits: SqlLimits
) -> SqlResult:
    """run_sql for `actor`, recorded whatever the outcome. `org_id` None reads every org
    (operators who asked for it)."""
    detail: dict[str, Any] = {
        **query_fingerprint(query),
        "scope": "org" if org_id is not None else "all_orgs",
    }
    try:
        result = run_sql(client, query, org_id=org_id, limits=limits)
    except SqlQueryError as exc:
        event(actor, "analytics.sql", "low", org_id=org_id,
              detail={**detail, "outcome": exc.code})
        raise
    event(actor, "analytics.sql", "info", org_id=org_id, detail={
        **detail, "outcome": "ok", "rows": result.row_count, "truncated": result.truncated,
    })
    return result
