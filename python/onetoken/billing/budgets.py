"""Org billing settings (price factor, budgets, low-balance threshold), the spend windows
the engine enforces org and key budgets with, and the webhook events they raise. (Key
budgets themselves are key limits, set through the keys API.)

The engine enforces a budget from the snapshot: `limits.budget_day/budget_month` and
`usage {day, month, spent_day, spent_month, spent_mark}` (docs/snapshot.md). spent_day and
spent_month are usage entries in the ledger for the current UTC day and month; spent_mark
is the engine's own counter already included in them, read under the supervisor's lock.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import case, func, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from onetoken.analytics.queries import EPOCH
from onetoken.billing.models import DEFAULT_PRICE_FACTOR_PPM, BillingNotice, LedgerEntry, OrgBilling
from onetoken.billing.service import MAX_BALANCE_NANO, MONEY_MOVED
from onetoken.db.base import utcnow
from onetoken.db.session import bump_revision
from onetoken.keys.models import ApiKey, Application

log = logging.getLogger("onetoken.billing")



@dataclass(frozen=True, slots=True)
class Window:
    """The current UTC day and month, as the snapshot names them."""

    day: int
    month: int
    day_start: datetime
    month_start: datetime

    @classmethod
    def at(cls, now: datetime) -> Window:
        now = now.astimezone(UTC)
        day_start = now.replace(hour=0, minute=0, second=0, microsecond=0)
        month_start = day_start.replace(day=1)
        return cls(
            day=(day_start - EPOCH).days,
            month=now.year * 100 + now.month,
            day_start=day_start,
            month_start=month_start,
        )

    @property
    def next_day(self) -> datetime:
        return self.day_start + timedelta(days=1)


def org_settings(session: Session, org_id: str) -> OrgBilling:
    """The org's row, or an unsaved one holding the defaults."""
    row = session.get(OrgBilling, org_id)
    if row is None:
        row = OrgBilling(
            org_id=org_id,
            price_factor_ppm=DEFAULT_PRICE_FACTOR_PPM,
            budget_day=None,
            budget_month=None,
            low_balance_threshold=None,
            low_balance_alerted=False,
            credit_limit=0,
        )
    return row


_UNSET: Any = object()


def update_org_settings(
    session: Session,
    org_id: str,
    *,
    price_factor_ppm: int | None = _UNSET,
    budget_day: int | None = _UNSET,
    budget_month: int | None = _UNSET,
    low_balance_threshold: int | None = _UNSET,
    credit_limit: int = _UNSET,
) -> OrgBilling:
    """Change the given fields (None clears a budget or threshold). The caller commits."""
    row = session.get(OrgBilling, org_id)
    if row is None:
        row = org_settings(session, org_id)
        session.add(row)
    if price_factor_ppm is not _UNSET:
        row.price_factor_ppm = (
            DEFAULT_PRICE_FACTOR_PPM if price_factor_ppm is None else price_factor_ppm
        )
    if budget_day is not _UNSET:
        row.budget_day = budget_day
    if budget_month is not _UNSET:
        row.budget_month = budget_month
    if low_balance_threshold is not _UNSET:
        row.low_balance_threshold = low_balance_threshold
        row.low_balance_alerted = False
    if credit_limit is not _UNSET and credit_limit != row.credit_limit:
        row.credit_limit = credit_limit
        # The org's money cap moves with it: the cap publisher takes the org after commit.
        session.info.setdefault(MONEY_MOVED, set()).add(org_id)
    row.updated_at = utcnow()
    bump_revision(session)
    session.flush()
    return row


def credit_limits(session: Session) -> dict[str, int]:
    """org id -> credit limit, for the orgs that have one."""
    rows = session.execute(
        select(OrgBilling.org_id, OrgBilling.credit_limit).where(OrgBilling.credit_limit > 0)
    ).all()
    return {org_id: int(limit) for org_id, limit in rows}


def spendable(balance: int, credit_limit: int) -> int:
    """What the engine may let the org spend down to zero: its balance plus its credit
    limit, within the bounds a balance has (billing.service.MAX_BALANCE_NANO)."""
    return max(-MAX_BALANCE_NANO, min(MAX_BALANCE_NANO, balance + credit_limit))


@dataclass(frozen=True, slots=True)
class Spend:
    day: int = 0
    month: int = 0


def _spend(session: Session, column: Any, ids: Iterable[str], window: Window) -> dict[str, Spend]:
    wanted = sorted(set(ids))
    if not wanted:
        return {}
    in_day = case((LedgerEntry.created_at >= window.day_start, LedgerEntry.amount), else_=0)
    q = (
        select(column, func.sum(in_day), func.sum(LedgerEntry.amount))
        .where(
            column.in_(wanted),
            LedgerEntry.kind == "usage",
            LedgerEntry.created_at >= window.month_start,
            LedgerEntry.created_at < window.month_start + timedelta(days=32),
        )
        .group_by(column)
    )
    return {
        str(i): Spend(day=-int(d or 0), month=-int(m or 0)) for i, d, m in session.execute(q).all()
    }


@dataclass(frozen=True, slots=True)
class SnapshotBilling:
    """What the snapshot builder adds to orgs[] and keys[] (only non-default fields, so
    the snapshot stays minimal and valid for engines that predate them)."""

    orgs: dict[str, dict[str, Any]]
    keys: dict[str, dict[str, Any]]
    applications: dict[str, dict[str, Any]]


def snapshot_fields(
    session: Session,
    *,
    org_marks: Mapping[str, int],
    key_marks: Mapping[str, int],
    app_marks: Mapping[str, int] | None = None,
    now: datetime | None = None,
) -> SnapshotBilling:
    """Per org: price_factor_ppm, limits.budget_*, usage; per key and per application:
    usage (their budgets are their limits, set by onetoken.keys). Call under the
    supervisor's mark lock so spend and marks are one consistent pair."""
    window = Window.at(now or utcnow())
    org_rows = session.scalars(select(OrgBilling)).all()
    # Key budgets are key limits (onetoken.keys puts them in keys[].limits); the spend
    # windows they are enforced on come from the ledger, here.
    key_rows = session.scalars(
        select(ApiKey).where((ApiKey.budget_day.is_not(None)) | (ApiKey.budget_month.is_not(None)))
    ).all()
    budgeted_orgs = [
        r.org_id for r in org_rows if r.budget_day is not None or r.budget_month is not None
    ]
    org_spend = _spend(session, LedgerEntry.org_id, budgeted_orgs, window)
    key_spend = _spend(session, LedgerEntry.key_id, [r.id for r in key_rows], window)

    orgs: dict[str, dict[str, Any]] = {}
    for r in org_rows:
        fields: dict[str, Any] = {}
        if r.price_factor_ppm != DEFAULT_PRICE_FACTOR_PPM:
            fields["price_factor_ppm"] = r.price_factor_ppm
        if r.budget_day is not None or r.budget_month is not None:
            spent = org_spend.get(r.org_id, Spend())
            fields["limits"] = {"budget_day": r.budget_day, "budget_month": r.budget_month}
            fields["usage"] = _usage(window, spent, org_marks.get(r.org_id, 0))
        if fields:
            orgs[r.org_id] = fields
    keys: dict[str, dict[str, Any]] = {}
    for k in key_rows:
        spent = key_spend.get(k.id, Spend())
        keys[k.id] = {"usage": _usage(window, spent, key_marks.get(k.id, 0))}
    # An application's spend is what its keys spent while in it: usage entries carry the
    # application of the moment, so a key moved in brings none of its past spend.
    budgeted_apps = session.scalars(
        select(Application.id).where(
            (Application.budget_day.is_not(None)) | (Application.budget_month.is_not(None))
        )
    ).all()
    app_spend = _spend(session, LedgerEntry.application_id, budgeted_apps, window)
    apps = {
        a: {"usage": _usage(window, app_spend.get(a, Spend()), (app_marks or {}).get(a, 0))}
        for a in budgeted_apps
    }
    return SnapshotBilling(orgs=orgs, keys=keys, applications=apps)


def _usage(window: Window, spent: Spend, mark: int) -> dict[str, int]:
    return {
        "day": window.day,
        "month": window.month,
        "spent_day": spent.day,
        "spent_month": spent.month,
        "spent_mark": int(mark),
    }


def merge_limits(target: dict[str, Any], fields: Mapping[str, Any]) -> dict[str, Any]:
    """Add billing fields to a snapshot org/key object. Budgets join any limits another
    domain set (rpm, tpm, concurrency) instead of replacing them."""
    for name, value in fields.items():
        if name == "limits":
            limits = dict(target.get("limits") or {})
            limits.update(value)
            for other in ("rpm", "tpm", "concurrency"):
                limits.setdefault(other, None)
            target["limits"] = limits
        else:
            target[name] = value
    return target


# -- events ------------------------------------------------------------------------------


def _notice_once(session: Session, key: str, org_id: str) -> bool:
    """True the first time `key` is seen (then the event is sent); committed by caller."""
    try:
        with session.begin_nested():
            session.execute(insert(BillingNotice).values(notice_key=key, org_id=org_id))
    except IntegrityError:
        return False
    return True


def check_events(
    session: Session,
    org_ids: Iterable[str],
    key_ids: Iterable[str],
    now: datetime | None = None,
    *,
    refused: Iterable[tuple[str, str]] = (),
    app_ids: Iterable[str] = (),
) -> list[tuple[str, str, dict[str, Any]]]:
    """Low balance and exhausted budgets of the given orgs/keys, each once per crossing or
    period. `refused` lists (org_id, key_id) of requests the engine answered with
    budget_exceeded: the engine refuses a reservation that would cross the budget, so the
    spend itself may stay just below it. Returns (org_id, kind, data) to emit after the
    caller commits."""
    from onetoken.billing.service import balance
    from onetoken.kit.money import format_amount

    window = Window.at(now or utcnow())
    out: list[tuple[str, str, dict[str, Any]]] = []
    refused = list(refused)
    org_ids = set(org_ids) | {o for o, _ in refused}
    key_ids = set(key_ids) | {k for _, k in refused if k}
    orgs = sorted(org_ids)
    settings = (
        {
            r.org_id: r
            for r in session.scalars(select(OrgBilling).where(OrgBilling.org_id.in_(orgs)))
        }
        if orgs
        else {}
    )
    for org_id, row in settings.items():
        if row.low_balance_threshold is not None:
            bal = balance(session, org_id)
            below = bal < row.low_balance_threshold
            if below and not row.low_balance_alerted:
                row.low_balance_alerted = True
                out.append(
                    (
                        org_id,
                        "balance_low",
                        {
                            "balance": format_amount(bal),
                            "threshold": format_amount(row.low_balance_threshold),
                        },
                    )
                )
            elif not below and row.low_balance_alerted:
                row.low_balance_alerted = False
        spent = _spend(session, LedgerEntry.org_id, [org_id], window).get(org_id, Spend())
        out += _exhausted(
            session,
            org_id,
            "org",
            org_id,
            row.budget_day,
            row.budget_month,
            spent,
            window,
            refused=any(o == org_id for o, _ in refused),
        )
    keys = sorted(key_ids)
    if keys:
        budgeted = session.scalars(
            select(ApiKey).where(
                ApiKey.id.in_(keys),
                (ApiKey.budget_day.is_not(None)) | (ApiKey.budget_month.is_not(None)),
            )
        ).all()
        key_spend = _spend(session, LedgerEntry.key_id, [b.id for b in budgeted], window)
        for b in budgeted:
            out += _exhausted(
                session,
                b.org_id,
                "key",
                b.id,
                b.budget_day,
                b.budget_month,
                key_spend.get(b.id, Spend()),
                window,
                refused=any(k == b.id for _, k in refused),
            )
    out += _applications_exhausted(session, set(app_ids), {k for _, k in refused if k}, window)
    session.flush()
    return out


def _applications_exhausted(
    session: Session, app_ids: set[str], refused_keys: set[str], window: Window
) -> list[tuple[str, str, dict[str, Any]]]:
    """quota_exhausted of the budgeted applications that spent (`app_ids`) or whose key
    was refused for a budget (the engine does not say whose budget refused it: as for an
    org and its key, each budget in the key's path is looked at)."""
    refused_apps = (
        {
            str(a)
            for a in session.scalars(
                select(ApiKey.application_id).where(
                    ApiKey.id.in_(sorted(refused_keys)), ApiKey.application_id.is_not(None)
                )
            )
        }
        if refused_keys
        else set()
    )
    app_ids |= refused_apps
    if not app_ids:
        return []
    budgeted = session.scalars(
        select(Application).where(
            Application.id.in_(sorted(app_ids)),
            (Application.budget_day.is_not(None)) | (Application.budget_month.is_not(None)),
        )
    ).all()
    spend = _spend(session, LedgerEntry.application_id, [a.id for a in budgeted], window)
    out: list[tuple[str, str, dict[str, Any]]] = []
    for a in budgeted:
        out += _exhausted(
            session,
            a.org_id,
            "application",
            a.id,
            a.budget_day,
            a.budget_month,
            spend.get(a.id, Spend()),
            window,
            refused=a.id in refused_apps,
        )
    return out


def _exhausted(
    session: Session,
    org_id: str,
    scope: str,
    scope_id: str,
    budget_day: int | None,
    budget_month: int | None,
    spent: Spend,
    window: Window,
    *,
    refused: bool = False,
) -> list[tuple[str, str, dict[str, Any]]]:
    from onetoken.kit.money import format_amount

    out: list[tuple[str, str, dict[str, Any]]] = []
    periods = [
        (period, budget, used, stamp)
        for period, budget, used, stamp in (
            ("day", budget_day, spent.day, window.day),
            ("month", budget_month, spent.month, window.month),
        )
        if budget is not None
    ]
    closest = min(periods, key=lambda p: (p[1] or 0) - p[2], default=None)
    for period, budget, used, stamp in periods:
        assert budget is not None
        if used < budget and not (refused and closest is not None and period == closest[0]):
            continue
        if _notice_once(session, f"quota:{scope}:{scope_id}:{period}:{stamp}", org_id):
            data: dict[str, Any] = {
                "scope": scope,
                "period": period,
                "budget": format_amount(budget),
                "spent": format_amount(used),
            }
            if scope == "key":
                data["key_id"] = scope_id
            elif scope == "application":
                data["application_id"] = scope_id
            out.append((org_id, "quota_exhausted", data))
    return out


def emit_all(events: Iterable[tuple[str, str, dict[str, Any]]]) -> None:
    """Each event to the org's webhooks and, with e-mail configured, as an alert to its
    owners, admins and billing members."""
    from onetoken import webhooks
    from onetoken.mail import notices

    events = list(events)
    notices.on_billing_events(events)
    for org_id, kind, data in events:
        try:
            webhooks.emit(org_id, kind, data)
        except Exception as exc:
            log.warning("billing.event_failed", extra={"exc_type": type(exc).__name__})
        else:
            log.info("billing.event", extra={"org_id": org_id, "kind": kind})
