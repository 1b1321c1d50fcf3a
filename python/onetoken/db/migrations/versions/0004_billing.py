"""Billing: ledger kinds package_grant and expiry, usage key/model columns, org billing
settings and budgets, price versions, plans, packages, orders, redemption codes,
invoices, sent notices.
"""

import sqlalchemy as sa
from alembic import op

from onetoken.db.migrations.shapes import amounts, at, create_table, ref, serial_id

revision: str = "0004_billing"
down_revision: str | None = "0001"

_OLD_KINDS = "kind IN ('recharge','usage','refund','adjustment','grant')"
_NEW_KINDS = "kind IN ('recharge','usage','refund','adjustment','grant','package_grant','expiry')"


def upgrade() -> None:
    with op.batch_alter_table("ledger_entries", schema=None) as b:
        b.drop_constraint(op.f("ck_ledger_entries_kind"), type_="check")
        b.create_check_constraint("kind", _NEW_KINDS)
        b.add_column(ref("key_id", nullable=True))
        b.add_column(sa.Column("model", sa.String(length=128), nullable=True))
        b.create_index("ix_ledger_entries_org_id_kind_created_at", ["org_id", "kind", "created_at"])
        b.create_index("ix_ledger_entries_key_id_created_at", ["key_id", "created_at"])

    create_table(
        "org_billing",
        ref("org_id"),
        sa.Column("price_factor_ppm", sa.Integer(), nullable=False),
        sa.Column("budget_day", sa.BigInteger(), nullable=True),
        sa.Column("budget_month", sa.BigInteger(), nullable=True),
        sa.Column("low_balance_threshold", sa.BigInteger(), nullable=True),
        sa.Column("low_balance_alerted", sa.Boolean(), nullable=False),
        at("updated_at"),
        key=("org_id",),
        checks={"factor": "price_factor_ppm >= 0 AND price_factor_ppm <= 10000000"},
        refs={"org_id": "orgs"},
    )
    create_table(
        "price_versions",
        ref("id"),
        ref("model_id"),
        ref("org_id", nullable=True),
        at("effective_from"),
        *amounts("input_price", "output_price", "cached_input_price", "request_price"),
        ref("created_by", nullable=True),
        at("created_at"),
        at("applied_at", nullable=True),
        refs={"model_id": "models", "org_id": "orgs"},
        cascade=("model_id",),
        named_uniques={"uq_price_versions_model_from": ("model_id", "effective_from")},
        indexes=("org_id", "effective_from"),
    )
    create_table(
        "plans",
        ref("id"),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("price", sa.BigInteger(), nullable=False),
        sa.Column("credit", sa.BigInteger(), nullable=False),
        sa.Column("validity_days", sa.Integer(), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        at("created_at"),
        uniques=("name",),
    )
    create_table(
        "packages",
        ref("id"),
        ref("org_id"),
        ref("plan_id", nullable=True),
        ref("order_id", nullable=True),
        sa.Column("credit", sa.BigInteger(), nullable=False),
        sa.Column("remaining", sa.BigInteger(), nullable=False),
        at("valid_from"),
        at("expires_at"),
        sa.Column("status", sa.String(length=16), nullable=False),
        at("created_at"),
        checks={
            "status": "status IN ('active','expired','revoked')",
            "remaining": "remaining >= 0 AND remaining <= credit",
        },
        refs={"org_id": "orgs", "plan_id": "plans"},
        indexes=("org_id",),
    )
    create_table(
        "package_consumptions",
        serial_id(),
        ref("package_id"),
        sa.Column("request_id", sa.String(length=64), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        at("created_at"),
        refs={"package_id": "packages"},
        named_uniques={"uq_package_consumptions_pkg_req": ("package_id", "request_id")},
    )
    create_table(
        "orders",
        ref("id"),
        ref("org_id"),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("credit", sa.BigInteger(), nullable=False),
        sa.Column("currency", sa.String(length=8), nullable=False),
        ref("plan_id", nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("payment_method", sa.String(length=24), nullable=False),
        sa.Column("payment_reference", sa.String(length=32), nullable=False),
        sa.Column("refunded_amount", sa.BigInteger(), nullable=False),
        ref("created_by", nullable=True),
        at("created_at"),
        at("updated_at"),
        at("paid_at", nullable=True),
        checks={
            "status": "status IN ('created','paid','failed','refunded','cancelled')",
            "kind": "kind IN ('recharge','package')",
            "amounts": "amount >= 0 AND credit > 0",
        },
        refs={"org_id": "orgs", "plan_id": "plans"},
        uniques=("payment_reference",),
        indexes=("org_id",),
    )
    create_table(
        "order_events",
        serial_id(),
        ref("order_id"),
        ref("org_id"),
        sa.Column("from_status", sa.String(length=16), nullable=True),
        sa.Column("to_status", sa.String(length=16), nullable=False),
        sa.Column("actor", sa.String(length=40), nullable=False),
        at("at"),
        refs={"order_id": "orders"},
        indexes=("order_id",),
    )
    create_table(
        "redemption_codes",
        ref("id"),
        sa.Column("code_hash", sa.String(length=64), nullable=False),
        sa.Column("display", sa.String(length=16), nullable=False),
        sa.Column("credit", sa.BigInteger(), nullable=False),
        ref("plan_id", nullable=True),
        at("expires_at", nullable=True),
        at("created_at"),
        at("redeemed_at", nullable=True),
        ref("redeemed_org_id", nullable=True),
        ref("redeemed_by", nullable=True),
        ref("order_id", nullable=True),
        refs={"plan_id": "plans"},
        uniques=("code_hash",),
    )
    create_table(
        "invoices",
        ref("id"),
        ref("org_id"),
        sa.Column("number", sa.String(length=32), nullable=False),
        sa.Column("period", sa.Integer(), nullable=False),
        sa.Column("title", sa.String(length=200), nullable=False),
        sa.Column("tax_id", sa.String(length=64), nullable=False),
        sa.Column("address", sa.String(length=400), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("currency", sa.String(length=8), nullable=False),
        sa.Column("lines", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        ref("created_by", nullable=True),
        at("created_at"),
        at("issued_at", nullable=True),
        checks={"status": "status IN ('requested','issued','void')"},
        refs={"org_id": "orgs"},
        uniques=("number",),
        indexes=("org_id",),
    )
    create_table(
        "billing_notices",
        serial_id(),
        sa.Column("notice_key", sa.String(length=200), nullable=False),
        ref("org_id"),
        at("created_at"),
        uniques=("notice_key",),
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
