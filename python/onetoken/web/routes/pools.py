"""Gateway pools (operators) and organizations' commercial terms, which pin an org to one
(docs/pools.md)."""

from __future__ import annotations

from fastapi import APIRouter

from onetoken.billing import budgets
from onetoken.kit.errors import NotFound
from onetoken.kit.money import format_amount
from onetoken.orgs import service, terms
from onetoken.orgs.models import GatewayPool
from onetoken.orgs.schemas import (
    OrgTermsResponse,
    OrgTermsUpdate,
    PoolCreate,
    PoolList,
    PoolResponse,
    PoolUpdate,
)
from onetoken.security import audit
from onetoken.web.deps import (
    OrgReadDep,
    PoolsManageDep,
    SessionDep,
    StateDep,
    TermsWriteDep,
)

router = APIRouter(tags=["pools"])


def pool_fields(pool: GatewayPool) -> dict[str, str | None]:
    return {"description": pool.description, "clickhouse_database": pool.clickhouse_database}


def _pool(pool: GatewayPool, orgs: int) -> PoolResponse:
    return PoolResponse.model_validate(pool).model_copy(update={"orgs": orgs})


@router.get("/pools", response_model=PoolList)
def list_pools(_: PoolsManageDep, session: SessionDep) -> PoolList:
    sizes = terms.pool_sizes(session)
    return PoolList(data=[_pool(p, sizes.get(p.name, 0)) for p in terms.list_pools(session)])


@router.post("/pools", response_model=PoolResponse, status_code=201)
def create_pool(body: PoolCreate, principal: PoolsManageDep, session: SessionDep) -> PoolResponse:
    """A new, empty pool: its gateways (`onetoken gateway --pool NAME`) serve no org until
    one is pinned to it."""
    pool = terms.create_pool(session, body.name, body.description, body.clickhouse_database)
    session.commit()
    audit.event(principal, "admin.pool_created", "medium", subject_id=pool.name,
                detail={"clickhouse_database": pool.clickhouse_database or ""})
    return _pool(pool, 0)


@router.patch("/pools/{name}", response_model=PoolResponse)
def update_pool(
    name: str, body: PoolUpdate, principal: PoolsManageDep, session: SessionDep
) -> PoolResponse:
    before = pool_fields(terms.get_pool(session, name))
    pool = terms.update_pool(session, name, body.model_dump(include=body.model_fields_set))
    session.commit()
    audit.change(principal, "admin.pool_changed", subject_id=pool.name, before=before,
                 after=pool_fields(pool), severity="medium")
    return _pool(pool, terms.pool_sizes(session).get(pool.name, 0))


# Terms kept with the org's billing settings (billing.budgets.update_org_settings).
BILLING_TERMS = ("price_factor_ppm", "credit_limit")


def _terms(session: SessionDep, found: terms.Terms) -> OrgTermsResponse:
    # The price factor and the credit limit live with the org's billing settings, which
    # the engine's snapshot and the money caps read; the terms show and set those values.
    billing = budgets.org_settings(session, found.org_id)
    return OrgTermsResponse(
        org_id=found.org_id, pool=found.pool, contract_ref=found.contract_ref,
        settlement=found.settlement,  # type: ignore[arg-type]  # SETTLEMENT_PERIODS
        price_factor_ppm=billing.price_factor_ppm, credit_limit=billing.credit_limit,
        dpa_signed=found.dpa_signed, dpa_signed_at=found.dpa_signed_at,
        updated_at=found.updated_at,
    )


@router.get("/orgs/{org_id}/terms", response_model=OrgTermsResponse)
def get_terms(org_id: str, principal: OrgReadDep, session: SessionDep) -> OrgTermsResponse:
    """The organization's commercial terms (its members, and operators for any org)."""
    # Another org's id answers exactly like an unknown one.
    if org_id != principal.org_id and not principal.is_operator:
        raise NotFound("Organization not found.")
    org = service.get_org(session, org_id)
    return _terms(session, terms.get_terms(session, org))


@router.patch("/orgs/{org_id}/terms", response_model=OrgTermsResponse)
def update_terms(
    org_id: str,
    body: OrgTermsUpdate,
    principal: TermsWriteDep,
    session: SessionDep,
    state: StateDep,
) -> OrgTermsResponse:
    """Set commercial terms (operators). Pinning the org to a pool moves its keys to that
    pool's gateways: once this returns, the shared gateways refuse them with 403
    wrong_gateway_pool, and the other way round. A new price factor prices the requests
    that start after it (the next snapshot, within a second)."""
    org = service.get_org(session, org_id)
    changes = body.model_dump(include=body.model_fields_set)
    billing = budgets.org_settings(session, org.id)
    money_before = {"price_factor_ppm": billing.price_factor_ppm,
                    "credit_limit": format_amount(billing.credit_limit)}
    before, after = terms.set_terms(
        session, org, {k: v for k, v in changes.items() if k in terms.TERM_FIELDS}
    )
    money = {k: v for k, v in changes.items() if k in BILLING_TERMS}
    if money:
        budgets.update_org_settings(session, org.id, **money)
    state.commit_change(session)
    response = _terms(session, after)
    audit.change(principal, "admin.org_terms_changed", subject_id=org.id, org_id=org.id,
                 before={**before.audit_view(), **money_before},
                 after={**after.audit_view(), "price_factor_ppm": response.price_factor_ppm,
                        "credit_limit": format_amount(response.credit_limit)},
                 severity="high")
    return response
