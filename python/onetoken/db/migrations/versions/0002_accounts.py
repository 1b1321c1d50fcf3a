"""Accounts (login name, mobile, display name, auth status, operator flag, TOTP, invites)
and complete API keys (owner, secret version, not-before, allowed IPs, limits, rotation).
"""

import sqlalchemy as sa
from alembic import op

from onetoken.db.migrations.shapes import at, ref

revision: str = "0002_accounts"
down_revision: str | None = "0001"


def upgrade() -> None:
    # On SQLite this rebuilds `accounts` (to relax NOT NULL and add unique constraints);
    # env.py runs migrations with foreign keys off and checks them afterwards.
    with op.batch_alter_table("accounts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("login_name", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("mobile", sa.String(length=32), nullable=True))
        batch_op.add_column(
            sa.Column("display_name", sa.String(length=100), nullable=False, server_default="")
        )
        batch_op.add_column(
            sa.Column(
                "auth_status", sa.String(length=16), nullable=False, server_default="password"
            )
        )
        batch_op.add_column(
            sa.Column("is_operator", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch_op.add_column(
            sa.Column("totp_secret_encrypted", sa.String(length=512), nullable=True)
        )
        batch_op.add_column(sa.Column("totp_last_step", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("invite_token_hash", sa.String(length=64), nullable=True))
        batch_op.add_column(at("invite_expires_at", nullable=True))
        batch_op.add_column(at("last_login_at", nullable=True))
        batch_op.add_column(at("updated_at", nullable=True))
        batch_op.alter_column("email", existing_type=sa.String(length=254), nullable=True)
        batch_op.alter_column("password_hash", existing_type=sa.String(length=255), nullable=True)

    # Existing accounts sign in with their email, which becomes their login name too; the
    # first org's first owner is the deployment's bootstrap account: the operator.
    op.execute("UPDATE accounts SET login_name = email WHERE login_name IS NULL")
    op.execute(
        """
        UPDATE accounts SET is_operator = true WHERE id = (
            SELECT a.id FROM accounts a JOIN orgs o ON o.id = a.org_id
            WHERE a.role = 'owner'
            ORDER BY o.created_at, a.created_at LIMIT 1
        )
        """
    )
    with op.batch_alter_table("accounts", schema=None) as batch_op:
        batch_op.alter_column("login_name", existing_type=sa.String(length=64), nullable=False)
        batch_op.create_unique_constraint(batch_op.f("uq_accounts_login_name"), ["login_name"])
        batch_op.create_unique_constraint(batch_op.f("uq_accounts_mobile"), ["mobile"])
        batch_op.create_index(
            batch_op.f("ix_accounts_invite_token_hash"), ["invite_token_hash"], unique=False
        )

    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.add_column(ref("owner_id", nullable=True))
        batch_op.add_column(
            sa.Column("secret_version", sa.Integer(), nullable=False, server_default="1")
        )
        batch_op.add_column(at("not_before", nullable=True))
        batch_op.add_column(sa.Column("allowed_ips", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("rpm", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("tpm", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("concurrency", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("budget_day", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("budget_month", sa.BigInteger(), nullable=True))
        batch_op.add_column(ref("rotated_from", nullable=True))
        batch_op.add_column(at("updated_at", nullable=True))
        batch_op.create_index(batch_op.f("ix_api_keys_owner_id"), ["owner_id"], unique=False)
    op.execute("UPDATE api_keys SET owner_id = created_by WHERE owner_id IS NULL")


def downgrade() -> None:
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_api_keys_owner_id"))
        for name in (
            "updated_at",
            "rotated_from",
            "budget_month",
            "budget_day",
            "concurrency",
            "tpm",
            "rpm",
            "allowed_ips",
            "not_before",
            "secret_version",
            "owner_id",
        ):
            batch_op.drop_column(name)
    op.execute("DELETE FROM accounts WHERE email IS NULL OR password_hash IS NULL")
    with op.batch_alter_table("accounts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_accounts_invite_token_hash"))
        batch_op.drop_constraint(batch_op.f("uq_accounts_mobile"), type_="unique")
        batch_op.drop_constraint(batch_op.f("uq_accounts_login_name"), type_="unique")
        batch_op.alter_column("password_hash", existing_type=sa.String(length=255), nullable=False)
        batch_op.alter_column("email", existing_type=sa.String(length=254), nullable=False)
        for name in (
            "updated_at",
            "last_login_at",
            "invite_expires_at",
            "invite_token_hash",
            "totp_last_step",
            "totp_secret_encrypted",
            "is_operator",
            "auth_status",
            "display_name",
            "mobile",
            "login_name",
        ):
            batch_op.drop_column(name)
