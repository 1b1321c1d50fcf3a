"""Where security events go out to a SIEM over syslog, and how far each destination got."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Boolean, ForeignKey, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from onetoken.db.base import Base, UTCDateTime, utcnow
from onetoken.orgs.models import Org

#: The id of the operator's destination (every org's events, configured by settings).
OPERATOR = "operator"


class SiemDestination(Base):
    """One syslog receiver and its durable cursor.

    The operator's row (id `operator`, no org) mirrors ONETOKEN_SIEM_SYSLOG_ADDRESS; an
    org's row is what its admins saved, at most one per org. The cursor is the (ts,
    event_id) of the last event the receiver confirmed; everything after it, in that
    order, is still to send."""

    __tablename__ = "siem_destinations"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    org_id: Mapped[str | None] = mapped_column(
        ForeignKey(Org.id, ondelete="CASCADE"), nullable=True, unique=True
    )
    host: Mapped[str] = mapped_column(String(253))
    port: Mapped[int] = mapped_column(Integer)
    # The PEM CA bundle an org's receiver is verified with (the system's CAs when None).
    ca_pem: Mapped[str | None] = mapped_column(Text, nullable=True)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    cursor_ts_us: Mapped[int] = mapped_column(BigInteger, default=0)
    cursor_event_id: Mapped[str] = mapped_column(String(64), default="")
    delivered: Mapped[int] = mapped_column(BigInteger, default=0)
    # Consecutive failed sends; the next attempt waits longer with each.
    failures: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # A fixed code of the last failure (tls_verify, connect_error, ...), never the peer's text.
    last_error: Mapped[str | None] = mapped_column(String(64), nullable=True)
    last_delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # Which control process sends for this destination until when: with several, one.
    lease_owner: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
