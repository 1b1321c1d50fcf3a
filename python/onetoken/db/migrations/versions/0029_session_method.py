"""admin_sessions.method: how a console/API session was opened, `password` or `sso`
(docs/sso.md). When an org turns passwords off, the sessions its members opened with a
password end and those opened through its identity provider stay. Sessions open before
this revision were all opened with a password."""

import sqlalchemy as sa
from alembic import op

revision: str = "0029_session_method"
down_revision: str | None = "0028_transcription"


def upgrade() -> None:
    op.add_column(
        "admin_sessions",
        sa.Column("method", sa.String(length=16), nullable=False, server_default="password"),
    )


def downgrade() -> None:
    with op.batch_alter_table("admin_sessions") as batch:
        batch.drop_column("method")
