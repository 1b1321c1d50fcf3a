"""The permission matrix, tried on every route of the app (from app.routes, so a new route
cannot be missed) with every role, an operator, another org's owner and no session."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from pydantic import SecretStr

from onetoken.control import build_state, create_app
from onetoken.keys import service as keys
from onetoken.orgs import auth
from onetoken.orgs import service as orgs
from onetoken.orgs.models import Account
from onetoken.security.permissions import PERMISSIONS, ROLE_DENIED_MESSAGE, holds
from onetoken.security.principal import ROLES
from onetoken.settings import Settings
from onetoken.state import AppState
from onetoken.tickets import service as tickets
from onetoken.tickets.store import open_store
from onetoken.web.permissions import (
    api_routes,
    render_doc,
    route_is_public,
    route_permissions,
    route_rules,
)
from tests import builders as build

DOC = Path(__file__).resolve().parents[2] / "docs" / "permissions.md"
PASSWORD = "matrix-test-password"
PUBLIC_ROUTES = {
    ("POST", "/api/v1/auth/login"),
    ("POST", "/api/v1/auth/session"),
    ("POST", "/api/v1/auth/accept-invite"),
    ("POST", "/api/v1/auth/password-reset/request"),
    ("POST", "/api/v1/auth/password-reset"),
    ("POST", "/api/v1/auth/sso/start"),
    ("GET", "/api/v1/auth/sso/callback"),
    ("GET", "/healthz"),
}


@dataclass
class Who:
    name: str
    account_id: str
    org_id: str
    role: str
    is_operator: bool


@dataclass
class World:
    app: FastAPI
    state: AppState
    client: TestClient
    org_a: str
    org_b: str
    people: dict[str, Who]
    # Strings of org A that must never appear in a response to org B.
    org_a_marks: set[str]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("matrix"),
        secret_key=SecretStr("matrix-secret-key-0123456789abcdefghij"),
    )
    state = build_state(settings)
    app = create_app(settings, state=state)
    people: dict[str, Who] = {}
    with state.session_factory() as s:
        platform = orgs.create_org(s, "Platform")
        op = orgs.create_account(s, platform.id, "op@platform.test", PASSWORD, "owner",
                                 is_operator=True)
        people["operator"] = Who("operator", op.id, platform.id, "owner", True)
        a = orgs.create_org(s, "Acme")
        for role in ROLES:
            acc = orgs.create_account(s, a.id, f"{role}@acme.test", PASSWORD, role)
            people[role] = Who(role, acc.id, a.id, role, False)
        b = orgs.create_org(s, "Globex")
        other = orgs.create_account(s, b.id, "owner@globex.test", PASSWORD, "owner")
        people["other_org"] = Who("other_org", other.id, b.id, "owner", False)
        for who in people.values():
            account = s.get(Account, who.account_id)
            assert account is not None
            build.accept_terms(s, account)
        s.commit()
        org_a, org_b = a.id, b.id
    marks = {org_a, "acme.test"} | {p.account_id for p in people.values() if p.org_id == org_a}
    with TestClient(app) as client:
        yield World(app, state, client, org_a, org_b, people, marks)
    state.db_engine.dispose()


def _token(world: World, who: Who) -> str:
    with world.state.session_factory() as s:
        account = s.get(Account, who.account_id)
        assert account is not None
        token, _ = auth.issue_session(s, world.state.secrets, account, timedelta(hours=1))
        s.commit()
    return token


# -- resources the routes' path parameters name ---------------------------------------------


def _key(world: World, who: Who) -> str:
    owner = who.account_id if who.org_id == world.org_a else world.people["owner"].account_id
    with world.state.session_factory() as s:
        key, _ = keys.create_key(s, world.state.secrets, org_id=world.org_a,
                                 created_by=owner, name="matrix")
        s.commit()
        world.org_a_marks.add(key.id)
        return key.id


_counter = iter(range(1_000_000))


def _account(world: World, who: Who) -> str:
    with world.state.session_factory() as s:
        acc = orgs.create_account(s, world.org_a, None, None, "viewer",
                                  login_name=f"member{next(_counter)}")
        s.commit()
        world.org_a_marks.add(acc.id)
        return acc.id


# The attachment of the ticket `_ticket` made last: a route names the ticket before it.
_last_attachment: list[str] = []


def _ticket(world: World, who: Who) -> str:
    """A ticket of org A, opened by its owner, with one attachment."""
    with world.state.session_factory() as s:
        ticket = tickets.create(s, org_id=world.org_a, opened_by=world.people["owner"].account_id,
                                subject="matrix subject", category="other", description="d")
        attachment = tickets.add_attachment(
            s, open_store(world.state.settings.ticket_store_dir), ticket, b"matrix notes",
            claimed_name="notes.txt", uploaded_by=world.people["owner"].account_id,
            max_bytes=1024, max_count=10,
        )
        s.commit()
        world.org_a_marks |= {ticket.id, attachment.id}
        _last_attachment[:] = [attachment.id]
        return ticket.id


FACTORIES: dict[str, Callable[[World, Who], str]] = {
    "org_id": lambda w, _: w.org_a,
    "key_id": _key,
    "account_id": _account,
    "ticket_id": _ticket,
    "attachment_id": lambda w, _: _last_attachment[0],
}


def _bodies(world: World) -> dict[tuple[str, str], Callable[[], Any]]:
    """Valid bodies for some routes, so those are also seen succeeding (others get {})."""
    return {
        ("POST", "/api/v1/keys"): lambda: {"name": "from matrix"},
        ("PATCH", "/api/v1/keys/{key_id}"): lambda: {"name": "renamed"},
        ("POST", "/api/v1/keys/{key_id}/rotate"): lambda: {"overlap_seconds": 60},
        ("POST", "/api/v1/accounts"): lambda: {
            "role": "viewer", "login_name": f"invited{next(_counter)}"
        },
        ("PATCH", "/api/v1/accounts/{account_id}"): lambda: {"display_name": "M"},
        ("PATCH", "/api/v1/me"): lambda: {"display_name": "Me"},
        ("PATCH", "/api/v1/org"): lambda: {},
        ("PATCH", "/api/v1/orgs/{org_id}"): lambda: {},
        ("POST", "/api/v1/orgs"): lambda: {
            "name": "New", "owner": {"role": "owner", "login_name": f"new{next(_counter)}"}
        },
        ("POST", "/api/v1/tickets"): lambda: {
            "subject": "from matrix", "category": "other", "description": "d"
        },
        ("POST", "/api/v1/tickets/{ticket_id}/messages"): lambda: {"body": "m"},
        ("POST", "/api/v1/tickets/{ticket_id}/status"): lambda: {"status": "resolved"},
        ("POST", "/api/v1/tickets/staff/{ticket_id}/messages"): lambda: {"body": "m"},
        ("POST", "/api/v1/tickets/staff/{ticket_id}/status"): lambda: {"status": "resolved"},
    }


def _api_routes(app: FastAPI) -> list[tuple[str, APIRoute, str]]:
    """Every /api route, read from the app. Never empty: a loop over none would pass."""
    found = [(method, route, path) for method, path, route in api_routes(app)]
    assert len(found) > len(PUBLIC_ROUTES), "no protected /api routes found"
    return found


def _call(world: World, method: str, route: APIRoute, who: Who | None, full: str) -> Any:
    path = full
    for name in re.findall(r"{(\w+)(?::\w+)?}", path):
        factory = FACTORIES.get(name)
        value = factory(world, who or world.people["owner"]) if factory else "missing_0000"
        path = re.sub(r"{" + name + r"(?::\w+)?}", value, path)
    body = _bodies(world).get((method, full), dict)()
    headers = {"Authorization": f"Bearer {_token(world, who)}"} if who else {}
    kwargs: dict[str, Any] = {"headers": headers}
    if method in ("POST", "PUT", "PATCH"):
        kwargs["json"] = body
    return world.client.request(method, path, **kwargs)


# -- the tests -------------------------------------------------------------------------------


def test_every_route_declares_exactly_one_permission_or_public(world: World) -> None:
    rules = route_rules(world.app)  # raises naming the first route that declares none
    assert rules
    for method, route, full in _api_routes(world.app):
        if (method, full) in PUBLIC_ROUTES:
            assert route_is_public(route), full
        else:
            assert not route_is_public(route), f"{method} {full} is public unexpectedly"
            assert len({p.name for p in route_permissions(route)}) == 1, full


def test_docs_permissions_md_is_generated_from_the_code(world: World) -> None:
    expected = render_doc(world.app)
    assert DOC.read_text() == expected, (
        "docs/permissions.md is stale: run "
        "`.venv/bin/python -m onetoken.web.permissions > docs/permissions.md`"
    )


def test_without_a_session_every_non_public_route_is_401(world: World) -> None:
    for method, route, full in _api_routes(world.app):
        if (method, full) in PUBLIC_ROUTES:
            continue
        r = _call(world, method, route, None, full)
        assert r.status_code == 401, f"{method} {full}: {r.status_code}"


@pytest.mark.parametrize("who", [*ROLES, "operator"])
def test_each_role_gets_exactly_what_the_matrix_documents(world: World, who: str) -> None:
    person = world.people[who]
    seen_success = 0
    for method, route, full in _api_routes(world.app):
        if (method, full) in PUBLIC_ROUTES:
            continue
        (perm,) = route_permissions(route)
        r = _call(world, method, route, person, full)
        denied_by_matrix = r.status_code == 403 and r.json()["error"]["message"] == (
            ROLE_DENIED_MESSAGE
        )
        if holds(perm, person.role, person.is_operator):
            assert r.status_code != 401 and not denied_by_matrix, (
                f"{who} should pass {perm.name} on {method} {full}: {r.status_code} {r.text}"
            )
            seen_success += r.status_code < 300
        else:
            assert denied_by_matrix, (
                f"{who} must be refused {perm.name} on {method} {full}: "
                f"{r.status_code} {r.text[:200]}"
            )
    assert seen_success > 0


def test_another_orgs_owner_never_reaches_org_a(world: World) -> None:
    person = world.people["other_org"]
    for method, route, full in _api_routes(world.app):
        if (method, full) in PUBLIC_ROUTES:
            continue
        r = _call(world, method, route, person, full)
        if "{" in full:
            assert r.status_code in (403, 404, 422, 503), (
                f"{method} {full} answered {r.status_code} to another org: {r.text[:200]}"
            )
        leaked = [m for m in world.org_a_marks if m in r.text]
        assert not leaked, f"{method} {full} leaked org A data {leaked}"


def test_the_matrix_itself() -> None:
    # The properties the rest of the code relies on.
    assert all(holds(p, "owner", False) for p in PERMISSIONS.values() if p.roles)
    assert not holds(PERMISSIONS["orgs.manage"], "owner", False)
    assert holds(PERMISSIONS["orgs.manage"], "viewer", True)
    assert not holds(PERMISSIONS["keys.write"], "viewer", False)
    assert not holds(PERMISSIONS["billing.write"], "developer", False)
    assert not holds(PERMISSIONS["security.read"], "billing", False)
    # Moving money: operators; owners only where ONETOKEN_TENANT_MONEY_ADMIN=true.
    money = PERMISSIONS["billing.money"]
    assert holds(money, "viewer", True)
    assert not any(holds(money, role, False) for role in ROLES)
    assert [r for r in ROLES if holds(money, r, False, tenant_money_admin=True)] == ["owner"]
    assert not holds(PERMISSIONS["billing.read"], "developer", False)
    # Tickets: every member reads the org's, viewers do not write, only staff see the queue.
    assert all(holds(PERMISSIONS["tickets.read"], role, False) for role in ROLES)
    assert not holds(PERMISSIONS["tickets.write"], "viewer", False)
    assert not any(holds(PERMISSIONS["tickets.staff"], role, False) for role in ROLES)
    assert holds(PERMISSIONS["tickets.staff"], "viewer", True)
    # Before the terms of service are accepted: only the own profile, the terms, signing
    # out, export and cancellation (onetoken.orgs.acceptance).
    assert [p.name for p in PERMISSIONS.values() if p.before_terms] == ["session"]
    assert all(holds(PERMISSIONS["session"], role, False) for role in ROLES)
