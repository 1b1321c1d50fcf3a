from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints

KeyName = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100)]
ModelName = Annotated[
    str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")
]
AllowedModels = Annotated[list[ModelName], Field(max_length=256)]


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: KeyName
    expires_at: AwareDatetime | None = None
    allowed_models: AllowedModels | None = None


class KeyUpdate(BaseModel):
    """Fields left out are unchanged; `null` clears `expires_at` / `allowed_models`."""

    model_config = ConfigDict(extra="forbid")

    name: KeyName | None = None
    status: Literal["active", "disabled"] | None = None
    expires_at: AwareDatetime | None = None
    allowed_models: AllowedModels | None = None


class KeyResponse(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    org_id: str
    name: str
    display: str
    status: Literal["active", "disabled", "revoked"]
    expires_at: datetime | None
    allowed_models: list[str] | None
    created_by: str
    created_at: datetime
    revoked_at: datetime | None


class KeyCreated(KeyResponse):
    key: str = Field(description="The API key. Shown only in this response; store it now.")


class KeyList(BaseModel):
    object: Literal["list"] = "list"
    data: list[KeyResponse]
