"""The permission of every route of the control API, read from the app itself: the matrix
test walks it, and docs/permissions.md is generated from it
(`python -m onetoken.web.permissions > docs/permissions.md`)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from fastapi.routing import APIRoute

from onetoken.security.permissions import PERMISSIONS, Permission
from onetoken.security.principal import ROLES

if TYPE_CHECKING:
    from fastapi import FastAPI


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
        "Generated from `python/onetoken/security/permissions.py` and the routes by",
        "`python -m onetoken.web.permissions > docs/permissions.md`; a unit test keeps",
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
        "Until an account accepts the current terms of service (`ONETOKEN_TERMS_VERSION`,",
        "docs/terms.md), its sessions hold only `session`: every other endpoint answers 403",
        "`terms_not_accepted`. API keys on the gateway are not sessions and are not held back.",
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
    from fastapi import FastAPI

    from onetoken.web.app import include_routes

    app = FastAPI()
    include_routes(app)
    sys.stdout.write(render_doc(app))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
