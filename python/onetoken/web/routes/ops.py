"""`/internal/ops/`: the reads a running control process performs for the CLI.

Each endpoint runs the function the CLI runs when it can open the stores itself, through
the server's ClickHouse client (web.deps.call_log_sink), so the two paths cannot
drift apart. Authenticated by the ops channel's bearer token only (no session, no role:
whoever holds the master secret holds the data dir); left out of the OpenAPI document and
of the permission matrix, which describe the public control API.

The audit needle arrives in the request body, never in the URL (which proxies and access
logs keep), and nothing here logs or echoes it.
"""

from __future__ import annotations

import logging
import time
from datetime import date, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field

from onetoken.analytics import queries
from onetoken.analytics.columns import CALL_LOG_COLUMNS
from onetoken.kit import channel
from onetoken.kit.errors import Unauthorized, Unprocessable
from onetoken.ops import PREFIX
from onetoken.web.deps import (
    ServiceUnavailable,
    SessionDep,
    StateDep,
    call_log_sink,
    get_state,
)
from onetoken.web.routes.analytics import (
    MAX_QUERY_CHARS,
    SqlError,
    SqlResponse,
    sql_response,
)

log = logging.getLogger("onetoken.ops")

#: Rows per `calls/export` page: a few MB of JSON, and the server's ClickHouse client is
#: held for one page at a time.
EXPORT_PAGE_ROWS = 10_000


def require_ops_token(request: Request) -> None:
    """Admit requests carrying the ops channel's token; 401 otherwise."""
    settings = get_state(request).settings
    expected = channel.channel_token(settings.secret_key_bytes(), channel.OPS)
    if not channel.bearer_matches(request.headers.get("authorization"), expected):
        raise Unauthorized("A valid ops channel token is required.")


router = APIRouter(
    prefix=PREFIX, include_in_schema=False, dependencies=[Depends(require_ops_token)]
)


class ReconcileLine(BaseModel):
    org_id: str
    day: date
    ledger_usage: int
    call_log_cost: int
    ledger_calls: int
    call_log_calls: int


class ReconcileResponse(BaseModel):
    lines: list[ReconcileLine]


@router.get("/billing/reconcile")
def billing_reconcile(
    state: StateDep,
    session: SessionDep,
    start: datetime | None = None,
    end: datetime | None = None,
    org: str | None = None,
) -> ReconcileResponse:
    """`onetoken billing reconcile`: ledger usage against call_log cost per org and UTC day."""
    from onetoken.billing.reconcile import reconcile

    lines = call_log_sink(state).read(lambda c: reconcile(session, c, start=start, end=end))
    return ReconcileResponse(
        lines=[
            ReconcileLine.model_validate(r, from_attributes=True)
            for r in lines
            if org is None or r.org_id == org
        ]
    )


class AuditRequest(BaseModel):
    needle: str = Field(min_length=1)


class AuditResponse(BaseModel):
    findings: list[str]
    problems: list[str]
    columns_scanned: int


@router.post("/audit/clickhouse")
def audit_clickhouse(body: AuditRequest, state: StateDep) -> AuditResponse:
    """The ClickHouse part of `onetoken audit-retention` (the CLI scans the files itself).
    Findings name table.column and a count, never the matching bytes."""
    from onetoken.audit import AuditReport, scan_clickhouse_client

    report = AuditReport()
    call_log_sink(state).read(
        lambda c: scan_clickhouse_client(state.settings, c, body.needle, report)
    )
    return AuditResponse(
        findings=report.findings, problems=report.problems,
        columns_scanned=report.columns_scanned,
    )


class ExportResponse(BaseModel):
    columns: list[str]
    rows: list[list[Any]]
    next_cursor: str | None


@router.get("/calls/export")
def calls_export(
    state: StateDep,
    org: str | None = None,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=EXPORT_PAGE_ROWS)] = EXPORT_PAGE_ROWS,
) -> ExportResponse:
    """One page of `onetoken calls export`, oldest first; pass `next_cursor` as `after`."""
    try:
        page = call_log_sink(state).read(
            lambda c: queries.export_page(c, org_id=org, after=after, limit=limit)
        )
    except ValueError as exc:
        raise Unprocessable("Malformed page cursor.", param="after") from exc
    return ExportResponse(
        columns=list(CALL_LOG_COLUMNS), rows=page.rows, next_cursor=page.next_cursor
    )


class StatsResponse(BaseModel):
    rows: list[dict[str, Any]]


@router.get("/calls/stats")
def calls_stats(
    state: StateDep,
    org: str,
    start: datetime,
    end: datetime,
    group_by: Annotated[str, Query(pattern="^(model|key|day|application)$")] = "model",
) -> StatsResponse:
    """`onetoken calls stats`: an org's calls, errors, tokens, cost and latency per model,
    key or day over [start, end) (the CLI resolves the window, so both paths agree)."""
    from onetoken.billing.statements import call_stats

    rows = call_log_sink(state).read(lambda c: call_stats(c, org, start, end, group_by))
    return StatsResponse(rows=rows)


class SqlRequest(BaseModel):
    query: str = Field(min_length=1, max_length=MAX_QUERY_CHARS)
    #: None with all_orgs: every org (an operator at the shell names the scope).
    org: str | None = Field(default=None, min_length=1, max_length=64)
    all_orgs: bool = False


@router.post("/sql")
def sql(body: SqlRequest, state: StateDep) -> SqlResponse:
    """`onetoken sql`: the control API's read-only SQL with the same refusals and limits
    (the operator at the shell is no less read-only than an analyst). The query travels in
    the body and is audited by hash and length, like the API's."""
    from onetoken.analytics.sqlaccess import SqlQueryError, limits_from
    from onetoken.security.audit import CliActor
    from onetoken.security.sqlaudit import run_audited

    if (body.org is None) == (not body.all_orgs):
        raise Unprocessable("Give org or all_orgs.", param="org")
    limits = limits_from(state.settings)
    actor = CliActor(org_id=body.org or "")
    try:
        result = call_log_sink(state).read(
            lambda c: run_audited(actor, c, body.query, org_id=body.org, limits=limits)
        )
    except SqlQueryError as exc:
        raise SqlError(exc.message, code=exc.code, param="query") from None
    return sql_response(result, body.org, "rows")


class BackupRequest(BaseModel):
    #: The staging directory's name under the data dir's backup-staging (the CLI's choice).
    name: str = Field(pattern=r"^[0-9a-f]{32}$")


@router.post("/backup")
def backup(body: BackupRequest, state: StateDep) -> dict[str, Any]:
    """`onetoken backup` while serving: this process holds chDB, so it copies the stores
    into the staging directory the CLI named, with ingestion paused so that the ledger
    and call_log hold the same batches; the CLI encrypts the copy and removes it. Answers
    the manifest (counts and versions)."""
    from dataclasses import asdict

    from onetoken.backup.snapshot import BackupError, audited, staging_dir, take

    runtime = state.runtime
    if runtime is None:
        raise ServiceUnavailable("Backups are taken by a serving control process.")
    try:
        staging = staging_dir(state.settings, body.name)
        # Up to the journals' ends first, so the backup holds the calls made until now.
        runtime.ingestor.catch_up()
        # The round lock before the sink's: an ingestion round takes them in that order.
        with runtime.ingestor.paused():
            paused_at = time.monotonic()
            manifest = call_log_sink(state).read(lambda c: take(state.settings, c, staging))
            paused_ms = round((time.monotonic() - paused_at) * 1000)
    except BackupError as exc:
        raise Unprocessable(str(exc)) from None
    # How long ingestion waited: what a backup costs a serving deployment.
    log.info("backup.snapshot_taken", extra={"latency_ms": paused_ms,
                                              "rows": manifest.call_log_rows})
    audited("backup.taken", manifest, serving=True)
    return asdict(manifest)
