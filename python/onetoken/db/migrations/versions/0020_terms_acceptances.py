"""Acceptances of the terms of service: who accepted which version, on behalf of which
org, when and from which address (policy section XII.2, docs/terms.md).

Accounts that exist before this revision have accepted nothing: each is asked at its
next request, as after any new version of the terms."""

import sqlalchemy as sa
from alembic import op

from onetoken.db.migrations.shapes import at, create_table, ref

revision: str = "0020_terms_acceptances"
down_revision: str | None = "0019_termination"


def upgrade() -> None:
    create_table(
        "terms_acceptances",
        ref("id"),
        ref("account_id"),
        ref("org_id"),
        sa.Column("version", sa.String(length=32), nullable=False),
        at("accepted_at"),
        sa.Column("source_ip", sa.String(length=64), nullable=False),
        refs={"account_id": "accounts", "org_id": "orgs"},
        named_uniques={"uq_terms_acceptances_account_version": ("account_id", "version")},
        indexes=(("org_id", "accepted_at"),),
    )


def downgrade() -> None:
    op.drop_table("terms_acceptances")
