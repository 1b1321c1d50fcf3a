"""Sign-in through an org's own identity provider (OpenID Connect, docs/sso.md): the
org's configuration, the link from a provider's subject to an account, and the sign-ins
under way (single use, short-lived)."""

import sqlalchemy as sa
from alembic import op

from onetoken.db.migrations.shapes import at, create_table, ref

revision: str = "0026_oidc"
down_revision: str | None = "0025_unit_prices"


def upgrade() -> None:
    create_table(
        "org_sso",
        ref("org_id"),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("issuer", sa.String(length=2048), nullable=False),
        sa.Column("client_id", sa.String(length=255), nullable=False),
        sa.Column("client_secret_encrypted", sa.String(length=4096), nullable=False),
        sa.Column("allowed_domains", sa.String(length=2048), nullable=False),
        sa.Column("group_claim", sa.String(length=64), nullable=False),
        sa.Column("role_map", sa.JSON(), nullable=False),
        sa.Column("passwords_allowed", sa.Boolean(), nullable=False),
        at("created_at"),
        at("updated_at"),
        key=("org_id",),
        refs={"org_id": "orgs"},
    )
    create_table(
        "sso_identities",
        ref("account_id"),
        ref("org_id"),
        sa.Column("subject", sa.String(length=255), nullable=False),
        at("created_at"),
        key=("account_id",),
        refs={"account_id": "accounts", "org_id": "orgs"},
        named_uniques={"uq_sso_identities_org_subject": ("org_id", "subject")},
    )
    create_table(
        "sso_flows",
        ref("id"),
        ref("org_id"),
        sa.Column("state_hash", sa.String(length=64), nullable=False),
        sa.Column("browser_hash", sa.String(length=64), nullable=False),
        sa.Column("nonce", sa.String(length=64), nullable=False),
        sa.Column("code_verifier_encrypted", sa.String(length=512), nullable=False),
        at("created_at"),
        at("expires_at"),
        refs={"org_id": "orgs"},
        uniques=("state_hash",),
        indexes=("expires_at",),
    )


def downgrade() -> None:
    op.drop_table("sso_flows")
    op.drop_table("sso_identities")
    op.drop_table("org_sso")
