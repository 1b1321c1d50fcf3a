"""Applications: an org's keys grouped under a name and an owner, with limits and budgets
over all of their keys (docs/applications.md)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from sqlalchemy.orm import Session

from onetoken.billing.budgets import org_settings as billing_settings
from onetoken.keys import applications as service
from onetoken.keys.models import ApiKey, Application
from onetoken.keys.schemas import (
    ApplicationCreate,
    ApplicationKey,
    ApplicationList,
    ApplicationResponse,
    ApplicationUpdate,
    KeyLimitsOut,
)
from onetoken.keys.service import LIMIT_FIELDS
from onetoken.providers.models import OrgGatewaySettings
from onetoken.web.deps import AppsReadDep, AppsWriteDep, SessionDep, StateDep

router = APIRouter(prefix="/applications", tags=["applications"])


def app_out(app: Application, keys: list[ApiKey]) -> ApplicationResponse:
    return ApplicationResponse(
        id=app.id,
        org_id=app.org_id,
        name=app.name,
        description=app.description,
        owner_id=app.owner_id,
        limits=KeyLimitsOut(**{f: getattr(app, f) for f in LIMIT_FIELDS}),
        keys=[
            ApplicationKey(
                id=k.id,
                name=k.name,
                display=k.display,
                status=k.status,  # type: ignore[arg-type]
                owner_id=k.owner_id or k.created_by,
            )
            for k in keys
        ],
        created_by=app.created_by,
        created_at=app.created_at,
        updated_at=app.updated_at,
    )


def org_caps(session: Session, org_id: str) -> dict[str, int | None]:
    """The org's own limits and budgets: what an application's owner may not go above."""
    gateway = session.get(OrgGatewaySettings, org_id)
    billing = billing_settings(session, org_id)
    return {
        "rpm": gateway.rpm if gateway else None,
        "tpm": gateway.tpm if gateway else None,
        "concurrency": gateway.concurrency if gateway else None,
        "budget_day": billing.budget_day,
        "budget_month": billing.budget_month,
    }


@router.post("", response_model=ApplicationResponse, status_code=201)
def create_application(
    body: ApplicationCreate, principal: AppsWriteDep, session: SessionDep, state: StateDep
) -> ApplicationResponse:
    """Org owners and admins only."""
    app = service.create_application(
        session,
        org_id=principal.org_id,
        name=body.name,
        owner_id=body.owner_id or principal.account_id,
        description=body.description,
        limits=body.limits.model_dump() if body.limits else None,
        actor=principal,
    )
    state.commit_change(session)
    return app_out(app, [])


@router.get("", response_model=ApplicationList)
def list_applications(principal: AppsReadDep, session: SessionDep) -> ApplicationList:
    """Every application of the org, each with its keys."""
    keys = service.keys_of(session, principal.org_id)
    return ApplicationList(
        data=[
            app_out(a, keys.get(a.id, []))
            for a in service.list_applications(session, principal.org_id)
        ]
    )


@router.get("/{app_id}", response_model=ApplicationResponse)
def get_application(
    app_id: str, principal: AppsReadDep, session: SessionDep
) -> ApplicationResponse:
    app = service.get_application(session, principal.org_id, app_id)
    return app_out(app, service.keys_of(session, principal.org_id).get(app.id, []))


@router.patch("/{app_id}", response_model=ApplicationResponse)
def update_application(
    app_id: str,
    body: ApplicationUpdate,
    principal: AppsWriteDep,
    session: SessionDep,
    state: StateDep,
) -> ApplicationResponse:
    """Org owners and admins change anything; the application's owner its description
    and limits, within the org's own limits."""
    changes = body.model_dump(include=body.model_fields_set)
    app = service.update_application(
        session,
        principal.org_id,
        app_id,
        changes,
        actor=principal,
        org_caps=org_caps(session, principal.org_id),
    )
    state.commit_change(session)
    return app_out(app, service.keys_of(session, principal.org_id).get(app.id, []))


@router.delete("/{app_id}", status_code=204)
def delete_application(
    app_id: str, principal: AppsWriteDep, session: SessionDep, state: StateDep
) -> Response:
    """409 `application_has_keys` while a key that is not revoked belongs to it."""
    service.delete_application(session, principal.org_id, app_id, actor=principal)
    state.commit_change(session)
    return Response(status_code=204)
