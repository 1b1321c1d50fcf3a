"""Erasure requests: which account was cancelled, when, and how far the anonymization got;
org terminations and their step log.

The row holds ids and timestamps; the personal data that was replaced is kept (encrypted)
only while ClickHouse could not be anonymized yet, and dropped once it was.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, ForeignKey, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from onetoken.db.base import Base, UTCDateTime, utcnow
from onetoken.orgs.models import Org

# held: the account is disabled and its keys revoked, but its org is under a legal hold, so
# nothing is anonymized until the hold ends; control_done: the control DB is anonymized,
# ClickHouse not yet (it was unreachable, or the org came under a hold); done: both are.
ERASURE_STATES = ("held", "control_done", "done")


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


class OrgTermination(Base):
    """An org whose termination was started (rights.termination): by whom, why, and the
    file its data export is written to (fixed at the start, so a resumed run writes the
    same one)."""

    __tablename__ = "org_terminations"

    org_id: Mapped[str] = mapped_column(ForeignKey(Org.id), primary_key=True)
    reason: Mapped[str] = mapped_column(String(500))
    # The operator's account; None from the CLI (whoever holds the data directory).
    requested_by: Mapped[str | None] = mapped_column(String(32), nullable=True)
    export_path: Mapped[str] = mapped_column(String(1024))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class OrgTerminationStep(Base):
    """The step log: a row per finished step, committed in the transaction of its work."""

    __tablename__ = "org_termination_steps"

    org_id: Mapped[str] = mapped_column(ForeignKey(Org.id), primary_key=True)
    step: Mapped[str] = mapped_column(String(32), primary_key=True)
    # Counts and ids of what the step did (never personal data).
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    done_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class LegalHold(Base):
    """An operator's hold on an org's records (docs/retention.md, "Legal holds"): while it
    stands (not lifted, not expired) retention purges and anonymization skip the org."""

    __tablename__ = "legal_holds"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    org_id: Mapped[str] = mapped_column(ForeignKey(Org.id), index=True)
    # The operator's grounds (a case or order reference): read by the org's members too.
    reason: Mapped[str] = mapped_column(String(500))
    placed_by: Mapped[str] = mapped_column(String(32))
    placed_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    lifted_by: Mapped[str | None] = mapped_column(String(32), nullable=True)
    lifted_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
