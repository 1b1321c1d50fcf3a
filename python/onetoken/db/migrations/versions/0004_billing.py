"""Billing: ledger kinds package_grant and expiry, usage key/model columns, org billing
settings and budgets, price versions, plans, packages, orders, redemption codes,
invoices, sent notices.

Revision ID: 0004_billing
Revises: 0001
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004_billing"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_BIGPK = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_TS = sa.DateTime(timezone=True)
_OLD_KINDS = "kind IN ('recharge','usage','refund','adjustment','grant')"
_NEW_KINDS = "kind IN ('recharge','usage','refund','adjustment','grant','package_grant','expiry')"


def upgrade() -> None:
    with op.batch_alter_table("ledger_entries", schema=None) as b:
        b.drop_constraint(op.f("ck_ledger_entries_kind"), type_="check")
        b.create_check_constraint("kind", _NEW_KINDS)
        b.add_column(sa.Column("key_id", sa.String(length=32), nullable=True))
        b.add_column(sa.Column("model", sa.String(length=128), nullable=True))
        b.create_index("ix_ledger_entries_org_id_kind_created_at", ["org_id", "kind", "created_at"])
        b.create_index("ix_ledger_entries_key_id_created_at", ["key_id", "created_at"])

    op.create_table(
        "org_billing",
        sa.Column("org_id", sa.String(length=32), nullable=False),
        sa.Column("price_factor_ppm", sa.Integer(), nullable=False),
        sa.Column("budget_day", sa.BigInteger(), nullable=True),
        sa.Column("budget_month", sa.BigInteger(), nullable=True),
        sa.Column("low_balance_threshold", sa.BigInteger(), nullable=True),
        sa.Column("low_balance_alerted", sa.Boolean(), nullable=False),
        sa.Column("updated_at", _TS, nullable=False),
        sa.CheckConstraint(
            "price_factor_ppm >= 0 AND price_factor_ppm <= 10000000",
            name=op.f("ck_org_billing_factor"),
        ),
        sa.ForeignKeyConstraint(["org_id"], ["orgs.id"], name=op.f("fk_org_billing_org_id_orgs")),
        sa.PrimaryKeyConstraint("org_id", name=op.f("pk_org_billing")),
    )
    op.create_table(
        "price_versions",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("model_id", sa.String(length=32), nullable=False),
        sa.Column("org_id", sa.String(length=32), nullable=True),
        sa.Column("effective_from", _TS, nullable=False),
        sa.Column("input_price", sa.BigInteger(), nullable=False),
        sa.Column("output_price", sa.BigInteger(), nullable=False),
        sa.Column("cached_input_price", sa.BigInteger(), nullable=False),
        sa.Column("request_price", sa.BigInteger(), nullable=False),
        sa.Column("created_by", sa.String(length=32), nullable=True),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("applied_at", _TS, nullable=True),
        sa.ForeignKeyConstraint(
            ["model_id"],
            ["models.id"],
            name=op.f("fk_price_versions_model_id_models"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["org_id"], ["orgs.id"], name=op.f("fk_price_versions_org_id_orgs")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_price_versions")),
        sa.UniqueConstraint("model_id", "effective_from", name="uq_price_versions_model_from"),
    )
    op.create_index(op.f("ix_price_versions_org_id"), "price_versions", ["org_id"])
    op.create_index("ix_price_versions_effective_from", "price_versions", ["effective_from"])
    op.create_table(
        "plans",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("price", sa.BigInteger(), nullable=False),
        sa.Column("credit", sa.BigInteger(), nullable=False),
        sa.Column("validity_days", sa.Integer(), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_plans")),
        sa.UniqueConstraint("name", name=op.f("uq_plans_name")),
    )
    op.create_table(
        "packages",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("org_id", sa.String(length=32), nullable=False),
        sa.Column("plan_id", sa.String(length=32), nullable=True),
        sa.Column("order_id", sa.String(length=32), nullable=True),
        sa.Column("credit", sa.BigInteger(), nullable=False),
        sa.Column("remaining", sa.BigInteger(), nullable=False),
        sa.Column("valid_from", _TS, nullable=False),
        sa.Column("expires_at", _TS, nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.CheckConstraint(
            "status IN ('active','expired','revoked')", name=op.f("ck_packages_status")
        ),
        sa.CheckConstraint(
            "remaining >= 0 AND remaining <= credit", name=op.f("ck_packages_remaining")
        ),
        sa.ForeignKeyConstraint(["org_id"], ["orgs.id"], name=op.f("fk_packages_org_id_orgs")),
        sa.ForeignKeyConstraint(["plan_id"], ["plans.id"], name=op.f("fk_packages_plan_id_plans")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_packages")),
    )
    op.create_index(op.f("ix_packages_org_id"), "packages", ["org_id"])
    op.create_table(
        "package_consumptions",
        sa.Column("id", _BIGPK, autoincrement=True, nullable=False),
        sa.Column("package_id", sa.String(length=32), nullable=False),
        sa.Column("request_id", sa.String(length=64), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.ForeignKeyConstraint(
            ["package_id"],
            ["packages.id"],
            name=op.f("fk_package_consumptions_package_id_packages"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_package_consumptions")),
        sa.UniqueConstraint("package_id", "request_id", name="uq_package_consumptions_pkg_req"),
    )
    op.create_table(
        "orders",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("org_id", sa.String(length=32), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("credit", sa.BigInteger(), nullable=False),
        sa.Column("currency", sa.String(length=8), nullable=False),
        sa.Column("plan_id", sa.String(length=32), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("payment_method", sa.String(length=24), nullable=False),
        sa.Column("payment_reference", sa.String(length=32), nullable=False),
        sa.Column("refunded_amount", sa.BigInteger(), nullable=False),
        sa.Column("created_by", sa.String(length=32), nullable=True),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("updated_at", _TS, nullable=False),
        sa.Column("paid_at", _TS, nullable=True),
        sa.CheckConstraint(
            "status IN ('created','paid','failed','refunded','cancelled')",
            name=op.f("ck_orders_status"),
        ),
        sa.CheckConstraint("kind IN ('recharge','package')", name=op.f("ck_orders_kind")),
        sa.CheckConstraint("amount >= 0 AND credit > 0", name=op.f("ck_orders_amounts")),
        sa.ForeignKeyConstraint(["org_id"], ["orgs.id"], name=op.f("fk_orders_org_id_orgs")),
        sa.ForeignKeyConstraint(["plan_id"], ["plans.id"], name=op.f("fk_orders_plan_id_plans")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_orders")),
        sa.UniqueConstraint("payment_reference", name=op.f("uq_orders_payment_reference")),
    )
    op.create_index(op.f("ix_orders_org_id"), "orders", ["org_id"])
    op.create_table(
        "order_events",
        sa.Column("id", _BIGPK, autoincrement=True, nullable=False),
        sa.Column("order_id", sa.String(length=32), nullable=False),
        sa.Column("org_id", sa.String(length=32), nullable=False),
        sa.Column("from_status", sa.String(length=16), nullable=True),
        sa.Column("to_status", sa.String(length=16), nullable=False),
        sa.Column("actor", sa.String(length=40), nullable=False),
        sa.Column("at", _TS, nullable=False),
        sa.ForeignKeyConstraint(
            ["order_id"], ["orders.id"], name=op.f("fk_order_events_order_id_orders")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_order_events")),
    )
    op.create_index(op.f("ix_order_events_order_id"), "order_events", ["order_id"])
    op.create_table(
        "redemption_codes",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("code_hash", sa.String(length=64), nullable=False),
        sa.Column("display", sa.String(length=16), nullable=False),
        sa.Column("credit", sa.BigInteger(), nullable=False),
        sa.Column("plan_id", sa.String(length=32), nullable=True),
        sa.Column("expires_at", _TS, nullable=True),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("redeemed_at", _TS, nullable=True),
        sa.Column("redeemed_org_id", sa.String(length=32), nullable=True),
        sa.Column("redeemed_by", sa.String(length=32), nullable=True),
        sa.Column("order_id", sa.String(length=32), nullable=True),
        sa.ForeignKeyConstraint(
            ["plan_id"], ["plans.id"], name=op.f("fk_redemption_codes_plan_id_plans")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_redemption_codes")),
        sa.UniqueConstraint("code_hash", name=op.f("uq_redemption_codes_code_hash")),
    )
    op.create_table(
        "invoices",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("org_id", sa.String(length=32), nullable=False),
        sa.Column("number", sa.String(length=32), nullable=False),
        sa.Column("period", sa.Integer(), nullable=False),
        sa.Column("title", sa.String(length=200), nullable=False),
        sa.Column("tax_id", sa.String(length=64), nullable=False),
        sa.Column("address", sa.String(length=400), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("currency", sa.String(length=8), nullable=False),
        sa.Column("lines", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("created_by", sa.String(length=32), nullable=True),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("issued_at", _TS, nullable=True),
        sa.CheckConstraint(
            "status IN ('requested','issued','void')", name=op.f("ck_invoices_status")
        ),
        sa.ForeignKeyConstraint(["org_id"], ["orgs.id"], name=op.f("fk_invoices_org_id_orgs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_invoices")),
        sa.UniqueConstraint("number", name=op.f("uq_invoices_number")),
    )
    op.create_index(op.f("ix_invoices_org_id"), "invoices", ["org_id"])
    op.create_table(
        "billing_notices",
        sa.Column("id", _BIGPK, autoincrement=True, nullable=False),
        sa.Column("notice_key", sa.String(length=200), nullable=False),
        sa.Column("org_id", sa.String(length=32), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_billing_notices")),
        sa.UniqueConstraint("notice_key", name=op.f("uq_billing_notices_notice_key")),
    )


def downgrade() -> None:
    for table in (
        "billing_notices",
        "invoices",
        "redemption_codes",
        "order_events",
        "orders",
        "package_consumptions",
        "packages",
        "plans",
        "price_versions",
        "org_billing",
    ):
        op.drop_table(table)
    with op.batch_alter_table("ledger_entries", schema=None) as b:
        b.drop_index("ix_ledger_entries_key_id_created_at")
        b.drop_index("ix_ledger_entries_org_id_kind_created_at")
        b.drop_column("model")
        b.drop_column("key_id")
        b.drop_constraint(op.f("ck_ledger_entries_kind"), type_="check")
        b.create_check_constraint("kind", _OLD_KINDS)
