"""Monthly statements, invoices and call statistics for one org.

Money comes from the ledger (the books); calls and tokens come from call_log. Both are
written from the same engine record, so a statement's usage broken down by model, key or
day from call_log adds up to the ledger's usage total to the unit, and the statement says
so (`call_log_cost`, `ledger_usage`, `difference`).
"""

from __future__ import annotations

import csv
import html
import io
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from clickhouse_connect.driver.client import Client
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from onetoken.analytics.columns import CALL_LOG_READ
from onetoken.analytics.queries import to_micros
from onetoken.billing.models import Invoice, LedgerEntry
from onetoken.db.base import new_id, utcnow
from onetoken.db.session import get_scoped
from onetoken.kit.errors import Conflict, Unprocessable
from onetoken.kit.money import format_amount
from onetoken.kit.spreadsheet import formula_safe
from onetoken.orgs.models import Org

T = TypeVar("T")
Reader = Callable[[Callable[[Client], T]], T]

GROUPS = {
    "model": "model_requested",
    "key": "key_id",
    "day": "toDate(ts, 'UTC')",
    # '' for calls of keys in no application.
    "application": "application_id",
}


@dataclass(frozen=True, slots=True)
class Period:
    year: int
    month: int

    @classmethod
    def parse(cls, value: str | int, now: datetime | None = None) -> Period:
        text = str(value)
        m = re.fullmatch(r"(\d{4})-?(\d{2})", text)
        if m is None or not 1 <= int(m[2]) <= 12 or int(m[1]) < 2000:
            raise Unprocessable("Period must be a month, YYYY-MM.", param="period")
        p = cls(int(m[1]), int(m[2]))
        today = (now or utcnow()).astimezone(UTC)
        if (p.year, p.month) > (today.year, today.month):
            raise Unprocessable("Period must not be in the future.", param="period")
        return p

    @property
    def key(self) -> int:
        return self.year * 100 + self.month

    @property
    def label(self) -> str:
        return f"{self.year:04d}-{self.month:02d}"

    @property
    def start(self) -> datetime:
        return datetime(self.year, self.month, 1, tzinfo=UTC)

    @property
    def end(self) -> datetime:
        if self.month == 12:
            return datetime(self.year + 1, 1, 1, tzinfo=UTC)
        return datetime(self.year, self.month + 1, 1, tzinfo=UTC)


@dataclass
class UsageRow:
    group: str
    calls: int
    prompt_tokens: int
    completion_tokens: int
    cost: int


@dataclass
class Statement:
    org_id: str
    period: Period
    currency: str
    opening_balance: int
    closing_balance: int
    movement: dict[str, int]
    ledger_usage: int
    call_log_cost: int
    calls: int
    by_model: list[UsageRow] = field(default_factory=list)
    by_key: list[UsageRow] = field(default_factory=list)
    by_day: list[UsageRow] = field(default_factory=list)
    by_application: list[UsageRow] = field(default_factory=list)
    credits: list[dict[str, Any]] = field(default_factory=list)

    @property
    def difference(self) -> int:
        return self.ledger_usage - self.call_log_cost


def _per_group(
    client: Client, org_id: str, start: datetime, end: datetime, group: str, aggregates: str
) -> Sequence[Sequence[Any]]:
    """`aggregates` over one org's call_log in [start, end) per model, key, day or
    application (FINAL:
    one row per request), as rows of (group, *aggregates) ordered by group."""
    result = client.query(
        f"SELECT toString({GROUPS[group]}) AS g, {aggregates} "  # noqa: S608 (fixed texts)
        f"FROM {CALL_LOG_READ} FINAL "
        "WHERE org_id = {org:String} "
        "AND ts >= fromUnixTimestamp64Micro({start:Int64}, 'UTC') "
        "AND ts < fromUnixTimestamp64Micro({end:Int64}, 'UTC') "
        "GROUP BY g ORDER BY g",
        parameters={"org": org_id, "start": to_micros(start), "end": to_micros(end)},
    )
    rows: Sequence[Sequence[Any]] = result.result_rows
    return rows


def usage_rows(
    client: Client, org_id: str, start: datetime, end: datetime, group: str
) -> list[UsageRow]:
    """call_log per model, key or day for one org over [start, end), one row per request
    (FINAL)."""
    rows = _per_group(
        client, org_id, start, end, group,
        "count(), sum(prompt_tokens), sum(completion_tokens), sum(cost)",
    )
    return [
        UsageRow(str(g), int(n), int(p), int(c), int(cost))
        for g, n, p, c, cost in rows
    ]


def _ledger_sum(session: Session, org_id: str, *conds: Any) -> int:
    total = session.scalar(
        select(func.coalesce(func.sum(LedgerEntry.amount), 0)).where(
            LedgerEntry.org_id == org_id, *conds
        )
    )
    return int(total or 0)


def build_statement(
    session: Session, read: Reader[Any] | None, org_id: str, period: Period, currency: str
) -> Statement:
    start, end = period.start, period.end
    opening = _ledger_sum(session, org_id, LedgerEntry.created_at < start)
    movement = {
        str(kind): int(total or 0)
        for kind, total in session.execute(
            select(LedgerEntry.kind, func.sum(LedgerEntry.amount))
            .where(
                LedgerEntry.org_id == org_id,
                LedgerEntry.created_at >= start,
                LedgerEntry.created_at < end,
            )
            .group_by(LedgerEntry.kind)
        ).all()
    }
    credits = [
        {
            "id": e.id,
            "kind": e.kind,
            "amount": e.amount,
            "created_at": e.created_at,
            "memo": e.memo,
        }
        for e in session.scalars(
            select(LedgerEntry)
            .where(
                LedgerEntry.org_id == org_id,
                LedgerEntry.kind != "usage",
                LedgerEntry.created_at >= start,
                LedgerEntry.created_at < end,
            )
            .order_by(LedgerEntry.created_at, LedgerEntry.id)
        )
    ]
    stmt = Statement(
        org_id=org_id,
        period=period,
        currency=currency,
        opening_balance=opening,
        closing_balance=opening + sum(movement.values()),
        movement=movement,
        ledger_usage=-movement.get("usage", 0),
        call_log_cost=0,
        calls=0,
        credits=credits,
    )
    if read is not None:

        def query(
            c: Client,
        ) -> tuple[list[UsageRow], list[UsageRow], list[UsageRow], list[UsageRow]]:
            return (
                usage_rows(c, org_id, start, end, "model"),
                usage_rows(c, org_id, start, end, "key"),
                usage_rows(c, org_id, start, end, "day"),
                usage_rows(c, org_id, start, end, "application"),
            )

        stmt.by_model, stmt.by_key, stmt.by_day, stmt.by_application = read(query)
        stmt.call_log_cost = sum(r.cost for r in stmt.by_model)
        stmt.calls = sum(r.calls for r in stmt.by_model)
    return stmt


def statement_csv(stmt: Statement) -> str:
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow(["section", "group", "calls", "prompt_tokens", "completion_tokens", "cost"])
    sections = (
        ("model", stmt.by_model),
        ("key", stmt.by_key),
        ("day", stmt.by_day),
        ("application", stmt.by_application),
    )
    for section, rows in sections:
        for r in rows:
            w.writerow(
                [
                    section,
                    formula_safe(r.group),
                    r.calls,
                    r.prompt_tokens,
                    r.completion_tokens,
                    format_amount(r.cost),
                ]
            )
    for kind, amount in sorted(stmt.movement.items()):
        w.writerow(["movement", kind, "", "", "", format_amount(amount)])
    return out.getvalue()


# -- invoices ------------------------------------------------------------------------------


def ledger_usage_by_model(session: Session, org_id: str, period: Period) -> list[dict[str, Any]]:
    rows = session.execute(
        select(LedgerEntry.model, func.sum(LedgerEntry.calls), func.sum(LedgerEntry.amount))
        .where(
            LedgerEntry.org_id == org_id,
            LedgerEntry.kind == "usage",
            LedgerEntry.created_at >= period.start,
            LedgerEntry.created_at < period.end,
        )
        .group_by(LedgerEntry.model)
        .order_by(LedgerEntry.model)
    ).all()
    return [
        {"description": f"Usage: {model or 'unknown model'}", "calls": int(n), "amount": -int(s)}
        for model, n, s in rows
    ]


def create_invoice(
    session: Session,
    org_id: str,
    period: Period,
    *,
    title: str,
    tax_id: str,
    address: str,
    currency: str,
    created_by: str | None,
) -> Invoice:
    """An invoice for a month's usage; lines and amount come from the ledger, frozen now."""
    open_one = session.scalar(
        select(Invoice.id).where(
            Invoice.org_id == org_id, Invoice.period == period.key, Invoice.status != "void"
        )
    )
    if open_one is not None:
        raise Conflict("This month already has an invoice.", code="invoice_exists")
    lines = ledger_usage_by_model(session, org_id, period)
    invoice = Invoice(
        id=new_id("inv"),
        org_id=org_id,
        number=f"INV-{period.key}-{new_id('x')[2:10].upper()}",
        period=period.key,
        title=title,
        tax_id=tax_id,
        address=address,
        amount=sum(int(x["amount"]) for x in lines),
        currency=currency,
        lines=lines,
        status="requested",
        created_by=created_by,
        created_at=utcnow(),
    )
    session.add(invoice)
    session.flush()
    return invoice


def get_invoice(session: Session, org_id: str | None, invoice_id: str) -> Invoice:
    """`org_id` None: an operator, who may act on any org's invoice."""
    orgs = None if org_id is None else (org_id,)
    return get_scoped(session, Invoice, invoice_id, orgs, "Invoice not found.")


def list_invoices(session: Session, org_id: str) -> Sequence[Invoice]:
    return session.scalars(
        select(Invoice).where(Invoice.org_id == org_id).order_by(Invoice.created_at.desc())
    ).all()


INVOICE_TRANSITIONS = {"requested": {"issued", "void"}, "issued": {"void"}, "void": set()}


def set_invoice_status(session: Session, invoice: Invoice, status: str) -> Invoice:
    if status not in INVOICE_TRANSITIONS.get(invoice.status, set()):
        raise Conflict(
            f"An invoice that is {invoice.status} cannot become {status}.",
            code="illegal_transition",
        )
    invoice.status = status
    if status == "issued":
        invoice.issued_at = utcnow()
    session.flush()
    return invoice


def invoice_csv(invoice: Invoice) -> str:
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow(["invoice", "period", "description", "calls", "amount", "currency"])
    for line in invoice.lines:
        w.writerow(
            [
                invoice.number,
                _period_label(invoice.period),
                formula_safe(str(line["description"])),
                line["calls"],
                format_amount(int(line["amount"])),
                invoice.currency,
            ]
        )
    return out.getvalue()


def _period_label(key: int) -> str:
    return f"{key // 100:04d}-{key % 100:02d}"


def invoice_html(session: Session, invoice: Invoice) -> str:
    org = session.get(Org, invoice.org_id)
    e = html.escape
    rows = "\n".join(
        f"<tr><td>{e(str(line['description']))}</td><td class=n>{int(line['calls'])}</td>"
        f"<td class=n>{e(format_amount(int(line['amount'])))}</td></tr>"
        for line in invoice.lines
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Invoice {e(invoice.number)}</title>
<style>
body{{font-family:sans-serif;max-width:48em;margin:2em auto}}
td,th{{padding:.3em .6em;border-bottom:1px solid #ddd;text-align:left}}
.n{{text-align:right}}
</style>
</head><body>
<h1>Invoice {e(invoice.number)}</h1>
<p>Status: {e(invoice.status)}<br>Period: {e(_period_label(invoice.period))}<br>
Issued by: onetoken<br>Created: {e(invoice.created_at.strftime("%Y-%m-%d"))}</p>
<h2>Billed to</h2>
<p>{e(invoice.title)}<br>Tax id: {e(invoice.tax_id)}<br>{e(invoice.address)}<br>
Organization: {e(org.name if org else invoice.org_id)}</p>
<table><thead><tr><th>Description</th><th class=n>Calls</th>
<th class=n>Amount ({e(invoice.currency)})</th></tr></thead>
<tbody>
{rows}
</tbody>
<tfoot><tr><th>Total</th><th></th>
<th class=n>{e(format_amount(invoice.amount))}</th></tr></tfoot></table>
</body></html>
"""


# -- call statistics -----------------------------------------------------------------------


def call_stats(
    client: Client, org_id: str, start: datetime, end: datetime, group: str
) -> list[dict[str, Any]]:
    """Calls, errors, tokens and cost per model/key/day for one org (call_log, FINAL)."""
    rows = _per_group(
        client, org_id, start, end, group,
        "count(), countIf(status >= 400), sum(prompt_tokens), sum(completion_tokens), "
        "sum(cached_tokens), sum(cost), quantile(0.5)(latency_us), quantile(0.99)(latency_us)",
    )
    return [
        {
            "group": str(g),
            "calls": int(n),
            "errors": int(errs),
            "prompt_tokens": int(p),
            "completion_tokens": int(c),
            "cached_tokens": int(cached),
            "cost": int(cost),
            "latency_p50_us": int(p50),
            "latency_p99_us": int(p99),
        }
        for g, n, errs, p, c, cached, cost, p50, p99 in rows
    ]
