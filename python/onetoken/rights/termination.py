"""Org termination at contract end (docs/retention.md, "Termination").

In order, each step once:

1. export: everything kept about the org, one JSON document sealed as backups are
   (onetoken.kit.sealed: AES-256-GCM, key from the master secret, `ONETOKEN-EXPORT`
   magic) and written atomically (a temporary file renamed into place) at the path fixed
   when the termination started; `open_export` (`onetoken orgs decrypt-export`) gives the
   document back for the hand-over;
2. keys_revoked: every API key of the org revoked; gateways get a snapshot without them;
3. members_anonymized: every account of the org cancelled as rights.erasure does for one
   (identifiers cleared, sessions ended, tickets' submitted content erased, ClickHouse's
   part queued for the erasure worker); each account commits on its own and one already
   cancelled is skipped; the org's identity provider configuration (its client secret,
   its sign-ins under way) goes with them;
4. webhooks_deleted: the org's callback addresses (their pending payloads dropped);
5. providers_deleted: the org's own models, providers and routes;
6. terminated: the org's status becomes `terminated`, its sessions end.

The step log (`org_termination_steps`) gets a step's row in the transaction of its work,
so a run that stopped anywhere (a crash, a killed process) is resumed by running it again:
finished steps are skipped, the one that was interrupted is redone whole (steps 1 and 3 are
safe to redo: the export file is replaced, cancelled accounts are skipped), and nothing
happens twice. Billing records (ledger, orders, invoices, packages) are not touched: they
stay for their legal retention period and `onetoken billing reconcile` balances as before.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from onetoken.billing.models import Invoice, LedgerEntry, Order, Package
from onetoken.db.base import utcnow
from onetoken.db.session import bump_revision
from onetoken.keys.models import ApiKey, Application
from onetoken.keys.service import LIMIT_FIELDS
from onetoken.kit import sealed
from onetoken.kit.errors import Conflict, NotFound
from onetoken.kit.files import PRIVATE_FILE_MODE, private_dir
from onetoken.kit.money import format_amount
from onetoken.orgs import terms as org_terms
from onetoken.orgs.auth import end_org_sessions
from onetoken.orgs.models import Account, Org, OrgSso, SsoFlow
from onetoken.providers import service as providers
from onetoken.providers.models import Model, Provider, Route
from onetoken.rights import erasure, export
from onetoken.rights.models import AccountErasure, OrgTermination, OrgTerminationStep
from onetoken.siem import service as siem_service
from onetoken.webhooks import service as webhooks
from onetoken.webhooks.models import WebhookEndpoint

if TYPE_CHECKING:
    from onetoken.state import AppState

log = logging.getLogger("onetoken.rights")

STEPS = (
    "export",
    "keys_revoked",
    "members_anonymized",
    "webhooks_deleted",
    "providers_deleted",
    "terminated",
)
# Stops the process (exit status 75) right after the named step committed: how the tests
# crash a run half-way. Never set in service.
EXIT_AFTER_ENV = "ONETOKEN_TERMINATION_EXIT_AFTER"
EXPORT_FORMAT = "onetoken-org-export/1"


@dataclass(frozen=True, slots=True)
class TerminationResult:
    org_id: str
    export_path: str
    # Steps this run did; the others were done by an earlier run.
    ran: tuple[str, ...]
    completed_at: datetime | None
    steps: dict[str, dict[str, Any]]


def default_export_path(state: AppState, org_id: str) -> Path:
    return state.settings.data_dir / "exports" / f"org-{org_id}-termination.json.sealed"


def done_steps(session: Session, org_id: str) -> dict[str, dict[str, Any]]:
    rows = session.scalars(select(OrgTerminationStep).where(OrgTerminationStep.org_id == org_id))
    return {r.step: dict(r.detail) for r in rows}


def status(session: Session, org_id: str) -> TerminationResult | None:
    row = session.get(OrgTermination, org_id)
    if row is None:
        return None
    return TerminationResult(org_id, row.export_path, (), row.completed_at,
                             done_steps(session, org_id))


def terminate(
    state: AppState,
    org_id: str,
    *,
    reason: str,
    requested_by: str | None,
    export_path: Path | None = None,
) -> TerminationResult:
    """Run (or resume) the org's termination to the end. Raises NotFound, or Conflict for
    the org the operators' own accounts belong to. The first run fixes the reason and the
    export path; a resumed run keeps them."""
    with state.session_factory() as session:
        org = session.get(Org, org_id)
        if org is None:
            raise NotFound("Organization not found.")
        operators = session.scalar(
            select(Account.id).where(Account.org_id == org_id, Account.is_operator.is_(True))
        )
        if operators is not None:
            raise Conflict("The operators' own organization cannot be terminated.",
                           code="operator_org")
        if session.get(OrgTermination, org_id) is None:
            path = (export_path or default_export_path(state, org_id)).resolve()
            session.add(OrgTermination(org_id=org_id, reason=reason, requested_by=requested_by,
                                       export_path=str(path)))
            try:
                session.commit()
                log.info("rights.org_termination_started", extra={"org_id": org_id})
            except IntegrityError:
                # Another run started it at the same moment: its reason and path hold.
                session.rollback()
        row = session.get(OrgTermination, org_id)
        assert row is not None
        path = Path(row.export_path)
        done = done_steps(session, org_id)

    ran: list[str] = []
    work: dict[str, Callable[[], dict[str, Any] | None]] = {
        "export": lambda: _export(state, org_id, path),
        "keys_revoked": lambda: _revoke_keys(state, org_id),
        "members_anonymized": lambda: _anonymize_members(state, org_id, requested_by),
        "webhooks_deleted": lambda: _delete_webhooks(state, org_id),
        "providers_deleted": lambda: _delete_providers(state, org_id),
        "terminated": lambda: _mark_terminated(state, org_id),
    }
    for step in STEPS:
        if step in done or work[step]() is None:
            continue
        ran.append(step)
        log.info("rights.org_termination_step", extra={"org_id": org_id, "kind": step})
        if os.environ.get(EXIT_AFTER_ENV) == step:
            os._exit(75)
    if ran:
        state.config_changed()
        erasure.checkpoint(state.session_factory)
    with state.session_factory() as session:
        result = status(session, org_id)
    assert result is not None
    return TerminationResult(result.org_id, result.export_path, tuple(ran),
                             result.completed_at, result.steps)


def _claim(session: Session, org_id: str, step: str) -> bool:
    """Start the step's transaction: False when the step is done already. The first
    statement writes the termination's row (changing nothing), which takes the write lock
    on SQLite and the row's lock on PostgreSQL, so of two runs at once (two operators, a
    retried request) one does the step and the other then finds it done."""
    session.execute(
        update(OrgTermination)
        .where(OrgTermination.org_id == org_id)
        .values(reason=OrgTermination.reason)
    )
    return session.get(OrgTerminationStep, (org_id, step)) is None


def _log_step(session: Session, org_id: str, step: str, detail: dict[str, Any]) -> dict[str, Any]:
    """The step's row, in the caller's transaction (committed with the step's work)."""
    session.add(OrgTerminationStep(org_id=org_id, step=step, detail=detail))
    return detail


# -- 1. export ------------------------------------------------------------------------------


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def build_export(session: Session, org: Org, run: erasure.ClientRunner | None) -> dict[str, Any]:
    """Everything kept about the org: its fields and terms, each account's own export
    (rights.export: account, keys, sign-in sources, tickets, and with ClickHouse at hand
    its call statistics and security events), every key, application, callback address,
    provider and model (no secret, no credential), and its billing records."""
    found = org_terms.get_terms(session, org)
    accounts = session.scalars(
        select(Account).where(Account.org_id == org.id).order_by(Account.created_at, Account.id)
    ).all()
    keys = session.scalars(
        select(ApiKey).where(ApiKey.org_id == org.id).order_by(ApiKey.created_at, ApiKey.id)
    ).all()
    apps = session.scalars(
        select(Application)
        .where(Application.org_id == org.id)
        .order_by(Application.created_at, Application.id)
    ).all()
    endpoints = webhooks.list_endpoints(session, org.id)
    siem_destination = siem_service.get(session, org.id)
    provider_rows = session.scalars(select(Provider).where(Provider.org_id == org.id)).all()
    model_rows = session.scalars(select(Model).where(Model.org_id == org.id)).all()
    ledger = session.scalars(
        select(LedgerEntry).where(LedgerEntry.org_id == org.id).order_by(LedgerEntry.id)
    ).all()
    orders = session.scalars(
        select(Order).where(Order.org_id == org.id).order_by(Order.created_at, Order.id)
    ).all()
    invoices = session.scalars(
        select(Invoice).where(Invoice.org_id == org.id).order_by(Invoice.created_at, Invoice.id)
    ).all()
    packages = session.scalars(select(Package).where(Package.org_id == org.id)).all()
    return {
        "format": EXPORT_FORMAT,
        "exported_at": utcnow().isoformat(),
        "org": {"id": org.id, "name": org.name, "status": org.status,
                "created_at": _iso(org.created_at)},
        "terms": {**found.audit_view(), "updated_at": _iso(found.updated_at)},
        "accounts": [export.build(session, a, run) for a in accounts],
        "keys": [
            {"id": k.id, "name": k.name, "display": k.display, "status": k.status,
             "owner_id": k.owner_id, "application_id": k.application_id,
             "created_at": _iso(k.created_at), "revoked_at": _iso(k.revoked_at)}
            for k in keys
        ],
        "applications": [
            {"id": a.id, "name": a.name, "description": a.description, "owner_id": a.owner_id,
             "limits": {f: getattr(a, f) for f in LIMIT_FIELDS},
             "created_at": _iso(a.created_at)}
            for a in apps
        ],
        "webhooks": [
            {"id": e.id, "url": e.url_display, "kinds": list(e.kinds), "status": e.status,
             "created_at": _iso(e.created_at)}
            for e in endpoints
        ],
        # Where its security events went (docs/siem.md); the CA bundle is public material.
        "siem_destination": None if siem_destination is None else {
            "host": siem_destination.host, "port": siem_destination.port,
            "enabled": siem_destination.enabled, "delivered": siem_destination.delivered,
            "created_at": _iso(siem_destination.created_at),
        },
        "providers": [
            {"id": p.id, "name": p.name, "protocol": p.protocol, "base_url": p.base_url}
            for p in provider_rows
        ],
        "models": [
            {"id": m.id, "name": m.name, "provider_id": m.provider_id,
             "upstream_model": m.upstream_model}
            for m in model_rows
        ],
        "billing": {
            "ledger": [
                {"id": e.id, "kind": e.kind, "amount": format_amount(e.amount),
                 "created_at": _iso(e.created_at), "key_id": e.key_id, "model": e.model,
                 "calls": e.calls, "memo": e.memo}
                for e in ledger
            ],
            "orders": [
                {"id": o.id, "kind": o.kind, "amount": format_amount(o.amount),
                 "credit": format_amount(o.credit), "currency": o.currency,
                 "status": o.status, "created_at": _iso(o.created_at),
                 "paid_at": _iso(o.paid_at)}
                for o in orders
            ],
            "invoices": [
                {"id": i.id, "number": i.number, "period": i.period,
                 "amount": format_amount(i.amount), "currency": i.currency,
                 "status": i.status, "issued_at": _iso(i.issued_at)}
                for i in invoices
            ],
            "packages": [
                {"id": p.id, "status": p.status, "credit": format_amount(p.credit),
                 "remaining": format_amount(p.remaining), "valid_from": _iso(p.valid_from)}
                for p in packages
            ],
        },
    }


def seal_export(master: bytes, body: bytes) -> bytes:
    """The export as its file holds it: the org's ticket content among it, so encrypted at
    rest like a backup, under a key derived from the master secret (HKDF, a fresh salt per
    file)."""
    header = sealed.new_header("master", master, sealed.EXPORT_MAGIC)
    out = io.BytesIO()
    writer = sealed.EncryptingWriter(
        out, header, sealed.derive_key(header, master=master, key_file=None)
    )
    writer.write(body)
    writer.close()
    return out.getvalue()


def open_export(raw: bytes, master: bytes) -> bytes:
    """The export's JSON document from its file's bytes; sealed.BackupFileError when they
    are not an export, were altered, or were sealed under another master secret."""
    src = io.BytesIO(raw)
    header = sealed.read_header(src, sealed.EXPORT_MAGIC)
    key = sealed.derive_key(header, master=master, key_file=None)
    return b"".join(sealed.decrypted_chunks(src, header, key))


def _write_replacing(path: Path, body: bytes) -> None:
    """`body` as the whole of `path` (0600), never half-written: a run killed while writing
    leaves the previous file, or none, and the next run writes it again."""
    if not path.parent.exists():
        # A directory made here is private; one the operator named keeps its mode.
        private_dir(path.parent)
    # Per process and thread: a run killed mid-write leaves its own partial file behind,
    # never one another run is writing.
    partial = path.with_name(f"{path.name}.{os.getpid()}-{threading.get_ident()}.partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE_MODE)
    with os.fdopen(fd, "wb") as out:
        out.write(body)
        out.flush()
        os.fsync(out.fileno())
    os.replace(partial, path)


def _export(state: AppState, org_id: str, path: Path) -> dict[str, Any] | None:
    with state.session_factory() as session:
        if not _claim(session, org_id, "export"):
            return None
        org = session.get(Org, org_id)
        assert org is not None
        document = build_export(session, org, erasure._runner(state))
        body = json.dumps(document, indent=1, ensure_ascii=False).encode()
        _write_replacing(path, seal_export(state.settings.secret_key_bytes(), body))
        detail = _log_step(session, org_id, "export", {
            "bytes": len(body),
            "accounts": len(document["accounts"]),
            "clickhouse": document["accounts"][0]["call_statistics"] is not None
            if document["accounts"] else False,
        })
        session.commit()
    return detail


# -- 2. to 6. ------------------------------------------------------------------------------


def _revoke_keys(state: AppState, org_id: str) -> dict[str, Any] | None:
    with state.session_factory() as session:
        if not _claim(session, org_id, "keys_revoked"):
            return None
        now = utcnow()
        revoked = 0
        for key in session.scalars(select(ApiKey).where(ApiKey.org_id == org_id)):
            if key.status != "revoked":
                key.status = "revoked"
                key.revoked_at = now
                key.updated_at = now
                revoked += 1
        bump_revision(session)
        detail = _log_step(session, org_id, "keys_revoked", {"keys": revoked})
        session.commit()
    state.config_changed()
    return detail


def _anonymize_members(
    state: AppState, org_id: str, requested_by: str | None
) -> dict[str, Any] | None:
    with state.session_factory() as session:
        pending = session.scalars(
            select(Account.id)
            .where(
                Account.org_id == org_id,
                Account.id.not_in(select(AccountErasure.account_id)),
            )
            .order_by(Account.id)
        ).all()
    for account_id in pending:
        # One account per transaction: a crash in between leaves the others for the next run.
        # From the CLI no account asked: the erasure row names the operators.
        with contextlib.suppress(Conflict, IntegrityError):
            # Another run at the same time cancelled it first.
            erasure.cancel_account(state, account_id, requested_by=requested_by or "operator")
    with state.session_factory() as session:
        if not _claim(session, org_id, "members_anonymized"):
            return None
        # No one signs in to the org any more: its provider's client secret goes.
        session.execute(delete(SsoFlow).where(SsoFlow.org_id == org_id))
        session.execute(delete(OrgSso).where(OrgSso.org_id == org_id))
        cancelled = session.scalar(
            select(func.count()).select_from(AccountErasure).where(
                AccountErasure.account_id.in_(select(Account.id).where(Account.org_id == org_id))
            )
        )
        detail = _log_step(session, org_id, "members_anonymized", {"accounts": cancelled})
        session.commit()
    return detail


def _delete_webhooks(state: AppState, org_id: str) -> dict[str, Any] | None:
    with state.session_factory() as session:
        if not _claim(session, org_id, "webhooks_deleted"):
            return None
        endpoints = session.scalars(
            select(WebhookEndpoint).where(WebhookEndpoint.org_id == org_id)
        ).all()
        for endpoint in endpoints:
            webhooks.delete_endpoint(session, endpoint)
        detail = _log_step(session, org_id, "webhooks_deleted", {"endpoints": len(endpoints)})
        session.commit()
    return detail


def _delete_providers(state: AppState, org_id: str) -> dict[str, Any] | None:
    with state.session_factory() as session:
        if not _claim(session, org_id, "providers_deleted"):
            return None
        models = session.scalars(select(Model.id).where(Model.org_id == org_id)).all()
        for model_id in models:
            providers.delete_model(session, org_id, model_id)
        session.flush()
        found = session.scalars(select(Provider.id).where(Provider.org_id == org_id)).all()
        for provider_id in found:
            providers.delete_provider(session, org_id, provider_id)
        routes = session.scalars(select(Route).where(Route.org_id == org_id)).all()
        for route in routes:
            session.delete(route)
        bump_revision(session)
        detail = _log_step(session, org_id, "providers_deleted", {
            "models": len(models), "providers": len(found), "routes": len(routes),
        })
        session.commit()
    state.config_changed()
    return detail


def _mark_terminated(state: AppState, org_id: str) -> dict[str, Any] | None:
    with state.session_factory() as session:
        if not _claim(session, org_id, "terminated"):
            return None
        org = session.get(Org, org_id)
        assert org is not None
        org.status = "terminated"
        end_org_sessions(session, org_id)
        bump_revision(session)
        row = session.get(OrgTermination, org_id)
        assert row is not None
        row.completed_at = utcnow()
        detail = _log_step(session, org_id, "terminated", {})
        session.commit()
    state.config_changed()
    return detail
