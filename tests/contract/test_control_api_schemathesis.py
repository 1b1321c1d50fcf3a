"""The control API fuzzed from its own OpenAPI document with schemathesis.

Every operation of /api/openapi.json gets MAX_EXAMPLES generated requests (valid and
invalid ones), and each request is sent as every role of an org (owner, admin, developer,
billing, viewer, analyst) and as a platform operator. Each answer must pass schemathesis' checks:
no server error, a status code and body the document declares (so every 4xx carries the
documented error shape), and no schema-valid request refused as invalid (the document is
as strict as the validation).

The app runs in process (ASGI) with cheap password hashing, except the operations that
read the call and security logs: those are served by a running gateway's ClickHouse
sink, so they are sent to a real `onetoken serve` (one chDB per process, and the unit
suite holds this process's).

A caller's session token is reissued, and the org and callers re-enabled, after any
request that changed something, so a generated logout, password change or account
disable cannot turn the callers of later requests away.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, settings
from pydantic import SecretStr
from schemathesis.specs.openapi.checks import positive_data_acceptance
from sqlalchemy import update

from onetoken.control import build_state, create_app
from onetoken.incidents import service as incidents
from onetoken.keys import applications
from onetoken.keys import service as keys
from onetoken.orgs import auth
from onetoken.orgs import service as orgs
from onetoken.orgs.models import Account, Org
from onetoken.security import log as security_log
from onetoken.security.principal import ROLES, Principal
from onetoken.settings import Settings
from onetoken.state import AppState
from onetoken.tickets import service as tickets
from onetoken.tickets.store import open_store
from tests import builders as build
from tests.integration.harness import Server, bootstrap

# 20 generated requests per operation, each sent as six callers: about three minutes on
# two cores. No deadline: the first request of an operation warms SQLAlchemy up.
MAX_EXAMPLES = 20
FUZZ = settings(max_examples=MAX_EXAMPLES, deadline=None,
                suppress_health_check=list(HealthCheck))
PASSWORD = "schemathesis-test-password"
CALLERS = [*ROLES, "operator"]
# Served from the gateway's call log or the security log (ClickHouse): the incident
# operations that read the events they group or show.
CALL_LOG_PATHS = (
    r"^/api/v1/(calls|usage/summary|billing/call-stats|security/events|me/export"
    r"|security/events/export"
    r"|analytics/sql|security/events/\{event_id\}/acknowledge|security/incidents"
    r"|security/incidents/\{incident_id\}/(events|timeline))$")


@dataclass
class World:
    state: AppState
    org_id: str
    callers: dict[str, str]  # caller -> account id
    # Real ids for path parameters, so generated requests also reach existing resources.
    ids: dict[str, str]
    tokens: dict[str, str] = field(default_factory=dict)

    def headers(self, caller: str) -> dict[str, str]:
        if caller not in self.tokens:
            self._reset()
        return {"Authorization": f"Bearer {self.tokens[caller]}"}

    def changed(self) -> None:
        """A request changed something: start the next one from a fresh world."""
        self.tokens.clear()

    def _reset(self) -> None:
        with self.state.session_factory() as s:
            s.execute(update(Org).where(Org.id == self.org_id).values(status="active"))
            s.execute(update(Account).where(Account.id.in_(self.callers.values()))
                      .values(status="active"))
            for caller, account_id in self.callers.items():
                account = s.get(Account, account_id)
                assert account is not None
                self.tokens[caller], _ = auth.issue_session(
                    s, self.state.secrets, account, timedelta(hours=1))
            s.commit()


def _seed(state: AppState) -> World:
    callers: dict[str, str] = {}
    with state.session_factory() as s:
        platform = orgs.create_org(s, "Fuzz platform")
        callers["operator"] = orgs.create_account(
            s, platform.id, "op@fuzz.test", PASSWORD, "owner", is_operator=True).id
        org = orgs.create_org(s, "Fuzz")
        for role in ROLES:
            callers[role] = orgs.create_account(s, org.id, f"{role}@fuzz.test", PASSWORD,
                                                role).id
        # The callers have read and accepted the terms of service (onetoken.orgs.acceptance).
        for account_id in callers.values():
            caller = s.get(Account, account_id)
            assert caller is not None
            build.accept_terms(s, caller)
        # Resources the generated requests may change at will.
        member = orgs.create_account(s, org.id, "member@fuzz.test", PASSWORD, "viewer")
        key, _ = keys.create_key(s, state.secrets, org_id=org.id,
                                 created_by=callers["owner"], name="fuzzed")
        app = applications.create_application(s, org_id=org.id, name="fuzzed",
                                               owner_id=callers["developer"])
        ticket = tickets.create(s, org_id=org.id, opened_by=callers["owner"], subject="fuzzed",
                                category="other", description="fuzzed")
        attachment = tickets.add_attachment(
            s, open_store(state.settings.ticket_store_dir), ticket, b"fuzzed notes",
            claimed_name="notes.txt", uploaded_by=callers["owner"], max_bytes=1024,
            max_count=1000,
        )
        event = incidents.EventFact(uuid.uuid4().hex, datetime.now(UTC), "calls.rate_anomaly",
                                    "high", org.id)
        owner = Principal(callers["owner"], org.id, "owner", "owner@fuzz.test")
        incident = incidents.open_incident(s, owner, [event])
        s.commit()
        return World(state, org.id, callers,
                     {"org_id": org.id, "account_id": member.id, "key_id": key.id,
                      "app_id": app.id,
                      "ticket_id": ticket.id, "attachment_id": attachment.id,
                      "incident_id": incident.id, "event_id": event.event_id})


def _app() -> tuple[Path, AppState, FastAPI]:
    tmp = Path(tempfile.mkdtemp(prefix="onetoken-schemathesis-"))
    settings_ = Settings(data_dir=tmp / "data",
                         secret_key=SecretStr("schemathesis-secret-key-0123456789abcdef"))
    state = build_state(settings_)
    return tmp, state, create_app(settings_, state=state)


# schemathesis parametrizes at collection time (its fixture-based loader does not run
# under this pytest), so the in-process app exists from import on.
TMP, STATE, APP = _app()

# Operations whose validation still refuses (422) values their document allows, with the
# rule the document does not state yet: the schema-valid-request check is off for them.
LOOSER_THAN_VALIDATION = {
    "POST /api/v1/keys": "expires_at in the future",
    "PATCH /api/v1/keys/{key_id}": "allowed_ips entries are addresses or CIDRs",
    "POST /api/v1/applications": "owner_id is an active account of the org",
    "PATCH /api/v1/applications/{app_id}": "owner_id is an active account of the org",
    "POST /api/v1/providers": "base_url syntax",
    "PATCH /api/v1/providers/{provider_id}": "base_url syntax",
    "PATCH /api/v1/billing/settings": "amount ranges",
    "POST /api/v1/billing/prices": "amount ranges",
    "POST /api/v1/billing/orders/{order_id}/refund": "amount not zero",
    "GET /api/v1/billing/statements/{period}": "period is YYYY-MM",
    "GET /api/v1/billing/statements/{period}/csv": "period is YYYY-MM",
    "POST /api/v1/billing/invoices": "period is YYYY-MM",
    "POST /api/v1/webhooks": "url syntax",
    "PUT /api/v1/sso": "the issuer on an allowed address, https unless internal providers are",
    # A browser's landing, not an API call: any state it did not issue goes back to the
    # sign-in page (303) with the reason.
    "GET /api/v1/auth/sso/callback": "state is one a sign-in started here issued",
    "POST /api/v1/routes": "aliases distinct from each other and the name",
    "POST /api/v1/billing/credits": "an idempotency key in the body or the header",
    "POST /api/v1/billing/orders": "a package order names a plan",
    "POST /api/v1/billing/redeem": "redemption code syntax",
    "GET /api/v1/billing/call-stats": "start before end",
    "GET /api/v1/calls": "cursor is one the API issued",
    "GET /api/v1/security/events": "cursor is one the API issued",
    "GET /api/v1/security/events/export": "cursor is one the API issued",
    "PUT /api/v1/security/siem": "the receiver is at a public address, its CA bundle is PEM",
    "PUT /api/v1/keys/{key_id}/policy": "a key policy only narrows its org's policy",
    "PATCH /api/v1/orgs/{org_id}/terms": "pool names an existing gateway pool",
    "POST /api/v1/security/blocked": "source is an address or CIDR",
    "POST /api/v1/security/blocked/remove": "source is an address or CIDR",
    "POST /api/v1/security/incidents/{incident_id}/notes":
        "one line, no brackets or backticks, no run over 40 characters",
    "POST /api/v1/security/incidents/{incident_id}/assign":
        "the assignee may handle the incident",
}


def _schema(loaded: Any) -> Any:
    # Unknown query parameters are ignored by design, and the Authorization header is the
    # caller's own (each request is sent as every caller), so neither is generated.
    # Deterministic: the same examples on every run, so `make test` does not flake.
    loaded.config.generation.update(max_examples=MAX_EXAMPLES, allow_extra_parameters=False,
                                    with_security_parameters=False, deterministic=True)
    # Generated examples only: the coverage phase's boundary and method probes multiply the
    # requests several times over, past the time this suite can spend.
    loaded.config.phases.update(phases=["examples", "fuzzing"])
    # Validation may be laxer than the document (pydantic reads end=10 as a timestamp and
    # false as 0); the contract here is the other way round, so that check is off.
    loaded.config.checks.update(excluded_check_names=["negative_data_rejection"])
    # 400 is a refusal by a business rule (wrong password, unknown code, widening policy),
    # which no schema states; 422 is a refusal by validation and must match the schema.
    loaded.config.checks.positive_data_acceptance.expected_statuses = [
        "2xx", "400", "401", "403", "404", "409", "429"]
    return loaded


in_process = _schema(schemathesis.openapi.from_asgi("/api/openapi.json", APP).exclude(
    path_regex=CALL_LOG_PATHS))
served = _schema(schemathesis.openapi.from_dict(APP.openapi()).include(
    path_regex=CALL_LOG_PATHS))


# Operations sent with made-up ids only: on the fuzzed org itself they would end the
# world every later request runs in (tests/unit/test_termination.py holds them).
MADE_UP_IDS_ONLY = {"POST /api/v1/orgs/{org_id}/terminate"}


def _send_as_every_caller(case: Any, world: World, **call: Any) -> None:
    params = case.path_parameters or {}
    if f"{case.method} {case.path}" in MADE_UP_IDS_ONLY:
        params = {}
    for name, value in params.items():
        # About half the examples name a resource that exists, the others a made-up one.
        if name in world.ids and isinstance(value, str) and len(value) % 2 == 0:
            params[name] = world.ids[name]
    looser = f"{case.method} {case.path}" in LOOSER_THAN_VALIDATION
    excluded = [positive_data_acceptance] if looser else []
    for caller in CALLERS:
        response = case.call_and_validate(headers=world.headers(caller),
                                          excluded_checks=excluded, **call)
        if case.method != "GET" and response.status_code < 300:
            world.changed()


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    yield _seed(STATE)
    STATE.db_engine.dispose()
    # The security events the requests raised are queued for this data dir: spool them
    # before it goes, so no later flush recreates it.
    writer = security_log.current()
    if writer is not None:
        writer.flush_to_spool()
    shutil.rmtree(TMP, ignore_errors=True)


@in_process.parametrize()
@FUZZ
def test_every_operation_as_every_caller(case: Any, world: World) -> None:
    _send_as_every_caller(case, world)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, World]]:
    data_dir = tmp_path_factory.mktemp("onetoken-schemathesis-served")
    bootstrap(data_dir)
    # No provider is called: these operations only read the logs.
    srv = Server(data_dir=data_dir, upstream="127.0.0.1:9")
    srv.start()
    state = build_state(Settings(data_dir=data_dir), migrate=False)
    try:
        yield srv, _seed(state)
    finally:
        srv.kill()
        state.db_engine.dispose()


@served.parametrize()
@FUZZ
def test_log_reading_operations_as_every_caller(
    case: Any, server: tuple[Server, World]
) -> None:
    srv, world = server
    _send_as_every_caller(case, world, base_url=srv.control_url)


def test_the_two_runs_cover_every_operation() -> None:
    paths = APP.openapi()["paths"]
    log_paths = [p for p in paths if re.match(CALL_LOG_PATHS, p)]
    assert len(log_paths) == 11, log_paths
    assert sum(len(methods) for methods in paths.values()) > 90


def test_every_operation_documents_the_error_shape() -> None:
    doc = APP.openapi()
    error_ref = "#/components/schemas/ErrorResponse"
    for path, methods in doc["paths"].items():
        if not path.startswith("/api/v1/"):
            continue
        for method, op in methods.items():
            for status in ("400", "401", "403", "404", "409", "422", "429"):
                content = op["responses"][status]["content"]["application/json"]
                assert content["schema"] == {"$ref": error_ref}, (method, path, status)
    assert set(doc["components"]["schemas"]["ErrorDetail"]["required"]) == {
        "message", "type", "param", "code"}
