"""Request and response bodies of an org's identity provider configuration and the
sign-in through it (docs/sso.md)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, StringConstraints, model_validator
from pydantic_core import PydanticCustomError

Role = Literal["owner", "admin", "developer", "billing", "viewer", "analyst"]
Domain = Annotated[
    str,
    StringConstraints(
        strip_whitespace=True, to_lower=True, min_length=3, max_length=253,
        pattern=r"^[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)+$",
    ),
]
Group = Annotated[str, StringConstraints(min_length=1, max_length=255)]


class RoleMapping(BaseModel):
    model_config = ConfigDict(extra="forbid")

    group: Group
    role: Role


class SsoConfigIn(BaseModel):
    """The org's identity provider. `client_secret` may be left out when changing a saved
    configuration (the stored one is kept); it is never returned."""

    model_config = ConfigDict(extra="forbid")

    # https, or http where the operator allows internal providers; on an allowed address.
    issuer: Annotated[str, StringConstraints(strip_whitespace=True, min_length=8,
                                             max_length=2048, pattern=r"^https?://[^\s#@]+$")]
    client_id: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1,
                                                max_length=255)]
    client_secret: SecretStr | None = Field(default=None, min_length=1, max_length=1024)
    allowed_domains: list[Domain] = Field(min_length=1, max_length=50)
    group_claim: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.:/-]{1,64}$")] = (
        "groups"
    )
    role_map: list[RoleMapping] = Field(min_length=1, max_length=100)
    passwords_allowed: bool = True
    enabled: bool = True


class SsoConfigResponse(BaseModel):
    """The org's identity provider; `configured` false (and only the redirect URI, which
    the provider needs before anything is set here) when it has none."""

    model_config = ConfigDict(from_attributes=True)

    configured: bool = True
    org_id: str
    enabled: bool = False
    issuer: str | None = None
    client_id: str | None = None
    client_secret_set: bool = False
    allowed_domains: list[str] = []
    group_claim: str | None = None
    role_map: list[RoleMapping] = []
    passwords_allowed: bool = True
    redirect_uri: str = Field(description="Register it at the identity provider as is.")
    created_at: datetime | None = None
    updated_at: datetime | None = None


class SsoStartRequest(BaseModel):
    """Which org to sign in to: by the person's e-mail address (its domain) or by id."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"oneOf": [
        {"required": ["email"], "properties": {"email": {"type": "string"}}},
        {"required": ["org_id"], "properties": {"org_id": {"type": "string"}}},
    ]})

    email: Annotated[str, StringConstraints(strip_whitespace=True, min_length=3,
                                            max_length=254)] | None = None
    org_id: Annotated[str, StringConstraints(min_length=1, max_length=32)] | None = None

    @model_validator(mode="after")
    def _one(self) -> SsoStartRequest:
        if (self.email is None) == (self.org_id is None):
            raise PydanticCustomError("onetoken_sso_target", "Give exactly one of email or org_id.")
        return self


class SsoStartResponse(BaseModel):
    authorize_url: str = Field(description="Send the browser here.")
    org_id: str
