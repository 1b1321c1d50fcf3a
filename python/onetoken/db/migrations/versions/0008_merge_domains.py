"""Join the per-domain branches (accounts, security, billing, providers, webhooks,
rights) into one head, so later migrations have a single parent.
"""

from __future__ import annotations

revision: str = "0008_merge_domains"
down_revision: tuple[str, ...] = (
    "0002_accounts",
    "0003_security",
    "0004_billing",
    "0005_providers",
    "0006_webhooks",
    "0007_rights",
)


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
