"""Users' rights: export one's own data, cancel one's own account (or, for admins, an
account of their org). Viewing and correcting live at GET/PATCH /me and /org. Legal holds:
placed and lifted by operators, read by the org's members."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field, SecretStr
from sqlalchemy import func, select

from onetoken.kit.errors import Conflict, Forbidden, NotFound, Unauthorized
from onetoken.kit.text import NOT_BLANK
from onetoken.orgs import auth
from onetoken.orgs.models import Account
from onetoken.rights import erasure, export, holds, termination
from onetoken.rights.models import LegalHold
from onetoken.security import audit
from onetoken.security.principal import Principal
from onetoken.state import AppState
from onetoken.web.deps import (
    HoldsManageDep,
    MembersWriteDep,
    OrgReadDep,
    OrgsManageDep,
    ServiceUnavailable,
    SessionDep,
    SignedInDep,
    StateDep,
    own_account,
)

router = APIRouter(tags=["rights"])



class CancelRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Re-authentication: a stolen session alone must not erase an account.
    password: SecretStr = Field(min_length=1, max_length=1024)


class CancelResponse(BaseModel):
    account_id: str
    # control_done: the control DB is anonymized, ClickHouse's part is queued (the erasure
    # worker finishes it within seconds, or once ClickHouse is reachable again); held: the
    # org is under a legal hold, the account is disabled and anonymized once it ends.
    state: str
    keys_revoked: int


def _runner(state: AppState) -> Any:
    return erasure._runner(state)


@router.get(
    "/me/export",
    response_model=None,
    responses={200: {"content": {"application/json": {}, "text/csv": {}},
                     "description": "JSON, or one part as CSV."}},
)
def export_me(
    principal: SignedInDep,
    session: SessionDep,
    state: StateDep,
    format: Annotated[Literal["json", "csv"], Query()] = "json",
    part: Annotated[Literal["account", "keys", "calls", "security"], Query()] = "calls",
) -> Response:
    """Everything kept about the caller's account. JSON: one document with every part.
    CSV: one part per request (`part`: calls, the default; account; keys; security)."""
    account = own_account(session, principal)
    run = _runner(state)
    audit.event(principal, "account.data_exported", "info", subject_id=account.id,
                detail={"format": format, "part": part if format == "csv" else "all"})
    if format == "json":
        body = export.build(session, account, run)
        return JSONResponse(
            body, headers={"content-disposition": 'attachment; filename="onetoken-export.json"'}
        )
    if part in ("calls", "security") and run is None:
        raise ServiceUnavailable("Call statistics are served by a running gateway.")
    if part == "account":
        text = export.account_csv(export.account_part(session, account))
    elif part == "keys":
        text = export.to_csv(export.keys_part(session, account), export.KEY_COLUMNS)
    elif part == "calls":
        rows = run(lambda c: export.call_statistics(c, account.org_id, account.id))
        text = export.to_csv(rows, export.CALL_STAT_COLUMNS)
    else:
        rows = run(lambda c: export.security_events(c, account.org_id, account.id))
        text = export.to_csv(rows, export.SECURITY_COLUMNS)
    return PlainTextResponse(
        text,
        media_type="text/csv",
        headers={"content-disposition": f'attachment; filename="onetoken-{part}.csv"'},
    )


def _check_owner_kept(session: SessionDep, account: Account) -> None:
    if account.role != "owner" or account.status != "active":
        return
    owners = session.scalar(
        select(func.count()).select_from(Account).where(
            Account.org_id == account.org_id,
            Account.role == "owner",
            Account.status == "active",
        )
    )
    if int(owners or 0) <= 1:
        raise Conflict(
            "The organization's last owner cannot be cancelled; make another account owner "
            "first.",
            code="last_owner",
        )


def _cancel(state: AppState, principal: Principal, account_id: str) -> CancelResponse:
    result = erasure.cancel_account(state, account_id, requested_by=principal.account_id)
    # Recorded after the anonymization and without the caller's address, so the trail of
    # the cancellation does not bring back what was just removed.
    scrubbed = replace(principal, source_ip="", user_agent="")
    audit.event(scrubbed, "account.cancelled", "high", subject_id=account_id,
                detail={"keys_revoked": result.keys_revoked, "state": result.state})
    return CancelResponse(
        account_id=result.account_id, state=result.state, keys_revoked=result.keys_revoked
    )


@router.post("/me/cancel", response_model=CancelResponse)
def cancel_me(
    body: CancelRequest,
    principal: SignedInDep,
    request: Request,
    session: SessionDep,
    state: StateDep,
) -> CancelResponse:
    """Cancel the caller's own account: its API keys are revoked at once, its personal
    data anonymized (docs/retention.md); billing records stay under its pseudonymous id.
    Needs the current password."""
    account = own_account(session, principal)
    guard = auth.login_guard(request, state)
    password = body.password.get_secret_value()
    if auth.step_up(session, state.secrets, guard, principal, account, password=password):
        raise Unauthorized("The password is not correct.", code="invalid_password")
    _check_owner_kept(session, account)
    session.rollback()
    return _cancel(state, principal, account.id)


@router.post("/accounts/{account_id}/cancel", response_model=CancelResponse)
def cancel_account(
    account_id: str, principal: MembersWriteDep, session: SessionDep, state: StateDep
) -> CancelResponse:
    """Cancel an account of the caller's org (owners only for owner accounts)."""
    account = session.get(Account, account_id)
    if account is None or (account.org_id != principal.org_id and not principal.is_operator):
        raise NotFound("Account not found.")
    if account.role == "owner" and principal.role != "owner" and not principal.is_operator:
        raise Forbidden("Only owners manage owner accounts.", code="owner_required")
    _check_owner_kept(session, account)
    session.rollback()
    return _cancel(state, principal, account.id)


# -- org termination (operators) ------------------------------------------------------------


class TerminateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field(min_length=1, max_length=500, pattern=NOT_BLANK,
                        description="Why (the contract's end, its reference); audited.")


class TerminationResponse(BaseModel):
    org_id: str
    export_path: str = Field(description="The file (on the control server) holding the "
                             "org's data export.")
    ran: list[str] = Field(description="The steps this request ran; the others were done "
                           "by an earlier run.")
    steps: dict[str, dict[str, Any]] = Field(description="Each finished step and what it did "
                                             "(counts).")
    completed_at: datetime | None


def _termination(result: termination.TerminationResult) -> TerminationResponse:
    return TerminationResponse(org_id=result.org_id, export_path=result.export_path,
                               ran=list(result.ran), steps=result.steps,
                               completed_at=result.completed_at)


@router.post("/orgs/{org_id}/terminate", response_model=TerminationResponse)
def terminate_org(
    org_id: str, body: TerminateRequest, principal: OrgsManageDep, session: SessionDep,
    state: StateDep,
) -> TerminationResponse:
    """End an organization at contract end (operators; docs/retention.md): its data
    exported to a file under the data directory, then its API keys revoked, every member
    anonymized, its callback addresses and providers deleted, and its status set to
    `terminated`. Billing records stay for their legal period. Idempotent: a run that
    stopped half-way is resumed by sending it again; a finished one changes nothing."""
    session.rollback()
    result = termination.terminate(state, org_id, reason=body.reason,
                                   requested_by=principal.account_id)
    if result.ran:
        audit.event(principal, "admin.org_terminated", "high", subject_id=org_id,
                    org_id=org_id, detail={"steps": ",".join(result.ran), "reason": body.reason})
    return _termination(result)


@router.get("/orgs/{org_id}/termination", response_model=TerminationResponse)
def get_termination(org_id: str, _: OrgsManageDep, session: SessionDep) -> TerminationResponse:
    """How far the organization's termination got (operators)."""
    result = termination.status(session, org_id)
    if result is None:
        raise NotFound("This organization is not being terminated.")
    return _termination(result)


# -- legal holds ---------------------------------------------------------------------------


class HoldRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # The grounds, e.g. a case or order reference; the org's members read it.
    reason: str = Field(min_length=1, max_length=500)
    expires_at: datetime


class HoldResponse(BaseModel):
    id: str
    org_id: str
    reason: str
    # standing, lifted or expired
    state: str
    placed_by: str
    placed_at: datetime
    expires_at: datetime
    lifted_by: str | None
    lifted_at: datetime | None


class HoldList(BaseModel):
    data: list[HoldResponse]
    # Whether a hold stands now: retention purges and anonymization skip the org's records.
    held: bool


def _hold(hold: LegalHold) -> HoldResponse:
    return HoldResponse(
        id=hold.id, org_id=hold.org_id, reason=hold.reason, state=holds.state_of(hold),
        placed_by=hold.placed_by, placed_at=hold.placed_at, expires_at=hold.expires_at,
        lifted_by=hold.lifted_by, lifted_at=hold.lifted_at,
    )


def _hold_list(session: SessionDep, org_id: str) -> HoldList:
    data = [_hold(h) for h in holds.org_holds(session, org_id)]
    return HoldList(data=data, held=any(h.state == "standing" for h in data))


def _sync_holds(state: AppState) -> None:
    """Tell ClickHouse's TTLs at once; when that fails, the erasure worker's next pass
    does (the hold is already in force in the control DB)."""
    run = _runner(state)
    if run is None:
        return
    try:
        holds.sync_clickhouse(state.session_factory, run)
    except Exception:
        if erasure._worker is not None:
            erasure._worker.notify()


@router.get("/org/holds", response_model=HoldList)
def own_holds(principal: OrgReadDep, session: SessionDep) -> HoldList:
    """The legal holds on the caller's organization, standing or ended, newest first."""
    return _hold_list(session, principal.org_id)


@router.get("/orgs/{org_id}/holds", response_model=HoldList)
def org_holds(org_id: str, _: HoldsManageDep, session: SessionDep) -> HoldList:
    """The legal holds on any organization (operators)."""
    return _hold_list(session, org_id)


@router.post("/orgs/{org_id}/holds", response_model=HoldResponse, status_code=201)
def place_hold(
    org_id: str, body: HoldRequest, principal: HoldsManageDep, session: SessionDep,
    state: StateDep,
) -> HoldResponse:
    """Place a legal hold on an organization (operators): until it is lifted or expires,
    retention purges and anonymization skip the organization's records."""
    hold = holds.place(session, principal, org_id, reason=body.reason,
                       expires_at=body.expires_at)
    session.commit()
    _sync_holds(state)
    return _hold(hold)


@router.post("/orgs/{org_id}/holds/{hold_id}/lift", response_model=HoldResponse)
def lift_hold(
    org_id: str, hold_id: str, principal: HoldsManageDep, session: SessionDep,
    state: StateDep,
) -> HoldResponse:
    """Lift a standing legal hold (operators); purges and anonymization resume."""
    hold = holds.lift(session, principal, org_id, hold_id)
    session.commit()
    _sync_holds(state)
    if erasure._worker is not None:
        erasure._worker.notify()
    return _hold(hold)
