from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StringConstraints,
    WithJsonSchema,
    model_validator,
)
from pydantic.config import JsonDict
from pydantic_core import PydanticCustomError

from onetoken.kit.lists import ListOf
from onetoken.kit.money import SCHEMA_IN_NON_NEGATIVE, MoneyIn, MoneyOut
from onetoken.kit.text import NOT_BLANK
from onetoken.orgs.auth import MIN_PASSWORD_LEN

# A new password's strength rule (auth.check_password_strength, whose message says the
# rule without echoing the input) stated in the document too.
NEW_PASSWORD: JsonDict = {"minLength": MIN_PASSWORD_LEN}
# What service.validate_identifiers accepts, for the document (a little stricter where the
# exact rule cannot be written): login names; email addresses, which also serve as the
# login name when none is given; mobile numbers without the separators it removes.
LOGIN_NAME: JsonDict = {"pattern": r"^[A-Za-z0-9+][A-Za-z0-9._@+-]{1,63}$"}
EMAIL: JsonDict = {"pattern": r"^(?=.{2,64}$)[A-Za-z0-9+][A-Za-z0-9._+-]*@[A-Za-z0-9._@+-]*$"}
MOBILE: JsonDict = {"pattern": r"^\+?[0-9]{6,20}$"}

Role = Literal["owner", "admin", "developer", "billing", "viewer", "analyst"]
AccountStatus = Literal["active", "disabled"]
# sso: created by the org's identity provider, no password (docs/sso.md).
AuthStatus = Literal["invited", "password", "totp", "sso"]

DisplayName = Annotated[str, StringConstraints(strip_whitespace=True, max_length=100)]
# Blank once stripped is refused; the pattern says so in the document too.
OrgName = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100, pattern=NOT_BLANK)
]
Identifier = Annotated[str, StringConstraints(min_length=1, max_length=254)]
TotpCode = Annotated[str, StringConstraints(min_length=6, max_length=8, pattern=r"^[0-9 ]+$")]


class LoginRequest(BaseModel):
    """`login` is the login name, email or mobile number (`email` is accepted for it)."""

    # The document says what _one_identifier enforces: exactly one of the two, not null.
    model_config = ConfigDict(extra="forbid", json_schema_extra={"oneOf": [
        {"required": ["login"], "properties": {"login": {"type": "string"}}},
        {"required": ["email"], "properties": {"email": {"type": "string"}}},
    ]})

    login: Identifier | None = None
    email: Identifier | None = None
    password: SecretStr = Field(min_length=1, max_length=1024)
    totp_code: TotpCode | None = None

    @model_validator(mode="after")
    def _one_identifier(self) -> LoginRequest:
        if (self.login is None) == (self.email is None):
            raise PydanticCustomError(
                "onetoken_identifier", "Give exactly one of login or email."
            )
        return self

    @property
    def identifier(self) -> str:
        return self.login if self.login is not None else (self.email or "")


# Sign-in answers say when the session is held to the terms of service (docs/terms.md).
TERMS_PENDING = Field(
    default=None,
    description="The version of the terms of service to accept (POST /api/v1/me/terms/accept) "
    "before anything but the own profile, the terms and signing out; null: none.",
)


class TokenResponse(BaseModel):
    access_token: str
    token_type: Literal["bearer"] = "bearer"  # noqa: S105 (the OAuth token type name)
    expires_at: datetime
    terms_pending: str | None = TERMS_PENDING


class ConsoleSessionResponse(BaseModel):
    csrf_token: str = Field(description="Send it back in X-CSRF-Token on unsafe requests.")
    expires_at: datetime
    terms_pending: str | None = TERMS_PENDING


#: Restriction of processing (policy XIII.4): `clear`, or `restricted` (docs/retention.md).
RestrictionMode = Literal["clear", "restricted"]


class RestrictionUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: RestrictionMode


class RestrictionResponse(BaseModel):
    """A mode set, and the one that applies (the stricter of the account's and its org's)."""

    mode: RestrictionMode
    effective: RestrictionMode


class MeResponse(BaseModel):
    id: str
    email: str
    role: Role
    org_id: str
    login_name: str
    mobile: str | None
    display_name: str
    auth_status: AuthStatus
    is_operator: bool
    restriction: RestrictionMode = "clear"


class PermissionsResponse(BaseModel):
    """The permissions of the matrix the caller holds (docs/permissions.md)."""

    role: Role
    is_operator: bool
    permissions: list[str]


class MeUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    display_name: DisplayName | None = None


class PasswordChange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    current_password: SecretStr = Field(min_length=1, max_length=1024)
    new_password: SecretStr = Field(min_length=1, max_length=1024,
                                    json_schema_extra=NEW_PASSWORD)


class InviteAccept(BaseModel):
    model_config = ConfigDict(extra="forbid")

    token: SecretStr = Field(min_length=1, max_length=256)
    password: SecretStr = Field(min_length=1, max_length=1024, json_schema_extra=NEW_PASSWORD)


class PasswordResetRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    email: str = Field(min_length=3, max_length=254)


class PasswordResetRequested(BaseModel):
    detail: str = Field(description="The same answer whether or not the address is known.")


class PasswordReset(BaseModel):
    model_config = ConfigDict(extra="forbid")

    token: SecretStr = Field(min_length=1, max_length=256)
    password: SecretStr = Field(min_length=1, max_length=1024, json_schema_extra=NEW_PASSWORD)


class TotpEnrolment(BaseModel):
    secret: str = Field(description="Base32 secret for the authenticator app; shown once.")
    otpauth_uri: str


class TotpCodeBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    code: TotpCode


class TotpEnrolRequest(BaseModel):
    """Re-authentication: a stolen session alone must not bind a second factor."""

    model_config = ConfigDict(extra="forbid")

    current_password: SecretStr = Field(min_length=1, max_length=1024)


class TotpDisableRequest(BaseModel):
    """The current password and a current one-time code."""

    model_config = ConfigDict(extra="forbid")

    current_password: SecretStr = Field(min_length=1, max_length=1024)
    code: TotpCode


class OrgResponse(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    status: Literal["active", "disabled", "terminated"]
    created_at: datetime
    pool: str | None = Field(
        default=None,
        description="The gateway pool serving this organization's API keys (its commercial "
        "terms); null: the shared gateways.",
    )
    restriction: RestrictionMode = Field(
        default="clear",
        description="Restriction of processing for every member's calls and requests: "
        "`restricted` keeps a keyed token of the client address and the User-Agent's "
        "product only (docs/retention.md).",
    )


class OrgList(ListOf[OrgResponse]): ...


class OrgUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: OrgName | None = None


class OrgAdminUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: OrgName | None = None
    status: Literal["active", "disabled"] | None = None


class AccountCreate(BaseModel):
    """Without `password` the account is invited: the response carries a one-time invite
    token for POST /auth/accept-invite."""

    # At least one of the three identifiers (validate_identifiers).
    model_config = ConfigDict(extra="forbid", json_schema_extra={"anyOf": [
        {"required": [name], "properties": {name: {"type": "string"}}}
        for name in ("login_name", "email", "mobile")
    ]})

    login_name: Identifier | None = Field(default=None, json_schema_extra=LOGIN_NAME)
    email: Identifier | None = Field(default=None, json_schema_extra=EMAIL)
    mobile: Annotated[str, StringConstraints(max_length=32)] | None = Field(
        default=None, json_schema_extra=MOBILE)
    display_name: DisplayName = ""
    role: Role
    password: SecretStr | None = Field(default=None, max_length=1024,
                                       json_schema_extra=NEW_PASSWORD)


class OrgCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: OrgName
    owner: AccountCreate


class AccountResponse(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    org_id: str
    login_name: str
    email: str | None
    mobile: str | None
    display_name: str
    role: Role
    status: AccountStatus
    auth_status: AuthStatus
    is_operator: bool
    last_login_at: datetime | None
    created_at: datetime
    restriction: RestrictionMode = "clear"


class AccountCreated(AccountResponse):
    invite_token: str | None = Field(
        default=None, description="Only for invited accounts; shown only in this response."
    )
    invite_expires_at: datetime | None = None


class OrgCreated(OrgResponse):
    owner: AccountCreated


class AccountList(ListOf[AccountResponse]): ...


# -- the terms of service (onetoken.orgs.acceptance) ---------------------------------------


class TermsResponse(BaseModel):
    """The current terms of service as the caller sees them."""

    model_config = ConfigDict(from_attributes=True)

    version: str
    url: str | None = Field(description="Where the text is published (ONETOKEN_TERMS_URL).")
    statement: str = Field(description="What accepting says, on behalf of the organization.")
    accepted_at: datetime | None = Field(description="null: not accepted yet.")


class TermsAccept(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: str = Field(
        min_length=1,
        max_length=32,
        description="The version read (GET /api/v1/me/terms); 409 unless it is the current one.",
    )


class TermsAcceptanceResponse(BaseModel):
    """Who accepted which version of the terms, on behalf of which org, when, from where."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    account_id: str
    org_id: str
    version: str
    accepted_at: datetime
    source_ip: str


class TermsAcceptanceList(ListOf[TermsAcceptanceResponse]): ...


class AccountUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Role | None = None
    display_name: DisplayName | None = None
    email: Identifier | None = Field(default=None, json_schema_extra=EMAIL)
    mobile: Annotated[str, StringConstraints(max_length=32)] | None = Field(
        default=None, json_schema_extra=MOBILE)


# -- gateway pools and commercial terms (onetoken.orgs.terms) --------------------------------

PoolName = Annotated[str, StringConstraints(min_length=1, max_length=32,
                                            pattern=r"^[a-z0-9][a-z0-9-]{0,31}$")]
PoolDescription = Annotated[str, StringConstraints(strip_whitespace=True, max_length=200)]
# onetoken.analytics.clickhouse.POOL_DATABASE: the control plane reads every database of
# this form as call metadata (and only those).
PoolDatabase = Annotated[str, StringConstraints(min_length=10, max_length=49,
                                                pattern=r"^onetoken_[a-z0-9_]{1,40}$")]
_POOL_DATABASE = (
    "The ClickHouse database (on the control plane's ClickHouse) the pool's call metadata "
    "go to, `onetoken_` and up to 40 lowercase letters, digits or underscores; created on "
    "first use. Null: the shared `onetoken` database."
)


class PoolCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: PoolName
    description: PoolDescription = ""
    clickhouse_database: PoolDatabase | None = Field(default=None, description=_POOL_DATABASE)


class PoolUpdate(BaseModel):
    """Only the fields sent change. A new database takes the rows ingested from then on;
    those already in the previous one stay there and are still read."""

    model_config = ConfigDict(extra="forbid")

    description: PoolDescription | None = None
    clickhouse_database: PoolDatabase | None = Field(default=None, description=_POOL_DATABASE)


class PoolResponse(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    name: str
    description: str
    clickhouse_database: str | None = Field(description=_POOL_DATABASE)
    orgs: int = Field(default=0, description="How many organizations the pool serves.")
    created_at: datetime
    updated_at: datetime | None


class PoolList(ListOf[PoolResponse]): ...


Settlement = Literal["prepaid", "monthly", "quarterly"]
ContractRef = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100, pattern=NOT_BLANK)
]
_SETTLEMENT = (
    "How usage is settled: `prepaid` credit, or invoiced per month or quarter (with a "
    "credit limit, the balance may then go below zero by at most that much)."
)
_CREDIT_LIMIT = (
    "How far below zero the balance may go, in the org's currency: requests are refused "
    "once the balance would fall past minus this. \"0\": prepaid only."
)


def _credit_non_negative(value: int) -> int:
    if value < 0:
        raise PydanticCustomError("onetoken_amount", "Amount must not be negative.")
    return value


CreditLimit = Annotated[
    MoneyIn, AfterValidator(_credit_non_negative), WithJsonSchema(SCHEMA_IN_NON_NEGATIVE)
]
_PRICE_FACTOR = (
    "Applied to every price, in parts per million: 1000000 is the list price, 900000 10% "
    "off. The same value as the billing settings' (set here or with `onetoken billing "
    "price-factor`)."
)


class OrgTermsResponse(BaseModel):
    """An organization's commercial terms: set by operators, read by its members."""

    org_id: str
    pool: str | None = Field(
        description="The gateway pool serving the organization's API keys; null: the shared "
        "gateways. Requests with its keys to other gateways answer 403 wrong_gateway_pool."
    )
    contract_ref: str | None = Field(description="The contract's reference; null: none.")
    settlement: Settlement = Field(description=_SETTLEMENT)
    price_factor_ppm: int = Field(description=_PRICE_FACTOR)
    credit_limit: MoneyOut = Field(description=_CREDIT_LIMIT)
    dpa_signed: bool = Field(description="Whether the data processing agreement is signed.")
    dpa_signed_at: datetime | None
    updated_at: datetime | None


class OrgTermsUpdate(BaseModel):
    """Only the fields sent change."""

    model_config = ConfigDict(extra="forbid")

    pool: PoolName | None = None
    contract_ref: ContractRef | None = None
    settlement: Settlement = Field(default="prepaid", description=_SETTLEMENT)
    price_factor_ppm: int = Field(default=1_000_000, ge=0, le=10_000_000,
                                  description=_PRICE_FACTOR)
    credit_limit: CreditLimit = Field(default=0, description=_CREDIT_LIMIT)
    dpa_signed_at: datetime | None = Field(
        default=None, description="When the data processing agreement was signed; null: not "
        "signed."
    )
