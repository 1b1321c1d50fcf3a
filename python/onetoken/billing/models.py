"""Billing tables: org billing settings and budgets, price versions, plans and packages,
orders and their history, redemption codes, invoices.

Money columns are BIGINT nano-units. Nothing here holds request content; the only free
text is invoice information (title, tax id, address), which invoicing needs.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    String,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from onetoken.db.base import Base, BigIntPK, UTCDateTime, utcnow
from onetoken.orgs.models import Org
from onetoken.providers.models import Model

ORDER_STATUSES = ("created", "paid", "failed", "refunded", "cancelled")
ORDER_KINDS = ("recharge", "package")
PAYMENT_METHODS = ("bank_transfer", "redemption_code")
PACKAGE_STATUSES = ("active", "expired", "revoked")
INVOICE_STATUSES = ("requested", "issued", "void")
DEFAULT_PRICE_FACTOR_PPM = 1_000_000


class OrgBilling(Base):
    """Per-org billing settings; an org without a row has the defaults."""

    __tablename__ = "org_billing"

    org_id: Mapped[str] = mapped_column(ForeignKey(Org.id), primary_key=True)
    price_factor_ppm: Mapped[int] = mapped_column(Integer, default=DEFAULT_PRICE_FACTOR_PPM)
    budget_day: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    budget_month: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    low_balance_threshold: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # Set when balance_low was sent; cleared once the balance is back above the threshold,
    # so one crossing gives one event.
    low_balance_alerted: Mapped[bool] = mapped_column(Boolean, default=False)
    # How far below zero the balance may go (nano-units; 0: prepaid only). A commercial
    # term: the engine's snapshot balance and the Redis money cap both add it.
    credit_limit: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    __table_args__ = (
        CheckConstraint("price_factor_ppm >= 0 AND price_factor_ppm <= 10000000", name="factor"),
    )


class PriceVersion(Base):
    """A model's prices from `effective_from` on. The engine charges each request at the
    price in the snapshot when it ran, so a new version never changes a past charge."""

    __tablename__ = "price_versions"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    model_id: Mapped[str] = mapped_column(ForeignKey(Model.id, ondelete="CASCADE"))
    # The model's org; None for the platform catalog (changed by the operator only).
    org_id: Mapped[str | None] = mapped_column(ForeignKey(Org.id), index=True, nullable=True)
    effective_from: Mapped[datetime] = mapped_column(UTCDateTime())
    input_price: Mapped[int] = mapped_column(BigInteger)
    output_price: Mapped[int] = mapped_column(BigInteger)
    cached_input_price: Mapped[int] = mapped_column(BigInteger)
    request_price: Mapped[int] = mapped_column(BigInteger, default=0)
    # Unit prices, as on the model row.
    image_prices: Mapped[dict[str, int]] = mapped_column(JSON, default=dict)
    audio_second_price: Mapped[int] = mapped_column(BigInteger, default=0)
    character_price: Mapped[int] = mapped_column(BigInteger, default=0)
    search_unit_price: Mapped[int] = mapped_column(BigInteger, default=0)
    created_by: Mapped[str | None] = mapped_column(String(32), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # When the prices were copied onto the model row the snapshot is built from.
    applied_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)

    __table_args__ = (
        UniqueConstraint("model_id", "effective_from", name="uq_price_versions_model_from"),
        Index("ix_price_versions_effective_from", "effective_from"),
    )


class Plan(Base):
    """A package offered for sale: pay `price`, get `credit` valid for `validity_days`."""

    __tablename__ = "plans"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    price: Mapped[int] = mapped_column(BigInteger)
    credit: Mapped[int] = mapped_column(BigInteger)
    validity_days: Mapped[int] = mapped_column(Integer)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Package(Base):
    """Credit granted by a plan. Usage is allocated to active packages (earliest expiry
    first) before the prepaid balance; what is left at expiry leaves with an expiry entry."""

    __tablename__ = "packages"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    org_id: Mapped[str] = mapped_column(ForeignKey(Org.id), index=True)
    plan_id: Mapped[str | None] = mapped_column(ForeignKey("plans.id"), nullable=True)
    order_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    credit: Mapped[int] = mapped_column(BigInteger)
    remaining: Mapped[int] = mapped_column(BigInteger)
    valid_from: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    status: Mapped[str] = mapped_column(String(16), default="active")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    __table_args__ = (
        CheckConstraint("status IN ('active','expired','revoked')", name="status"),
        CheckConstraint("remaining >= 0 AND remaining <= credit", name="remaining"),
    )


class PackageConsumption(Base):
    """How much of one usage charge a package paid; one row per (package, request)."""

    __tablename__ = "package_consumptions"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    package_id: Mapped[str] = mapped_column(ForeignKey("packages.id"))
    request_id: Mapped[str] = mapped_column(String(64))
    amount: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    __table_args__ = (
        UniqueConstraint("package_id", "request_id", name="uq_package_consumptions_pkg_req"),
    )


class Order(Base):
    __tablename__ = "orders"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    org_id: Mapped[str] = mapped_column(ForeignKey(Org.id), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    # What the customer pays, and the credit it buys (equal for recharges).
    amount: Mapped[int] = mapped_column(BigInteger)
    credit: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(8))
    plan_id: Mapped[str | None] = mapped_column(ForeignKey("plans.id"), nullable=True)
    status: Mapped[str] = mapped_column(String(16), default="created")
    payment_method: Mapped[str] = mapped_column(String(24))
    # Quoted by the payer on the bank transfer so the billing admin can match it.
    payment_reference: Mapped[str] = mapped_column(String(32), unique=True)
    refunded_amount: Mapped[int] = mapped_column(BigInteger, default=0)
    created_by: Mapped[str | None] = mapped_column(String(32), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    paid_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)

    __table_args__ = (
        CheckConstraint(
            "status IN ('created','paid','failed','refunded','cancelled')", name="status"
        ),
        CheckConstraint("kind IN ('recharge','package')", name="kind"),
        CheckConstraint("amount >= 0 AND credit > 0", name="amounts"),
    )


class OrderEvent(Base):
    """Every state change of an order: who moved it from what to what, and when."""

    __tablename__ = "order_events"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    order_id: Mapped[str] = mapped_column(ForeignKey("orders.id"), index=True)
    org_id: Mapped[str] = mapped_column(String(32))
    from_status: Mapped[str | None] = mapped_column(String(16), nullable=True)
    to_status: Mapped[str] = mapped_column(String(16))
    actor: Mapped[str] = mapped_column(String(40))
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class RedemptionCode(Base):
    """A single-use code worth `credit` (or a plan). Only its keyed hash is stored."""

    __tablename__ = "redemption_codes"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    code_hash: Mapped[str] = mapped_column(String(64), unique=True)
    display: Mapped[str] = mapped_column(String(16))
    credit: Mapped[int] = mapped_column(BigInteger)
    plan_id: Mapped[str | None] = mapped_column(ForeignKey("plans.id"), nullable=True)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    redeemed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    redeemed_org_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    redeemed_by: Mapped[str | None] = mapped_column(String(32), nullable=True)
    order_id: Mapped[str | None] = mapped_column(String(32), nullable=True)


class Invoice(Base):
    """An invoice for one month's usage. Lines and amount are frozen when it is created."""

    __tablename__ = "invoices"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    org_id: Mapped[str] = mapped_column(ForeignKey(Org.id), index=True)
    number: Mapped[str] = mapped_column(String(32), unique=True)
    period: Mapped[int] = mapped_column(Integer)
    title: Mapped[str] = mapped_column(String(200))
    tax_id: Mapped[str] = mapped_column(String(64))
    address: Mapped[str] = mapped_column(String(400))
    amount: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(8))
    lines: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), default="requested")
    created_by: Mapped[str | None] = mapped_column(String(32), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    issued_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)

    __table_args__ = (CheckConstraint("status IN ('requested','issued','void')", name="status"),)


class BillingNotice(Base):
    """Webhook events already sent, so each (scope, period) exhaustion is sent once."""

    __tablename__ = "billing_notices"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    notice_key: Mapped[str] = mapped_column(String(200), unique=True)
    org_id: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


LEDGER_KINDS = (
    "recharge",
    "usage",
    "refund",
    "adjustment",
    "grant",
    "package_grant",
    "expiry",
)


class LedgerEntry(Base):
    __tablename__ = "ledger_entries"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    org_id: Mapped[str] = mapped_column(ForeignKey(Org.id))
    kind: Mapped[str] = mapped_column(String(16))
    amount: Mapped[int] = mapped_column(BigInteger)
    idempotency_key: Mapped[str] = mapped_column(String(200), unique=True)
    request_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_by: Mapped[str | None] = mapped_column(String(32), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    memo: Mapped[str | None] = mapped_column(String(200), nullable=True)
    # Usage entries only: which key and model spent it (per-key budgets, statements).
    key_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    model: Mapped[str | None] = mapped_column(String(128), nullable=True)
    # Usage entries only: how many calls the entry covers (one entry per org, key, model and
    # UTC day of an ingested batch), so invoices sum calls instead of counting rows.
    calls: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Usage entries only: the application the key was in when it spent (application
    # budgets, statements by application); None for a key in none.
    application_id: Mapped[str | None] = mapped_column(String(32), nullable=True)

    __table_args__ = (
        CheckConstraint(
            "kind IN ('recharge','usage','refund','adjustment','grant','package_grant','expiry')",
            name="kind",
        ),
        Index("ix_ledger_entries_org_id_id", "org_id", "id"),
        Index("ix_ledger_entries_org_id_kind_created_at", "org_id", "kind", "created_at"),
        Index("ix_ledger_entries_key_id_created_at", "key_id", "created_at"),
        Index("ix_ledger_entries_application_id_created_at", "application_id", "created_at"),
    )
