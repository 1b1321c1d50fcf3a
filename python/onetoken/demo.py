"""`onetoken serve --demo`: a provider backed by the bundled fake upstream, priced models
of every kind, a funded org and a working API key."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from onetoken.billing import service as billing
from onetoken.bootstrap import bootstrap
from onetoken.db.session import SessionFactory
from onetoken.keys import service as keys
from onetoken.kit.crypto import Secrets
from onetoken.kit.money import NANO_PER_UNIT
from onetoken.orgs import service as orgs
from onetoken.providers import service as providers
from onetoken.providers.models import Model

log = logging.getLogger("onetoken.demo")

DEMO_PROVIDER = "demo"
DEMO_KEY_NAME = "demo session"
DEMO_CREDIT_KEY = "demo:initial-credit"
DEMO_CREDIT = 100 * NANO_PER_UNIT
_PER_M = NANO_PER_UNIT  # one currency unit per million tokens

_CENT = NANO_PER_UNIT // 100

DEMO_MODELS = (
    # name, kind, upstream, input, output, cached, max_output_tokens
    ("demo-chat", "chat", "mock-gpt", _PER_M // 2, _PER_M * 3 // 2, _PER_M // 4, 4096),
    ("demo-embed", "embedding", "mock-embed", _PER_M * 2 // 100, 0, 0, 0),
    ("demo-image", "image", "mock-image", 0, 0, 0, 0),
    ("demo-moderation", "moderation", "mock-moderation", 0, 0, 0, 0),
    ("demo-rerank", "rerank", "mock-rerank", 0, 0, 0, 0),
    ("demo-tts", "speech", "mock-tts", 0, 0, 0, 0),
    ("demo-whisper", "transcription", "mock-whisper", 0, 0, 0, 0),
)
#: Unit prices of the models priced by units (docs/gateway-spec.md, "Unit prices").
DEMO_UNIT_PRICES: dict[str, dict[str, object]] = {
    "demo-image": {
        "image_prices": {"1024x1024/standard": 4 * _CENT, "1024x1024/hd": 8 * _CENT,
                         "default": 2 * _CENT},
    },
    # Moderations are free, as OpenAI's are.
    "demo-rerank": {"search_unit_price": _CENT // 5},
    # 15 per million characters, as OpenAI's tts-1.
    "demo-tts": {"character_price": 15 * NANO_PER_UNIT},
    # 0.006 per minute, as OpenAI's whisper-1.
    "demo-whisper": {"audio_second_price": NANO_PER_UNIT // 10_000},
}


@dataclass(frozen=True, slots=True)
class DemoSetup:
    org_id: str
    api_key: str
    admin_email: str
    admin_password: str | None


def setup_demo(session_factory: SessionFactory, secrets: Secrets, upstream: str) -> DemoSetup:
    """Idempotent apart from the key: every run hands out a fresh "demo session" key and
    revokes the previous one, because a plaintext key is never kept to show again."""
    with session_factory() as session:
        boot = bootstrap(session, secrets)
        org_id = boot.org_id
        owner = orgs.org_owner(session, org_id)
        if owner is None:
            raise RuntimeError("the first org has no active owner account")
        provider = _upsert_provider(session, secrets, org_id, f"http://{upstream}/v1")
        for name, kind, upstream_model, inp, out, cached, max_out in DEMO_MODELS:
            _upsert_model(
                session, org_id, provider, name, kind, upstream_model, inp, out, cached, max_out,
                DEMO_UNIT_PRICES.get(name, {}),
            )
        billing.credit(
            session,
            org_id,
            amount=DEMO_CREDIT,
            kind="grant",
            idempotency_key=DEMO_CREDIT_KEY,
            memo="demo credit",
        )
        if boot.api_key is not None:
            api_key = boot.api_key
        else:
            keys.revoke_keys_named(session, org_id, DEMO_KEY_NAME)
            _, api_key = keys.create_key(
                session, secrets, org_id=org_id, created_by=owner.id, name=DEMO_KEY_NAME
            )
        session.commit()
        log.info("demo.ready", extra={"org_id": org_id})
        return DemoSetup(
            org_id=org_id,
            api_key=api_key,
            admin_email=boot.admin_email,
            admin_password=boot.admin_password,
        )


def _upsert_provider(session: Session, secrets: Secrets, org_id: str, base_url: str) -> str:
    """The demo provider and models are the platform catalog, usable by every org."""
    existing = providers.find_provider_by_name(session, None, DEMO_PROVIDER)
    if existing is None:
        # Data dirs from before the platform catalog kept the demo in the first org.
        existing = providers.find_provider_by_name(session, org_id, DEMO_PROVIDER)
        if existing is not None:
            existing.org_id = None
            for m in session.scalars(select(Model).where(Model.provider_id == existing.id)):
                m.org_id = None
    if existing is None:
        return providers.create_provider(
            session,
            secrets,
            None,
            name=DEMO_PROVIDER,
            protocol="openai",
            base_url=base_url,
            api_key=None,
        ).id
    if existing.base_url != base_url:
        providers.update_provider(session, secrets, None, existing.id, {"base_url": base_url})
    return existing.id


def _upsert_model(
    session: Session,
    org_id: str,
    provider_id: str,
    name: str,
    kind: str,
    upstream_model: str,
    input_price: int,
    output_price: int,
    cached_input_price: int,
    max_output_tokens: int,
    unit_prices: dict[str, object],
) -> None:
    fields = {
        **unit_prices,
        "kind": kind,
        "upstream_model": upstream_model,
        "input_price": input_price,
        "output_price": output_price,
        "cached_input_price": cached_input_price,
        "max_output_tokens": max_output_tokens,
    }
    existing = session.scalars(
        select(Model).where(Model.provider_id == provider_id, Model.name == name)
    ).one_or_none()
    if existing is None:
        providers.create_model(
            session, None, name=name, provider_id=provider_id, **fields  # type: ignore[arg-type]
        )
    elif any(getattr(existing, k) != v for k, v in fields.items()):
        providers.update_model(session, None, existing.id, fields)
