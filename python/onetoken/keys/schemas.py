from __future__ import annotations

import ipaddress
from datetime import datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints
from pydantic_core import PydanticCustomError

from onetoken.kit.lists import ListOf
from onetoken.kit.money import MoneyIn, MoneyOut
from onetoken.kit.text import NOT_BLANK

# Blank once stripped is refused; the pattern says so in the document too.
KeyName = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100, pattern=NOT_BLANK)
]
ModelName = Annotated[
    str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")
]
AllowedModels = Annotated[list[ModelName], Field(max_length=256)]


def _cidr(value: str) -> str:
    try:
        return str(ipaddress.ip_network(value.strip(), strict=False))
    except ValueError:
        raise PydanticCustomError(
            "onetoken_cidr", "Must be an IPv4/IPv6 address or CIDR such as 10.0.0.0/8."
        ) from None


Cidr = Annotated[str, StringConstraints(min_length=2, max_length=64), AfterValidator(_cidr)]
AllowedIps = Annotated[list[Cidr], Field(max_length=256)]
Count = Annotated[int, Field(ge=1, le=2_000_000_000)]
Budget = Annotated[MoneyIn, Field(ge=0)]


class KeyLimits(BaseModel):
    """Per-key limits; null = no limit. Budgets are decimal strings in the deployment
    currency, for the current UTC day / month."""

    model_config = ConfigDict(extra="forbid")

    rpm: Count | None = None
    tpm: Count | None = None
    concurrency: Count | None = None
    budget_day: Budget | None = None
    budget_month: Budget | None = None


class KeyLimitsOut(BaseModel):
    rpm: int | None
    tpm: int | None
    concurrency: int | None
    budget_day: MoneyOut | None
    budget_month: MoneyOut | None


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: KeyName
    owner_id: Annotated[str, StringConstraints(max_length=32)] | None = Field(
        default=None, description="Account that owns the key (default: the caller)."
    )
    expires_at: AwareDatetime | None = None
    not_before: AwareDatetime | None = None
    allowed_models: AllowedModels | None = None
    allowed_ips: AllowedIps | None = Field(
        default=None, description="Source addresses/CIDRs the key may be used from; null = any."
    )
    limits: KeyLimits | None = None
    application_id: Annotated[str, StringConstraints(max_length=32)] | None = Field(
        default=None, description="Application the key belongs to (default: none)."
    )


class KeyUpdate(BaseModel):
    """Fields left out are unchanged; `null` clears `expires_at`, `not_before`,
    `allowed_models`, `allowed_ips`; `limits` replaces all limits at once;
    `application_id` moves the key into that application (`null`: out of any)."""

    model_config = ConfigDict(extra="forbid")

    name: KeyName | None = None
    owner_id: Annotated[str, StringConstraints(max_length=32)] | None = None
    status: Literal["active", "disabled"] | None = None
    expires_at: AwareDatetime | None = None
    not_before: AwareDatetime | None = None
    allowed_models: AllowedModels | None = None
    allowed_ips: AllowedIps | None = None
    limits: KeyLimits | None = None
    application_id: Annotated[str, StringConstraints(max_length=32)] | None = None


class KeyRotate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    overlap_seconds: Annotated[int, Field(ge=0, le=90 * 86400)] | None = Field(
        default=None,
        description="How long the old key keeps working (default ONETOKEN_KEY_ROTATION_"
        "OVERLAP_HOURS); 0 ends it now.",
    )


class KeyResponse(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    org_id: str
    name: str
    display: str
    status: Literal["active", "disabled", "revoked"]
    owner_id: str | None
    expires_at: datetime | None
    not_before: datetime | None
    allowed_models: list[str] | None
    allowed_ips: list[str] | None
    limits: KeyLimitsOut
    application_id: str | None
    secret_version: int
    rotated_from: str | None
    created_by: str
    created_at: datetime
    updated_at: datetime | None
    revoked_at: datetime | None


class KeyCreated(KeyResponse):
    key: str = Field(description="The API key. Shown only in this response; store it now.")


class KeyRotated(KeyCreated):
    previous_key_id: str
    previous_key_expires_at: datetime | None


class KeyList(ListOf[KeyResponse]): ...


# -- applications ---------------------------------------------------------------------------

AppName = KeyName
Description = Annotated[str, StringConstraints(max_length=500)]


class ApplicationCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: AppName
    owner_id: Annotated[str, StringConstraints(max_length=32)] | None = Field(
        default=None, description="Account of the org that owns it (default: the caller)."
    )
    description: Description = ""
    limits: KeyLimits | None = Field(
        default=None, description="Limits over all of the application's keys together."
    )


class ApplicationUpdate(BaseModel):
    """Fields left out are unchanged; `limits` replaces all limits at once. Name and owner
    are the org admins' to change; description and limits also the application owner's."""

    model_config = ConfigDict(extra="forbid")

    name: AppName | None = None
    owner_id: Annotated[str, StringConstraints(max_length=32)] | None = None
    description: Description | None = None
    limits: KeyLimits | None = None


class ApplicationKey(BaseModel):
    id: str
    name: str
    display: str
    status: Literal["active", "disabled", "revoked"]
    owner_id: str | None


class ApplicationResponse(BaseModel):
    id: str
    org_id: str
    name: str
    description: str
    owner_id: str
    limits: KeyLimitsOut
    keys: list[ApplicationKey]
    created_by: str | None
    created_at: datetime
    updated_at: datetime | None


class ApplicationList(ListOf[ApplicationResponse]): ...
