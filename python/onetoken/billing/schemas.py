from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints
from pydantic_core import PydanticCustomError

from onetoken.billing.service import MAX_ENTRY_NANO
from onetoken.kit.lists import ListOf
from onetoken.kit.money import MoneyIn, MoneyOut
from onetoken.kit.text import NOT_BLANK
from onetoken.providers.schemas import IMAGE_VARIANT_PATTERN

CreditKind = Literal["recharge", "grant", "refund", "adjustment"]
IdempotencyKey = Annotated[
    str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:-]+$")
]
Memo = Annotated[str, StringConstraints(strip_whitespace=True, max_length=200)]


def _non_zero(value: int) -> int:
    if value == 0:
        raise PydanticCustomError("onetoken_amount", "Amount must not be zero.")
    return value


def _within_entry_max(value: int) -> int:
    if abs(value) > MAX_ENTRY_NANO:
        raise PydanticCustomError(
            "onetoken_amount", "Amount is above the most one ledger entry may move."
        )
    return value


#: A non-zero amount one ledger entry may move (at most MAX_ENTRY_NANO either way).
EntryAmount = Annotated[MoneyIn, AfterValidator(_non_zero), AfterValidator(_within_entry_max)]


class CreditRequest(BaseModel):
    """Adds money to an org's balance (operators). Only `adjustment` may be negative; one
    entry moves at most 100000000 currency units and a balance holds at most 1000000000."""

    model_config = ConfigDict(extra="forbid")

    amount: EntryAmount
    kind: CreditKind = "recharge"
    org_id: str | None = Field(
        default=None, max_length=32, description="The org credited (default: the caller's)."
    )
    idempotency_key: IdempotencyKey | None = Field(
        default=None, description="Or the Idempotency-Key header. Required one way or the other."
    )
    memo: Memo | None = Field(default=None, description="Short operator note; no customer data.")


class BalanceResponse(BaseModel):
    org_id: str
    balance: MoneyOut
    currency: str
    package_credit: MoneyOut = Field(
        default=0, description="Part of the balance held by active packages (spent first)."
    )
    prepaid: MoneyOut = Field(default=0, description="balance - package_credit.")


class LedgerEntryResponse(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    org_id: str
    kind: Literal["recharge", "usage", "refund", "adjustment", "grant", "package_grant", "expiry"]
    amount: MoneyOut
    request_id: str | None
    memo: str | None
    created_at: datetime
    key_id: str | None = None
    model: str | None = None


class CreditResponse(BaseModel):
    entry: LedgerEntryResponse
    created: bool
    balance: MoneyOut


class LedgerPage(ListOf[LedgerEntryResponse]):
    has_more: bool


# -- settings and budgets ----------------------------------------------------------------


def _non_negative(value: int) -> int:
    if value < 0:
        raise PydanticCustomError("onetoken_amount", "Amount must not be negative.")
    return value


Budget = Annotated[MoneyIn, AfterValidator(_non_negative)]


class BillingSettingsResponse(BaseModel):
    org_id: str
    currency: str
    price_factor_ppm: int = Field(description="Applied to every price; 900000 = 10% off.")
    budget_day: MoneyOut | None
    budget_month: MoneyOut | None
    low_balance_threshold: MoneyOut | None


class BillingSettingsUpdate(BaseModel):
    """Fields left out are unchanged; null clears a budget or the threshold."""

    model_config = ConfigDict(extra="forbid")

    budget_day: Budget | None = None
    budget_month: Budget | None = None
    low_balance_threshold: Budget | None = None


# -- prices ------------------------------------------------------------------------------


class PriceVersionCreate(BaseModel):
    """Prices per million tokens (request_price per request), decimal strings."""

    model_config = ConfigDict(extra="forbid")

    model_id: str = Field(min_length=1, max_length=32)
    input_price: Budget
    output_price: Budget
    cached_input_price: Budget | None = Field(default=None, description="Default: input price.")
    request_price: Budget = 0
    image_prices: dict[
        Annotated[str, Field(min_length=1, max_length=40, pattern=IMAGE_VARIANT_PATTERN)], Budget
    ] = Field(
        default_factory=dict,
        max_length=64,
        description='Per image by "<size>/<quality>", "<size>" or "default".',
        json_schema_extra={"propertyNames": {"pattern": IMAGE_VARIANT_PATTERN, "maxLength": 40}},
    )
    audio_second_price: Budget = Field(default=0, description="Per second of audio in.")
    character_price: Budget = Field(default=0, description="Per million characters of speech.")
    search_unit_price: Budget = Field(default=0, description="Per rerank search unit.")
    effective_from: datetime | None = Field(default=None, description="Default: now.")


class PriceVersionResponse(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    model_id: str
    effective_from: datetime
    input_price: MoneyOut
    output_price: MoneyOut
    cached_input_price: MoneyOut
    request_price: MoneyOut
    image_prices: dict[str, MoneyOut]
    audio_second_price: MoneyOut
    character_price: MoneyOut
    search_unit_price: MoneyOut
    applied_at: datetime | None
    created_at: datetime


# -- plans, packages, orders -------------------------------------------------------------


class PlanResponse(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    price: MoneyOut
    credit: MoneyOut
    validity_days: int


class PackageResponse(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    plan_id: str | None
    order_id: str | None
    credit: MoneyOut
    remaining: MoneyOut
    valid_from: datetime
    expires_at: datetime
    status: Literal["active", "expired", "revoked"]


class OrderCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["recharge", "package"]
    amount: EntryAmount | None = Field(
        default=None, description="Recharges only."
    )
    plan_id: str | None = Field(default=None, max_length=32, description="Packages only.")
    payment_method: Literal["bank_transfer"] = "bank_transfer"


OrderStatus = Literal["created", "paid", "failed", "refunded", "cancelled"]


class OrderEventResponse(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    from_status: str | None
    to_status: str
    actor: str
    at: datetime


class PaymentInstructionsResponse(BaseModel):
    method: str
    reference: str
    text: str


class OrderResponse(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    org_id: str
    kind: Literal["recharge", "package"]
    amount: MoneyOut
    credit: MoneyOut
    currency: str
    plan_id: str | None
    status: OrderStatus
    payment_method: str
    payment_reference: str
    refunded_amount: MoneyOut
    created_at: datetime
    paid_at: datetime | None
    events: list[OrderEventResponse] = []
    instructions: PaymentInstructionsResponse | None = None


class OrderList(ListOf[OrderResponse]): ...


class RefundRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    amount: EntryAmount | None = Field(
        default=None, description="Money paid back; default: all of it."
    )


RedemptionCodeText = Annotated[
    str,
    StringConstraints(
        strip_whitespace=True, min_length=8, max_length=64, pattern=r"^[A-Za-z0-9 -]+$"
    ),
]


class RedeemRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    code: RedemptionCodeText


# -- statements, invoices, call statistics -----------------------------------------------


class UsageRowResponse(BaseModel):
    group: str
    calls: int
    prompt_tokens: int
    completion_tokens: int
    cost: MoneyOut


class StatementEntry(BaseModel):
    id: int
    kind: str
    amount: MoneyOut
    created_at: datetime
    memo: str | None


class StatementResponse(BaseModel):
    org_id: str
    period: str
    currency: str
    opening_balance: MoneyOut
    closing_balance: MoneyOut
    movement: dict[str, MoneyOut]
    ledger_usage: MoneyOut
    call_log_cost: MoneyOut
    difference: MoneyOut
    calls: int
    by_model: list[UsageRowResponse]
    by_key: list[UsageRowResponse]
    by_day: list[UsageRowResponse]
    by_application: list[UsageRowResponse] = Field(
        description="Usage per application the keys were in when they spent ('': none)."
    )
    credits: list[StatementEntry]


# Blank once stripped is refused; the pattern says so in the document too.
InvoiceText = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, pattern=NOT_BLANK)
]


class InvoiceCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    period: Annotated[str, StringConstraints(pattern=r"^\d{4}-?\d{2}$")]
    title: Annotated[InvoiceText, StringConstraints(max_length=200)]
    tax_id: Annotated[InvoiceText, StringConstraints(max_length=64)]
    address: Annotated[InvoiceText, StringConstraints(max_length=400)]


class InvoiceLine(BaseModel):
    description: str
    calls: int
    amount: MoneyOut


class InvoiceResponse(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    number: str
    period: int
    title: str
    tax_id: str
    address: str
    amount: MoneyOut
    currency: str
    status: Literal["requested", "issued", "void"]
    lines: list[InvoiceLine]
    created_at: datetime
    issued_at: datetime | None


class InvoiceList(ListOf[InvoiceResponse]): ...


class CallStatsRow(BaseModel):
    group: str
    calls: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    cost: MoneyOut
    latency_p50_us: int
    latency_p99_us: int


class CallStatsResponse(BaseModel):
    org_id: str
    group_by: Literal["model", "key", "day", "application"]
    start: datetime
    end: datetime
    data: list[CallStatsRow]
