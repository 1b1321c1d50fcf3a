"""Builds the config snapshot the engine accepts (tests/contract/snapshot.json).

The engine rejects unknown fields, so every object here is built field by field.
Provider credentials are decrypted into the snapshot, which lives only in memory.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import orjson
from sqlalchemy import select
from sqlalchemy.orm import Session

from onetoken.billing.service import balances
from onetoken.db.models import ApiKey, Model, Org, Provider
from onetoken.kit.crypto import Secrets

Snapshot = dict[str, Any]


def build_snapshot(
    session: Session,
    secrets: Secrets,
    *,
    version: int,
    spent_marks: Mapping[str, int],
    org_balances: Mapping[str, int] | None = None,
) -> Snapshot:
    """`org_balances` and `spent_marks` must be read together (see GatewaySupervisor)."""
    if org_balances is None:
        org_balances = balances(session)
    orgs = session.scalars(select(Org).order_by(Org.id)).all()
    providers = session.scalars(select(Provider).order_by(Provider.id)).all()
    models = session.scalars(select(Model).order_by(Model.name)).all()
    keys = session.scalars(select(ApiKey).order_by(ApiKey.id)).all()

    models_by_org: dict[str, set[str]] = defaultdict(set)
    for m in models:
        models_by_org[m.org_id].add(m.name)

    return {
        "version": version,
        "orgs": [
            {
                "id": o.id,
                "status": o.status,
                "balance": int(org_balances.get(o.id, 0)),
                "spent_mark": int(spent_marks.get(o.id, 0)),
            }
            for o in orgs
        ],
        "keys": [_key(k, models_by_org.get(k.org_id, set())) for k in keys],
        "providers": [_provider(p, secrets) for p in providers],
        "models": [
            {
                "name": m.name,
                "kind": m.kind,
                "provider_id": m.provider_id,
                "upstream_model": m.upstream_model,
                "input_price": m.input_price,
                "output_price": m.output_price,
                "cached_input_price": m.cached_input_price,
                "max_output_tokens": m.max_output_tokens,
            }
            for m in models
        ],
    }


def _key(k: ApiKey, org_models: set[str]) -> dict[str, Any]:
    # The engine resolves models by name across the deployment; restricting every key to
    # its own org's models keeps one org's keys off another org's providers and prices.
    if k.allowed_models is None:
        allowed = sorted(org_models)
    else:
        allowed = [m for m in k.allowed_models if m in org_models]
    return {
        "hash": k.hash,
        "key_id": k.id,
        "display": k.display,
        "org_id": k.org_id,
        "account_id": k.created_by,
        # The engine knows active and revoked; a disabled key is refused the same way.
        "status": "active" if k.status == "active" else "revoked",
        "expires_at": int(k.expires_at.timestamp()) if k.expires_at else None,
        "allowed_models": allowed,
    }


def _provider(p: Provider, secrets: Secrets) -> dict[str, Any]:
    return {
        "id": p.id,
        "name": p.name,
        "protocol": p.protocol,
        "base_url": p.base_url,
        "api_key": secrets.decrypt(p.api_key_encrypted) if p.api_key_encrypted else None,
        "connect_timeout_ms": p.connect_timeout_ms,
        "first_byte_timeout_ms": p.first_byte_timeout_ms,
        "idle_timeout_ms": p.idle_timeout_ms,
    }


def snapshot_json(snapshot: Snapshot) -> bytes:
    return orjson.dumps(snapshot)
