"""Legal holds: an operator's hold on an org's records, with its grounds and expiry."""

import sqlalchemy as sa

from onetoken.db.migrations.shapes import at, create_table, ref

revision: str = "0021_legal_holds"
down_revision: str | None = "0020_terms_acceptances"


def upgrade() -> None:
    create_table(
        "legal_holds",
        ref("id"),
        ref("org_id"),
        sa.Column("reason", sa.String(length=500), nullable=False),
        ref("placed_by"),
        at("placed_at"),
        at("expires_at"),
        ref("lifted_by", nullable=True),
        at("lifted_at", nullable=True),
        refs={"org_id": "orgs"},
        indexes=("org_id",),
    )

