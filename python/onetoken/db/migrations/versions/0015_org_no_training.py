"""No provider that trains on submitted data serves an org unless its owner chose so.

Policies stored before this had `no_training: false` whenever an admin set any other
field: that was the old default, never anyone's choice. They get `no_training: true`;
from now on only the org's owner can lift it, and the security log records it
(providers.gateway_service.set_policy). Orgs without a stored policy take the new
default with no change here.
"""

import json
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0015_org_no_training"
down_revision: str | None = "0014_pools"

_settings = sa.table(
    "org_gateway_settings", sa.column("org_id", sa.String), sa.column("policy", sa.JSON)
)


def upgrade() -> None:
    bind = op.get_bind()
    rows = bind.execute(
        sa.select(_settings.c.org_id, _settings.c.policy).where(_settings.c.policy.is_not(None))
    ).all()
    for org_id, policy in rows:
        stored: dict[str, Any] = json.loads(policy) if isinstance(policy, str) else dict(policy)
        if stored.get("no_training"):
            continue
        stored["no_training"] = True
        bind.execute(
            sa.update(_settings).where(_settings.c.org_id == org_id).values(policy=stored)
        )


def downgrade() -> None:
    # The old default was permissive: a stored `no_training: true` reads the same there.
    pass
