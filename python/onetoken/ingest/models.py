"""Ingestion state in the control DB (migrations 0011_ingest, 0012_ingest_retired,
0013_ingest_written_off)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, String
from sqlalchemy.orm import Mapped, mapped_column

from onetoken.db.base import Base, UTCDateTime, utcnow


class IngestCursor(Base):
    """How far one consumer has read one engine instance's journal: every record before
    byte `offset` of segment `segment` (and in every lower segment) is consumed."""

    __tablename__ = "ingest_cursors"

    #: "ledger" or "call_log": each moves on its own, so a ClickHouse outage delays only
    #: call_log.
    consumer: Mapped[str] = mapped_column(String(16), primary_key=True)
    instance_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    segment: Mapped[int] = mapped_column(BigInteger)
    # Not "offset": a reserved word in SQL.
    offset: Mapped[int] = mapped_column("byte_offset", BigInteger)


class IngestMark(Base):
    """Cost ingested into the ledger from one engine instance, per org, per key or per
    application: the spent mark that instance's snapshot carries."""

    __tablename__ = "ingest_marks"

    instance_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    #: "org", "key" or "app".
    scope: Mapped[str] = mapped_column(String(8), primary_key=True)
    subject_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    amount: Mapped[int] = mapped_column(BigInteger)


class IngestRetired(Base):
    """An engine instance retired with Redis configured: its journal is fully ingested and
    its process gone, so its marks leave its orgs' money caps. The cap publisher deletes
    its leases in Redis, then its cursors, marks and this row (docs/scale-out.md)."""

    __tablename__ = "ingest_retired"

    instance_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    retired_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class IngestWrittenOff(Base):
    """An engine instance an operator wrote off after its journal was lost (onetoken.ingest
    .gateways). Kept for good: retiring it keeps its cursors, so a journal that turns up
    after all is read on from where the ledger stopped, never charged twice."""

    __tablename__ = "ingest_written_off"

    instance_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    written_off_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
