"""Export of one's own data: account and organization fields, API keys (display ids
only), sign-in sources, acceptances of the terms of service, the tickets it opened or
wrote in (with every message and its attachments' metadata), the account's security
events and its call statistics.

Call statistics are aggregates per UTC day and model of the calls made with the
account's keys (call metadata never holds content in the first place).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from onetoken.analytics.columns import CALL_LOG_READ, SECURITY_LOG_TABLE
from onetoken.keys.models import ApiKey
from onetoken.kit.money import format_amount
from onetoken.kit.spreadsheet import formula_safe
from onetoken.orgs.models import Account, Org, TermsAcceptance
from onetoken.security.models import LoginSource
from onetoken.tickets import service as tickets_service

MAX_SECURITY_EVENTS = 10_000

CALL_STAT_COLUMNS = (
    "day",
    "model",
    "calls",
    "errors",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "cost",
)
SECURITY_COLUMNS = ("ts", "kind", "severity", "source_ip", "user_agent")
KEY_COLUMNS = ("id", "name", "display", "status", "created_at", "expires_at", "revoked_at")


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def account_part(session: Session, account: Account) -> dict[str, Any]:
    org = session.get(Org, account.org_id)
    return {
        "id": account.id,
        "org_id": account.org_id,
        "org_name": org.name if org else None,
        "login_name": account.login_name,
        "email": account.email,
        "mobile": account.mobile,
        "display_name": account.display_name,
        "role": account.role,
        "status": account.status,
        "auth_status": account.auth_status,
        "created_at": _iso(account.created_at),
        "last_login_at": _iso(account.last_login_at),
    }


def keys_part(session: Session, account: Account) -> list[dict[str, Any]]:
    keys = session.scalars(
        select(ApiKey)
        .where(
            ApiKey.org_id == account.org_id,
            or_(
                ApiKey.owner_id == account.id,
                and_(ApiKey.owner_id.is_(None), ApiKey.created_by == account.id),
            ),
        )
        .order_by(ApiKey.created_at, ApiKey.id)
    )
    return [
        {
            "id": k.id,
            "name": k.name,
            "display": k.display,
            "status": k.status,
            "created_at": _iso(k.created_at),
            "expires_at": _iso(k.expires_at),
            "revoked_at": _iso(k.revoked_at),
        }
        for k in keys
    ]


def login_sources_part(session: Session, account: Account) -> list[dict[str, Any]]:
    rows = session.scalars(
        select(LoginSource).where(LoginSource.account_id == account.id).order_by(
            LoginSource.first_seen
        )
    )
    return [
        {"kind": r.kind, "value": r.value, "first_seen": _iso(r.first_seen),
         "last_seen": _iso(r.last_seen)}
        for r in rows
    ]


def terms_part(session: Session, account: Account) -> list[dict[str, Any]]:
    rows = session.scalars(
        select(TermsAcceptance).where(TermsAcceptance.account_id == account.id).order_by(
            TermsAcceptance.accepted_at
        )
    )
    return [
        {"version": r.version, "org_id": r.org_id, "accepted_at": _iso(r.accepted_at),
         "source_ip": r.source_ip}
        for r in rows
    ]


def call_statistics(client: Any, org_id: str, account_id: str) -> list[dict[str, Any]]:
    result = client.query(
        "SELECT toString(toDate(ts)) AS day, model_requested, count(), "  # noqa: S608
        "countIf(status >= 400), sum(prompt_tokens), sum(completion_tokens), "
        "sum(cached_tokens), sum(cost) "
        f"FROM {CALL_LOG_READ} FINAL "
        "WHERE org_id = {org:String} AND account_id = {account:String} "
        "GROUP BY day, model_requested ORDER BY day, model_requested",
        parameters={"org": org_id, "account": account_id},
    )
    return [
        {
            "day": str(day),
            "model": str(model),
            "calls": int(calls),
            "errors": int(errors),
            "prompt_tokens": int(pt),
            "completion_tokens": int(ct),
            "cached_tokens": int(cached),
            "cost": format_amount(int(cost)),
        }
        for day, model, calls, errors, pt, ct, cached, cost in result.result_rows
    ]


def security_events(client: Any, org_id: str, account_id: str) -> list[dict[str, Any]]:
    result = client.query(
        "SELECT ts, kind, severity, source_ip, user_agent "  # noqa: S608 (a fixed table name)
        f"FROM {SECURITY_LOG_TABLE} FINAL "
        "WHERE org_id = {org:String} AND (actor_id = {account:String} "
        "OR subject_id = {account:String}) ORDER BY ts DESC LIMIT {limit:UInt32}",
        parameters={"org": org_id, "account": account_id, "limit": MAX_SECURITY_EVENTS},
    )
    return [
        {
            "ts": ts.isoformat() if hasattr(ts, "isoformat") else str(ts),
            "kind": str(kind),
            "severity": str(sev),
            "source_ip": str(ip),
            "user_agent": str(ua),
        }
        for ts, kind, sev, ip, ua in result.result_rows
    ]


def build(
    session: Session,
    account: Account,
    run: Callable[[Callable[[Any], Any]], Any] | None,
) -> dict[str, Any]:
    """The whole export; the ClickHouse parts are null when no server runs."""
    out: dict[str, Any] = {
        "format": "onetoken-account-export/1",
        "account": account_part(session, account),
        "keys": keys_part(session, account),
        "login_sources": login_sources_part(session, account),
        "terms_acceptances": terms_part(session, account),
        "tickets": tickets_service.export_part(session, account.org_id, account.id),
        "call_statistics": None,
        "security_events": None,
    }
    if run is not None:
        out["call_statistics"] = run(lambda c: call_statistics(c, account.org_id, account.id))
        out["security_events"] = run(lambda c: security_events(c, account.org_id, account.id))
    return out


def to_csv(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    # The default "\r\n" terminator: the writer quotes a cell holding any of its
    # characters, so a bare "\r" in a value cannot start a row of its own.
    writer = csv.writer(buf)
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if row.get(c) is None else _cell(row.get(c)) for c in columns])
    return buf.getvalue()


def _cell(value: Any) -> str:
    return formula_safe(value) if isinstance(value, str) else json.dumps(value)


def account_csv(account: dict[str, Any]) -> str:
    return to_csv([{"field": k, "value": v} for k, v in account.items()], ("field", "value"))
