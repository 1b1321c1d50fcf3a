"""Erasure requests: which account was cancelled, when, and how far the anonymization got.

The row holds ids and timestamps; the personal data that was replaced is kept (encrypted)
only while ClickHouse could not be anonymized yet, and dropped once it was.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import String, Text
from sqlalchemy.orm import Mapped, mapped_column

from onetoken.db.base import Base, UTCDateTime, utcnow

# control_done: the control DB is anonymized, ClickHouse not yet (it was unreachable);
# done: both are.
ERASURE_STATES = ("control_done", "done")


class AccountErasure(Base):
    __tablename__ = "account_erasures"

    account_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    org_id: Mapped[str] = mapped_column(String(32), index=True)
    requested_by: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(16), default="control_done")
    requested_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # While state is control_done: what ClickHouse still has to anonymize (identifiers,
    # key ids), encrypted under ONETOKEN_SECRET_KEY; NULL once done.
    pending_encrypted: Mapped[str | None] = mapped_column(Text, nullable=True)
