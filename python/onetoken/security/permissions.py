"""The permission matrix: which role may do what, defined once, enforced per endpoint.

Every endpoint of the control API declares exactly one permission with
`Depends(require("keys.write"))` (or the aliases in onetoken.deps), or declares itself
public with `Depends(public)`. The matrix test enumerates `app.routes`, so an endpoint
without a declaration fails the suite, and docs/permissions.md is generated from this
module (`python -m onetoken.security.permissions > docs/permissions.md`).

Operators (`accounts.is_operator`, the platform's own staff; the bootstrap account is
one) hold every permission marked `operator`; some permissions are operator-only.
Moving the platform's money (`billing.money`) is one of them unless a private deployment
hands it to its owners with ONETOKEN_TENANT_MONEY_ADMIN=true.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Annotated, Any, Final

from fastapi import Depends, Request
from fastapi.routing import APIRoute

from onetoken.db.models import ROLES
from onetoken.kit.errors import Forbidden, OnetokenError

if TYPE_CHECKING:
    from fastapi import FastAPI

    from onetoken.deps import Principal

UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
#: The message of a refusal by the matrix (handlers may refuse more, with their own codes).
ROLE_DENIED_MESSAGE = "Your role does not allow this action."


@dataclass(frozen=True, slots=True)
class Permission:
    name: str
    roles: frozenset[str]
    operator: bool
    description: str
    # Roles that hold it only where ONETOKEN_TENANT_MONEY_ADMIN=true (a private
    # single-enterprise deployment whose owners are also the platform's staff).
    tenant_money_roles: frozenset[str] = frozenset()


def _p(
    name: str, roles: str, description: str, *, operator: bool = True, tenant_money: str = ""
) -> Permission:
    held = frozenset(r for r in roles.split() if r)
    delegated = frozenset(r for r in tenant_money.split() if r)
    assert held <= set(ROLES) and delegated <= set(ROLES), name
    return Permission(name, held, operator, description, delegated)


_ALL = " ".join(ROLES)

PERMISSIONS: dict[str, Permission] = {
    p.name: p
    for p in (
        _p("self", _ALL, "Own account: profile, password, second factor, sign out."),
        _p("org.read", _ALL, "Read the own organization."),
        _p("org.write", "owner admin", "Change the own organization's settings."),
        _p("orgs.manage", "", "List, create and disable any organization (operators)."),
        _p("members.read", "owner admin", "List the organization's accounts."),
        _p(
            "members.write",
            "owner admin",
            "Invite, create, change, disable accounts and grant roles (only owners grant or "
            "change owner).",
        ),
        _p("keys.read", _ALL, "List API keys (display identifiers only)."),
        _p(
            "keys.write",
            "owner admin developer",
            "Create, change, rotate and revoke API keys (developers: only keys they own).",
        ),
        _p("providers.read", "owner admin developer", "Read providers (never credentials)."),
        _p("providers.write", "owner admin", "Create, change and delete providers."),
        _p("models.read", _ALL, "Read models and prices."),
        _p("models.write", "owner admin", "Create, change and delete models."),
        _p("billing.read", "owner admin billing viewer", "Read balance and ledger."),
        _p(
            "billing.write",
            "owner admin billing",
            "Place and cancel orders, redeem codes, request invoices, set budgets.",
        ),
        _p(
            "billing.money",
            "",
            "Credit, grant and adjust balances, confirm or fail orders, refund, issue and void "
            "invoices, across organizations (operators; also owners, of their own "
            "organization, where ONETOKEN_TENANT_MONEY_ADMIN=true).",
            tenant_money="owner",
        ),
        _p("calls.read", "owner admin developer billing", "Read call metadata."),
        _p("usage.read", _ALL, "Read usage totals."),
        _p("security.read", "owner admin", "Read the organization's security and audit log."),
        _p("webhooks.read", "owner admin", "List callback addresses and their delivery log."),
        _p(
            "webhooks.write",
            "owner admin",
            "Create, change, test and delete callback addresses (platform-wide ones: operators).",
        ),
    )
}


def holds(
    permission: Permission, role: str, is_operator: bool, *, tenant_money_admin: bool = False
) -> bool:
    return (
        role in permission.roles
        or (permission.operator and is_operator)
        or (tenant_money_admin and role in permission.tenant_money_roles)
    )


def _audit_request(request: Request, principal: Principal, outcome: str, code: str) -> None:
    from onetoken.security import audit

    audit.request_done(request, principal, outcome=outcome, error_code=code)


@cache
def require(name: str) -> Callable[..., Iterator[Principal]]:
    """The dependency that admits holders of permission `name` and yields the Principal.

    Unsafe methods are audited into the security log when they finish (who, which
    endpoint, outcome), unless the service recorded a more precise audit event."""
    from onetoken.deps import Principal, get_principal, get_state

    permission = PERMISSIONS[name]

    def dependency(
        request: Request, principal: Annotated[Principal, Depends(get_principal)]
    ) -> Iterator[Principal]:
        tenant_money_admin = get_state(request).settings.tenant_money_admin
        if not holds(
            permission, principal.role, principal.is_operator,
            tenant_money_admin=tenant_money_admin,
        ):
            from onetoken.security import audit

            audit.access_denied(request, principal, permission.name)
            raise Forbidden(ROLE_DENIED_MESSAGE)
        if request.method not in UNSAFE_METHODS:
            yield principal
            return
        try:
            yield principal
        except OnetokenError as exc:
            _audit_request(request, principal, "refused", exc.code)
            raise
        except Exception:
            _audit_request(request, principal, "failed", "internal_error")
            raise
        _audit_request(request, principal, "ok", "")

    # This module defers annotations and imports Principal late (deps imports this module
    # at import time), so FastAPI gets the evaluated ones.
    dependency.__annotations__ = {
        "request": Request,
        "principal": Annotated[Principal, Depends(get_principal)],
        "return": Iterator[Principal],
    }
    dependency.__name__ = f"require_{name.replace('.', '_')}"
    dependency.onetoken_permission = permission  # type: ignore[attr-defined]
    return dependency


def public() -> None:
    """Marks an endpoint that needs no session (login, health)."""


public.onetoken_public = True  # type: ignore[attr-defined]

PublicDep = Depends(public)


# -- introspection, for the matrix test and the generated doc -----------------------------


def _calls(dependant: Any) -> Iterator[Any]:
    for dep in dependant.dependencies:
        yield dep.call
        yield from _calls(dep)


def route_permissions(route: APIRoute) -> list[Permission]:
    return [
        perm
        for call in _calls(route.dependant)
        if (perm := getattr(call, "onetoken_permission", None)) is not None
    ]


def route_is_public(route: APIRoute) -> bool:
    return any(getattr(call, "onetoken_public", False) for call in _calls(route.dependant))


@dataclass(frozen=True, slots=True)
class RouteRule:
    method: str
    path: str
    permission: Permission | None  # None: public


INTERNAL_PREFIX: Final = "/internal/"


def api_routes(app: FastAPI) -> list[tuple[str, str, APIRoute]]:
    """(method, full path, route) of every API endpoint, included routers flattened."""
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:  # FastAPI before included routers were kept as a tree
        contexts: list[tuple[str, set[str], Any]] = [
            (r.path, set(r.methods or ()), r) for r in app.routes if isinstance(r, APIRoute)
        ]
    else:
        contexts = [
            (str(c.path), set(c.methods or ()), c.original_route)
            for c in iter_route_contexts(app.routes)
        ]
    out = []
    for path, methods, route in contexts:
        # /internal/ channels between onetoken processes take a channel token, not a
        # session or a role; they are not part of this API (each channel tests its 401).
        if isinstance(route, APIRoute) and not path.startswith(INTERNAL_PREFIX):
            for method in sorted(methods - {"HEAD", "OPTIONS"}):
                out.append((method, path, route))
    return out


def route_rules(app: FastAPI) -> list[RouteRule]:
    """One rule per (method, path) of every APIRoute. Raises when a route declares no
    permission and is not public, or declares more than one."""
    rules: list[RouteRule] = []
    for method, path, route in api_routes(app):
        perms = {p.name: p for p in route_permissions(route)}
        public_route = route_is_public(route)
        if len(perms) > 1 or (perms and public_route) or (not perms and not public_route):
            raise LookupError(
                f"{method} {path} must declare exactly one permission "
                "(Depends(require(...))) or Depends(public)"
            )
        rules.append(RouteRule(method, path, next(iter(perms.values()), None)))
    rules.sort(key=lambda r: (r.path, r.method))
    return rules


def render_doc(app: FastAPI) -> str:
    roles = list(ROLES)
    lines = [
        "# Permissions",
        "",
        "Generated from `python/onetoken/security/permissions.py` by",
        "`python -m onetoken.security.permissions > docs/permissions.md`; a unit test keeps",
        "this file and the code identical, and another tries every endpoint with every role.",
        "",
        "Roles are per organization. An account only ever sees its own organization's data:",
        "another organization's resources answer 404 exactly like missing ones. Operators",
        "(`is_operator`, the platform's staff; the bootstrap account is one) additionally hold",
        "the permissions marked in the operator column, across all organizations.",
        "",
        "Moving the platform's money is an operator action: tenants place orders, redeem",
        "codes and read, but do not credit, confirm, refund or invoice themselves. A cell",
        "`setting` is held only where `ONETOKEN_TENANT_MONEY_ADMIN=true` (default false: a",
        "private single-enterprise deployment), and then only within the own organization.",
        "",
        "## Matrix",
        "",
        "| permission | " + " | ".join(roles) + " | operator | what |",
        "|---|" + "---|" * len(roles) + "---|---|",
    ]
    for perm in PERMISSIONS.values():
        cells = [
            "yes" if r in perm.roles else "setting" if r in perm.tenant_money_roles else ""
            for r in roles
        ]
        lines.append(
            f"| `{perm.name}` | "
            + " | ".join(cells)
            + f" | {'yes' if perm.operator else ''} | {perm.description} |"
        )
    lines += [
        "",
        "## Endpoints",
        "",
        "| method | path | permission |",
        "|---|---|---|",
    ]
    for rule in route_rules(app):
        name = f"`{rule.permission.name}`" if rule.permission else "public"
        lines.append(f"| {rule.method} | `{rule.path}` | {name} |")
    lines.append("")
    return "\n".join(lines)


def _main() -> int:
    import tempfile
    from pathlib import Path

    from pydantic import SecretStr

    from onetoken.app import create_app
    from onetoken.settings import Settings

    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(data_dir=Path(tmp), secret_key=SecretStr("d" * 16 + "oc-generator-key"))
        app = create_app(settings)
        sys.stdout.write(render_doc(app))
        app.state.onetoken.db_engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(_main())
