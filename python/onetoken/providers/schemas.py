from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StringConstraints,
    WithJsonSchema,
)
from pydantic_core import PydanticCustomError

from onetoken.keys.schemas import ModelName
from onetoken.kit.errors import Unprocessable
from onetoken.kit.lists import ListOf
from onetoken.kit.money import SCHEMA_IN_NON_NEGATIVE, MoneyIn, MoneyOut
from onetoken.kit.net import networks
from onetoken.security.net import url_target_refused

Protocol = Literal["openai", "azure", "anthropic", "gemini"]
ModelKind = Literal[
    "chat", "embedding", "image", "moderation", "rerank", "speech", "transcription"
]
# "platform": the shared catalog every org may use (operators only); "org": private.
Scope = Literal["platform", "org"]
PresetName = Literal[
    "openai", "azure-openai", "anthropic", "gemini", "deepseek", "qwen", "moonshot", "zhipu",
    "doubao", "minimax",
]
# Vendor, region and compliance tag values: short lowercase identifiers ("cn-mainland").
Label = Annotated[
    str, StringConstraints(min_length=1, max_length=32, pattern=r"^[a-z0-9][a-z0-9._-]*$")
]
OptionalLabel = Annotated[
    str, StringConstraints(max_length=32, pattern=r"^([a-z0-9][a-z0-9._-]*)?$")
]
Tags = Annotated[list[Label], Field(max_length=32)]
ApiVersion = Annotated[
    str, StringConstraints(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9._-]+$")
]
Concurrency = Annotated[int, Field(ge=1, le=1_000_000)]
ProviderName = Annotated[
    str, StringConstraints(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9._-]*$")
]
Timeout = Annotated[int, Field(ge=1, le=3_600_000)]


def _check_base_url(value: str) -> str:
    if not value.isascii() or not value.isprintable() or " " in value:
        raise PydanticCustomError("onetoken_url", "Base URL must be printable ASCII.")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise PydanticCustomError("onetoken_url", "Base URL must be an http(s) URL with a host.")
    if parts.username is not None or parts.password is not None:
        # The URL is returned by the API; credentials belong in the write-only api_key.
        raise PydanticCustomError(
            "onetoken_url", "Base URL must not contain credentials; use api_key."
        )
    if parts.query or parts.fragment:
        raise PydanticCustomError("onetoken_url", "Base URL must not have a query or fragment.")
    return value.rstrip("/")


BaseUrl = Annotated[
    str, StringConstraints(min_length=8, max_length=2048), AfterValidator(_check_base_url)
]


def check_base_url_target(url: str | None, *, org_scoped: bool, private_cidrs: str) -> None:
    """At save time, where the base URL leads: an org's provider must reach a public
    address; a platform provider may also use ONETOKEN_UPSTREAM_PRIVATE_CIDRS (an in-house
    model server). An address literal is judged as is, a name by what it resolves to now;
    the engine checks again on the address it connects to."""
    if url is None:
        return
    allow = () if org_scoped else networks(private_cidrs)
    if url_target_refused(url, allow):
        raise Unprocessable(
            "The base URL must point to a public address"
            + ("." if org_scoped else " or one in ONETOKEN_UPSTREAM_PRIVATE_CIDRS."),
            param="base_url",
        )
_HEADER_SAFE = re.compile(r"^[\x21-\x7e]{1,4096}$")


def _check_secret(value: SecretStr) -> SecretStr:
    # Sent upstream as an HTTP header value, so printable ASCII without spaces.
    if not _HEADER_SAFE.match(value.get_secret_value()):
        raise PydanticCustomError(
            "onetoken_secret", "API key must be 1 to 4096 printable ASCII characters."
        )
    return value


ProviderSecret = Annotated[SecretStr, AfterValidator(_check_secret)]
Price = MoneyIn


class ProviderAttributes(BaseModel):
    """What a preset fills in when left out (with the base URL and protocol), and the
    concurrency cap. A provider body lists these after its own fields: it names this
    class first among its bases, and pydantic orders fields from the last base on."""

    api_version: ApiVersion | None = None
    vendor: OptionalLabel | None = None
    region: OptionalLabel | None = None
    retains_content: bool | None = None
    trains_on_data: bool | None = None
    zero_retention: bool | None = None
    tags: Tags | None = None
    max_concurrency: Concurrency | None = None


class _NewProvider(BaseModel):
    name: ProviderName
    scope: Scope = "org"
    preset: PresetName | None = None
    protocol: Protocol | None = None
    base_url: BaseUrl | None = None
    api_key: ProviderSecret | None = Field(default=None, description="Write-only.")
    connect_timeout_ms: Timeout = 2000
    first_byte_timeout_ms: Timeout = 60000
    idle_timeout_ms: Timeout = 60000


class ProviderCreate(ProviderAttributes, _NewProvider):
    """A preset fills in every attribute left out (base URL, protocol, vendor, region,
    data-processing flags, API version, tags); given fields win."""

    model_config = ConfigDict(extra="forbid")


class _ProviderChange(BaseModel):
    name: ProviderName | None = None
    protocol: Protocol | None = None
    base_url: BaseUrl | None = None
    api_key: ProviderSecret | None = None
    connect_timeout_ms: Timeout | None = None
    first_byte_timeout_ms: Timeout | None = None
    idle_timeout_ms: Timeout | None = None


class ProviderUpdate(ProviderAttributes, _ProviderChange):
    """Fields left out are unchanged; `"api_key": null` removes the credential,
    `"max_concurrency": null` / `"api_version": null` clear those."""

    model_config = ConfigDict(extra="forbid")


class CatalogEntry(BaseModel):
    """What providers, models and routes answer with first: whose they are (org_id None:
    the platform's) and their name."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    org_id: str | None
    scope: Scope
    name: str


class ProviderResponse(CatalogEntry):
    preset: str | None
    protocol: Protocol
    base_url: str
    has_api_key: bool
    # The environment variable a declarative file read the credential from, if any.
    credential_env: str | None
    connect_timeout_ms: int
    first_byte_timeout_ms: int
    idle_timeout_ms: int
    api_version: str | None
    vendor: str
    region: str
    retains_content: bool
    trains_on_data: bool
    zero_retention: bool
    tags: list[str]
    max_concurrency: int | None
    managed_by: Literal["api", "file"]
    created_at: datetime


class ProviderList(ListOf[ProviderResponse]): ...


def _non_negative(value: int) -> int:
    if value < 0:
        raise PydanticCustomError("onetoken_price", "Price must not be negative.")
    return value


PriceIn = Annotated[
    MoneyIn, AfterValidator(_non_negative), WithJsonSchema(SCHEMA_IN_NON_NEGATIVE)
]
MaxTokens = Annotated[int, Field(ge=0, le=10_000_000)]
# An image price's key: "<size>/<quality>", "<size>" or "default" (docs/gateway-spec.md,
# "Unit prices").
IMAGE_VARIANT_PATTERN = r"^[a-z0-9]{1,20}(/[a-z0-9_-]{1,16})?$"
ImageVariant = Annotated[str, Field(min_length=1, max_length=40, pattern=IMAGE_VARIANT_PATTERN)]
# The key rule in the schema too (pydantic does not emit it for dict keys).
ImagePrices = Annotated[
    dict[ImageVariant, PriceIn],
    Field(
        max_length=64,
        json_schema_extra={"propertyNames": {"pattern": IMAGE_VARIANT_PATTERN, "maxLength": 40}},
    ),
]


Priority = Annotated[int, Field(ge=-1_000_000, le=1_000_000)]
Weight = Annotated[int, Field(ge=0, le=1_000_000)]


class ModelDeployment(BaseModel):
    """Where a model name is served and at what price (see ProviderAttributes for why a
    body names this class first among its bases)."""

    upstream_model: ModelName
    input_price: PriceIn
    output_price: PriceIn | None = None
    cached_input_price: PriceIn | None = None
    max_output_tokens: MaxTokens | None = None
    request_price: PriceIn | None = None
    priority: Priority = 0
    weight: Weight = 1
    image_prices: ImagePrices | None = None
    audio_second_price: PriceIn | None = None
    character_price: PriceIn | None = None
    search_unit_price: PriceIn | None = None


class ModelHead(BaseModel):
    name: ModelName
    kind: ModelKind = "chat"


class _NewModel(ModelHead):
    provider_id: str = Field(min_length=1, max_length=32)


class ModelCreate(ModelDeployment, _NewModel):
    """One deployment: a public model name served by one provider. Prices are decimal
    strings in the deployment currency per million tokens (`request_price` per request;
    `image_prices` per image by "<size>/<quality>", "<size>" or "default",
    `audio_second_price` per second of audio, `character_price` per million characters,
    `search_unit_price` per rerank search unit).
    The deployment's scope is its provider's."""

    model_config = ConfigDict(extra="forbid")


class ModelUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: ModelName | None = None
    kind: ModelKind | None = None
    provider_id: str | None = Field(default=None, min_length=1, max_length=32)
    upstream_model: ModelName | None = None
    input_price: PriceIn | None = None
    output_price: PriceIn | None = None
    cached_input_price: PriceIn | None = None
    max_output_tokens: MaxTokens | None = None
    request_price: PriceIn | None = None
    priority: Priority | None = None
    weight: Weight | None = None
    image_prices: ImagePrices | None = None
    audio_second_price: PriceIn | None = None
    character_price: PriceIn | None = None
    search_unit_price: PriceIn | None = None


class Processor(BaseModel):
    """Who processes a request this deployment serves: its provider's vendor, region and
    data-handling facts (from the provider's settings or preset), shown to every member
    so that a developer knows before calling. `/v1/models` lists the same facts for the
    deployments a key's policies permit."""

    model_config = ConfigDict(from_attributes=True)

    vendor: str
    region: str
    trains_on_data: bool
    retains_content: bool
    zero_retention: bool


class ModelResponse(CatalogEntry):
    processor: Processor
    kind: ModelKind
    provider_id: str
    upstream_model: str
    input_price: MoneyOut
    output_price: MoneyOut
    cached_input_price: MoneyOut
    request_price: MoneyOut
    image_prices: dict[str, MoneyOut]
    audio_second_price: MoneyOut
    character_price: MoneyOut
    search_unit_price: MoneyOut
    max_output_tokens: int
    priority: int
    weight: int
    managed_by: Literal["api", "file"]
    created_at: datetime


class ModelList(ListOf[ModelResponse]): ...


class PresetResponse(BaseModel):
    name: str
    title: str
    vendor: str
    protocol: Protocol
    base_url: str | None
    region: str
    retains_content: bool
    trains_on_data: bool
    zero_retention: bool
    api_version: str | None
    tags: list[str]
    credential_env: str | None


class PresetList(ListOf[PresetResponse]): ...
