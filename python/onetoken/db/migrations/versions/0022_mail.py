"""E-mail: the outbox the mail worker sends from, and self-service password resets
(docs/operations.md, "E-mail").

A message's body is stored encrypted and dropped once sent; a reset token is stored as
a keyed hash only."""

import sqlalchemy as sa
from alembic import op

from onetoken.db.migrations.shapes import at, create_table, ref

revision: str = "0022_mail"
down_revision: str | None = "0021_legal_holds"


def upgrade() -> None:
    create_table(
        "mail_outbox",
        ref("id"),
        sa.Column("kind", sa.String(length=32), nullable=False),
        ref("org_id", nullable=True),
        sa.Column("to_address", sa.String(length=254), nullable=False),
        sa.Column("subject", sa.String(length=200), nullable=False),
        sa.Column("body_encrypted", sa.Text(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        at("next_attempt_at"),
        sa.Column("last_error", sa.String(length=64), nullable=True),
        at("created_at"),
        at("sent_at", nullable=True),
        indexes=(("status", "next_attempt_at"),),
    )
    create_table(
        "password_resets",
        ref("id"),
        ref("account_id"),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        at("created_at"),
        at("expires_at"),
        at("used_at", nullable=True),
        refs={"account_id": "accounts"},
        uniques=("token_hash",),
        indexes=(("account_id", "created_at"),),
    )


def downgrade() -> None:
    op.drop_table("password_resets")
    op.drop_table("mail_outbox")
