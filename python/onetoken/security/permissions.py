"""The permission matrix: which role may do what, defined once, enforced per endpoint.

Every endpoint of the control API declares exactly one permission with
`Depends(require("keys.write"))` (onetoken.web.deps), or declares itself public with
`Depends(public)`. The matrix test enumerates `app.routes`, so an endpoint without a
declaration fails the suite, and docs/permissions.md is generated from this matrix and the
routes (`python -m onetoken.web.permissions > docs/permissions.md`).

Operators (`accounts.is_operator`, the platform's own staff; the bootstrap account is
one) hold every permission marked `operator`; some permissions are operator-only.
Moving the platform's money (`billing.money`) is one of them unless a private deployment
hands it to its owners with ONETOKEN_TENANT_MONEY_ADMIN=true.

Until the signed-in account accepts the current terms of service, only the `session`
permission is held (onetoken.orgs.acceptance); every other one answers 403
`terms_not_accepted`.
"""

from __future__ import annotations

from dataclasses import dataclass

from onetoken.security.principal import ROLES

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
    # Held before the current terms of service are accepted (onetoken.orgs.acceptance):
    # every other permission waits for the acceptance.
    before_terms: bool = False


def _p(
    name: str,
    roles: str,
    description: str,
    *,
    operator: bool = True,
    tenant_money: str = "",
    before_terms: bool = False,
) -> Permission:
    held = frozenset(r for r in roles.split() if r)
    delegated = frozenset(r for r in tenant_money.split() if r)
    assert held <= set(ROLES) and delegated <= set(ROLES), name
    return Permission(name, held, operator, description, delegated, before_terms)


_ALL = " ".join(ROLES)

PERMISSIONS: dict[str, Permission] = {
    p.name: p
    for p in (
        _p(
            "session",
            _ALL,
            "Read the own profile, read and accept the terms of service, sign out, export "
            "and cancel the own account: the only permission held before the current terms "
            "are accepted (whoever declines them keeps these rights).",
            before_terms=True,
        ),
        _p("self", _ALL, "Own account: change the profile, password, second factor."),
        _p("org.read", _ALL, "Read the own organization."),
        _p("org.write", "owner admin", "Change the own organization's settings."),
        _p(
            "orgs.manage",
            "",
            "List, create, disable and terminate any organization (operators).",
        ),
        _p(
            "terms.write",
            "",
            "Set an organization's commercial terms: contract reference, settlement period, "
            "price factor, data processing agreement, gateway pool (operators; members read "
            "them with org.read).",
        ),
        _p("pools.manage", "", "List, create and change gateway pools (operators)."),
        _p(
            "holds.manage",
            "",
            "Place and lift legal holds on any organization (operators; members read their "
            "organization's holds with org.read).",
        ),
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
        _p("applications.read", _ALL, "List applications with their keys and limits."),
        _p(
            "applications.write",
            "owner admin developer",
            "Create, rename, hand over and delete applications (owners and admins); change "
            "an application's description and limits within the organization's own (also "
            "its owner).",
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
        _p("calls.read", "owner admin developer billing analyst", "Read call metadata."),
        _p("usage.read", _ALL, "Read usage totals."),
        _p(
            "analytics.sql",
            "owner admin analyst",
            "Run read-only SQL over the organization's call metadata, usage and security log "
            "(operators: any organization's, or all of them).",
        ),
        _p("security.read", "owner admin", "Read the organization's security and audit log."),
        _p(
            "security.block",
            "",
            "List, block and unblock source addresses the gateways refuse (operators).",
        ),
        _p(
            "security.handle",
            "owner admin",
            "Handle the organization's security events: group them into incidents, "
            "acknowledge, assign, annotate, resolve (operators: every organization's).",
        ),
        _p(
            "siem.write",
            "owner admin",
            "Set, test and remove the organization's SIEM destination (syslog over TLS).",
        ),
        _p("webhooks.read", "owner admin", "List callback addresses and their delivery log."),
        _p(
            "webhooks.write",
            "owner admin",
            "Create, change, test and delete callback addresses (platform-wide ones: operators).",
        ),
        _p("tickets.read", _ALL, "Read the organization's tickets, messages and attachments."),
        _p(
            "tickets.write",
            "owner admin developer billing",
            "Open tickets, write messages, attach files, resolve, close and reopen tickets.",
        ),
        _p(
            "tickets.staff",
            "",
            "The ticket queue across organizations: read, download, answer and set statuses "
            "(operators; every access is in the security log).",
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


def held(role: str, is_operator: bool, *, tenant_money_admin: bool = False) -> list[str]:
    """The names of every permission a caller holds, in the matrix's order: what the
    console shows (GET /api/v1/me/permissions), decided by the same rule as `holds`."""
    return [
        p.name
        for p in PERMISSIONS.values()
        if holds(p, role, is_operator, tenant_money_admin=tenant_money_admin)
    ]
