"""The engine's rules, applied before a change to the catalog commits: the gateway's own
validator runs over the catalog as the session holds it, and a change that would make the
engine leave out an entry is refused (422, naming the field). Wraps every catalog change:
the control API's and a providers file's (declarative)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import orjson
from sqlalchemy import select
from sqlalchemy.orm import Session

from onetoken.kit.crypto import Secrets
from onetoken.kit.errors import Unprocessable
from onetoken.orgs.models import Org
from onetoken.providers import snapshot_parts

# A dropped entry as the engine reports it: (kind, id, field, reason).
Problem = tuple[str, str, str, str]

# Plain words for the engine's reason codes; the 422 names the field as well.
_REASONS = {
    "duplicate": "is a duplicate",
    "unknown_protocol": "names an unknown protocol",
    "invalid_url": "does not make a valid upstream URL",
    "invalid_header_value": "is not a valid HTTP header value",
    "unknown_provider": "refers to a provider that does not exist",
    "unknown_kind": "is not a known model kind",
    "negative_price": "must not be negative",
    "not_served_by_protocol": "is not served by the provider's protocol",
    "kind_mismatch": "differs from the kind of the other deployments of this name",
    "unknown_model": "has no model of that name",
    "name_taken": "is already a model name or alias",
    "unknown_category": "names an unknown guard category",
}


def catalog_problems(session: Session, secrets: Secrets) -> set[Problem]:
    """The entries of the gateway config, as it stands in this session (flushed, not yet
    committed), that the engine would leave out, judged by the engine's own validator.
    Covers what tenants and operators edit through the control API: providers, models,
    routes, routing and the orgs' policy and guard (keys and blocked addresses are
    written by code that cannot produce an entry the engine refuses)."""
    from onetoken import _core

    cat = snapshot_parts.catalog(session, secrets)
    org_extra = snapshot_parts.org_settings(session)
    doc: dict[str, Any] = {
        "version": 1,
        "orgs": [
            snapshot_parts.merge_org_settings(
                {"id": org_id, "status": "active", "balance": 0, "spent_mark": 0},
                org_extra.get(org_id),
            )
            for org_id in session.scalars(select(Org.id).order_by(Org.id)).all()
        ],
        "keys": [],
        "providers": cat.providers,
        "models": cat.models,
        "routes": cat.routes,
    }
    if cat.routing is not None:
        doc["routing"] = cat.routing
    return {
        (d["kind"], d["id"], d["field"], d["reason"])
        for d in _core.validate_snapshot(orjson.dumps(doc))
    }


# A dropped provider drops its models, a dropped model its route: name the cause.
_CAUSE_ORDER = {"provider": 0, "org": 1, "guard": 1, "model": 2, "route": 3, "alias": 3}


def _cause_first(problem: Problem) -> tuple[int, Problem]:
    return (_CAUSE_ORDER.get(problem[0], 4), problem)


@contextmanager
def engine_rules(session: Session, secrets: Secrets) -> Iterator[None]:
    """Refuse (422, naming the field) a change that would make the engine leave out an
    entry of the config: one that is dropped after the change and was not before. Wrap
    the change, before its commit; problems already in the database (written around the
    API) are not blamed on an unrelated change."""
    before = catalog_problems(session, secrets)
    yield
    session.flush()
    new = sorted(catalog_problems(session, secrets) - before, key=_cause_first)
    if new:
        kind, _, field, reason = new[0]
        words = _REASONS.get(reason, "is not accepted by the gateway")
        raise Unprocessable(f"The {kind}'s {field} {words}.", param=field, code=reason)
