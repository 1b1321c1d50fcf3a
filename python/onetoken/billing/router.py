from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Response

from onetoken.billing import service
from onetoken.billing.schemas import (
    BalanceResponse,
    CreditRequest,
    CreditResponse,
    IdempotencyKey,
    LedgerEntryResponse,
    LedgerPage,
)
from onetoken.deps import BillingWriterDep, PrincipalDep, SessionDep, StateDep
from onetoken.kit.errors import Unprocessable

router = APIRouter(prefix="/billing", tags=["billing"])


@router.get("/balance", response_model=BalanceResponse)
def get_balance(principal: PrincipalDep, session: SessionDep, state: StateDep) -> BalanceResponse:
    return BalanceResponse(
        org_id=principal.org_id,
        balance=service.balance(session, principal.org_id),
        currency=state.settings.currency,
    )


@router.post("/credits", response_model=CreditResponse)
def credit(
    body: CreditRequest,
    principal: BillingWriterDep,
    session: SessionDep,
    state: StateDep,
    response: Response,
    idempotency_key: Annotated[IdempotencyKey | None, Header()] = None,
) -> CreditResponse:
    key = body.idempotency_key or idempotency_key
    if key is None:
        raise Unprocessable(
            "An idempotency key is required (body field or Idempotency-Key header).",
            param="idempotency_key",
        )
    entry, created = service.credit(
        session,
        principal.org_id,
        amount=body.amount,
        kind=body.kind,
        idempotency_key=key,
        memo=body.memo,
        created_by=principal.account_id,
    )
    session.commit()
    if created:
        state.config_changed()
    response.status_code = 201 if created else 200
    return CreditResponse(
        entry=LedgerEntryResponse.model_validate(entry),
        created=created,
        balance=service.balance(session, principal.org_id),
    )


@router.get("/ledger", response_model=LedgerPage)
def list_ledger(
    principal: PrincipalDep,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    before_id: Annotated[int | None, Query(ge=1)] = None,
) -> LedgerPage:
    rows, has_more = service.list_entries(
        session, principal.org_id, limit=limit, before_id=before_id
    )
    return LedgerPage(data=[LedgerEntryResponse.model_validate(r) for r in rows], has_more=has_more)
