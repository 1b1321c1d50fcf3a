from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints
from pydantic_core import PydanticCustomError

from onetoken.kit.money import MoneyIn, MoneyOut

CreditKind = Literal["recharge", "grant", "refund", "adjustment"]
IdempotencyKey = Annotated[
    str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:-]+$")
]
Memo = Annotated[str, StringConstraints(strip_whitespace=True, max_length=200)]


def _non_zero(value: int) -> int:
    if value == 0:
        raise PydanticCustomError("onetoken_amount", "Amount must not be zero.")
    return value


class CreditRequest(BaseModel):
    """Adds money to the org's balance. Only `adjustment` may be negative."""

    model_config = ConfigDict(extra="forbid")

    amount: Annotated[MoneyIn, AfterValidator(_non_zero)]
    kind: CreditKind = "recharge"
    idempotency_key: IdempotencyKey | None = Field(
        default=None, description="Or the Idempotency-Key header. Required one way or the other."
    )
    memo: Memo | None = Field(default=None, description="Short operator note; no customer data.")


class BalanceResponse(BaseModel):
    org_id: str
    balance: MoneyOut
    currency: str


class LedgerEntryResponse(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    org_id: str
    kind: Literal["recharge", "usage", "refund", "adjustment", "grant"]
    amount: MoneyOut
    request_id: str | None
    memo: str | None
    created_at: datetime


class CreditResponse(BaseModel):
    entry: LedgerEntryResponse
    created: bool
    balance: MoneyOut


class LedgerPage(BaseModel):
    object: Literal["list"] = "list"
    data: list[LedgerEntryResponse]
    has_more: bool
