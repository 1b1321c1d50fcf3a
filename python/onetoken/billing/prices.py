"""Versioned model prices.

A version says "from `effective_from` on, this model costs ...". When it comes due its
prices are copied onto the model row (which the snapshot is built from) and the engine
gets a new snapshot; the engine computes each request's cost at the prices in the snapshot
it ran under and the record carries that cost, so a later version never changes a past
charge. Versions are never edited or deleted: the table is the price history.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from onetoken.billing.models import PriceVersion
from onetoken.db.base import new_id, utcnow
from onetoken.db.session import bump_revision, get_scoped
from onetoken.kit.errors import Conflict, Unprocessable
from onetoken.providers.models import Model

log = logging.getLogger("onetoken.billing")

# A version may not start in the past (it could not apply there); this much clock skew
# between the caller and the server is tolerated and treated as "now".
PAST_TOLERANCE = timedelta(seconds=60)


#: The unit prices a model row and a price version carry besides token prices.
UNIT_PRICE_FIELDS = ("audio_second_price", "character_price", "search_unit_price")


@dataclass(frozen=True, slots=True)
class Prices:
    input_price: int
    output_price: int
    cached_input_price: int
    request_price: int = 0
    # Unit prices (docs/gateway-spec.md, "Unit prices"), nano-units: per image by
    # "<size>/<quality>", "<size>" or "default"; per second of audio in; per million
    # characters of speech; per rerank search unit.
    image_prices: Mapping[str, int] = field(default_factory=dict)
    audio_second_price: int = 0
    character_price: int = 0
    search_unit_price: int = 0

    @classmethod
    def listed(
        cls, input_price: int, output_price: int, cached_input_price: int | None, request_price: int
    ) -> Prices:
        """Prices as an operator lists them: cached input costs what input costs unless
        it has its own price."""
        cached = input_price if cached_input_price is None else cached_input_price
        return cls(input_price, output_price, cached, request_price)

    def with_units(
        self,
        image_prices: Mapping[str, int] | None = None,
        audio_second_price: int = 0,
        character_price: int = 0,
        search_unit_price: int = 0,
    ) -> Prices:
        return Prices(
            self.input_price, self.output_price, self.cached_input_price, self.request_price,
            dict(image_prices or {}), audio_second_price, character_price, search_unit_price,
        )


def _model_for(session: Session, org_id: str | None, model_id: str) -> Model:
    # Platform models (org_id None) are priced by the operator only (org_id None here).
    return get_scoped(session, Model, model_id, (org_id,), "Model not found.")


def add_version(
    session: Session,
    org_id: str | None,
    model_id: str,
    prices: Prices,
    *,
    effective_from: datetime | None = None,
    created_by: str | None = None,
    now: datetime | None = None,
) -> PriceVersion:
    """Schedule (or, effective now, apply at once) new prices for a model."""
    at = now or utcnow()
    model = _model_for(session, org_id, model_id)
    start = effective_from or at
    if start < at - PAST_TOLERANCE:
        raise Unprocessable("effective_from must not be in the past.", param="effective_from")
    start = max(start, at)
    for value in (prices.input_price, prices.output_price, prices.cached_input_price):
        if value < 0:
            raise Unprocessable("Prices must not be negative.", param="input_price")
    for name in ("request_price", *UNIT_PRICE_FIELDS):
        if getattr(prices, name) < 0:
            raise Unprocessable("Prices must not be negative.", param=name)
    if any(v < 0 for v in prices.image_prices.values()):
        raise Unprocessable("Prices must not be negative.", param="image_prices")
    clash = session.scalar(
        select(PriceVersion.id).where(
            PriceVersion.model_id == model.id, PriceVersion.effective_from == start
        )
    )
    if clash is not None:
        raise Conflict("A price version with this start already exists.", param="effective_from")
    version = PriceVersion(
        id=new_id("price"),
        model_id=model.id,
        org_id=model.org_id,
        effective_from=start,
        input_price=prices.input_price,
        output_price=prices.output_price,
        cached_input_price=prices.cached_input_price,
        request_price=prices.request_price,
        image_prices=dict(prices.image_prices),
        audio_second_price=prices.audio_second_price,
        character_price=prices.character_price,
        search_unit_price=prices.search_unit_price,
        created_by=created_by,
        created_at=at,
    )
    session.add(version)
    session.flush()
    apply_due(session, at)
    log.info("price.version_added", extra={"org_id": org_id, "model_id": model.id})
    return version


def list_versions(session: Session, org_id: str | None, model_id: str) -> Sequence[PriceVersion]:
    _model_for(session, org_id, model_id)
    return session.scalars(
        select(PriceVersion)
        .where(PriceVersion.model_id == model_id)
        .order_by(PriceVersion.effective_from.desc())
    ).all()


def price_at(session: Session, model_id: str, at: datetime) -> PriceVersion | None:
    """The version in force at `at` (None before the first version)."""
    return session.scalars(
        select(PriceVersion)
        .where(PriceVersion.model_id == model_id, PriceVersion.effective_from <= at)
        .order_by(PriceVersion.effective_from.desc())
        .limit(1)
    ).first()


def apply_due(session: Session, now: datetime | None = None) -> int:
    """Copy every version that has come due onto its model (latest wins) and mark the
    config stale. Returns how many models changed. The caller commits."""
    at = now or utcnow()
    due = session.scalars(
        select(PriceVersion)
        .where(PriceVersion.applied_at.is_(None), PriceVersion.effective_from <= at)
        .order_by(PriceVersion.model_id, PriceVersion.effective_from)
    ).all()
    if not due:
        return 0
    latest: dict[str, PriceVersion] = {}
    for v in due:
        v.applied_at = at
        latest[v.model_id] = v
    changed = 0
    for model_id, v in latest.items():
        current = price_at(session, model_id, at)
        # An older due version never overrides a newer one applied earlier.
        if current is not None and current.id != v.id:
            continue
        model = session.get(Model, model_id)
        if model is None:
            continue
        model.input_price = v.input_price
        model.output_price = v.output_price
        model.cached_input_price = v.cached_input_price
        if hasattr(model, "request_price"):
            model.request_price = v.request_price
        model.image_prices = dict(v.image_prices or {})
        for name in UNIT_PRICE_FIELDS:
            setattr(model, name, getattr(v, name))
        changed += 1
    bump_revision(session)
    session.flush()
    return changed


def next_change_at(session: Session, now: datetime | None = None) -> datetime | None:
    at = now or utcnow()
    return session.scalar(
        select(PriceVersion.effective_from)
        .where(PriceVersion.applied_at.is_(None), PriceVersion.effective_from > at)
        .order_by(PriceVersion.effective_from)
        .limit(1)
    )
