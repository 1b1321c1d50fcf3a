"""Work orders: who sees what, the status flow and its timestamps, attachments checked by
their bytes and served as downloads, staff access in the security log, and the rights
side (retention purge, export, erasure). On SQLite, and on PostgreSQL when
ONETOKEN_TEST_POSTGRES_URL is set (conftest)."""

from __future__ import annotations

import json
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from onetoken import audit, cli
from onetoken.analytics.clickhouse import open_client
from onetoken.db.base import utcnow
from onetoken.rights import retention
from onetoken.settings import Settings
from onetoken.state import AppState
from onetoken.tickets import content
from onetoken.tickets import service as tickets
from onetoken.tickets.models import Ticket, TicketAttachment, TicketMessage
from onetoken.tickets.store import open_store
from tests.support import TEST_SECRET
from tests.unit.conftest import Admin, add_account
from tests.unit.test_accounts import drained_events

API = "/api/v1/tickets"
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + bytes(range(64))
PDF = b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n"


def _open(client: TestClient, headers: dict[str, str], **fields: str) -> dict[str, Any]:
    body = {"subject": "Invoice total looks wrong", "category": "billing",
            "description": "The March statement adds up differently.", **fields}
    r = client.post(API, json=body, headers=headers)
    assert r.status_code == 201, r.text
    return dict(r.json())


def _upload(client: TestClient, headers: dict[str, str], ticket_id: str, data: bytes,
            filename: str, content_type: str = "application/octet-stream") -> Any:
    return client.post(f"{API}/{ticket_id}/attachments", params={"filename": filename},
                       content=data, headers={**headers, "content-type": content_type})


def _error(r: Any, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return dict(body["error"])


# -- the status flow ---------------------------------------------------------------------------


def test_messages_and_statuses_stamp_first_response_resolution_and_close(
    client: TestClient, admin: Admin, operator: Admin
) -> None:
    t = _open(client, admin.headers)
    assert t["status"] == "open" and t["first_staff_response_at"] is None
    tid = t["id"]

    # The customer adding detail before anyone answered: still open.
    r = client.post(f"{API}/{tid}/messages", json={"body": "Statement id 2026-03."},
                    headers=admin.headers)
    assert r.status_code == 201 and r.json()["author_kind"] == "customer"
    assert client.get(f"{API}/{tid}", headers=admin.headers).json()["status"] == "open"

    answer = client.post(f"{API}/staff/{tid}/messages", json={"body": "Looking into it."},
                         headers=operator.headers)
    assert answer.status_code == 201 and answer.json()["author_kind"] == "staff"
    after = client.get(f"{API}/{tid}", headers=admin.headers).json()
    assert after["status"] == "waiting_on_customer"
    assert after["first_staff_response_at"] == answer.json()["created_at"]

    client.post(f"{API}/{tid}/messages", json={"body": "Thanks."}, headers=admin.headers)
    assert client.get(f"{API}/{tid}", headers=admin.headers).json()["status"] == "waiting_on_staff"
    # A second answer does not move the first response.
    client.post(f"{API}/staff/{tid}/messages", json={"body": "Fixed."}, headers=operator.headers)
    again = client.get(f"{API}/{tid}", headers=admin.headers).json()
    assert again["first_staff_response_at"] == after["first_staff_response_at"]

    resolved = client.post(f"{API}/{tid}/status", json={"status": "resolved"},
                           headers=admin.headers).json()
    assert resolved["status"] == "resolved" and resolved["resolved_at"] is not None
    reopened = client.post(f"{API}/{tid}/status", json={"status": "open"},
                           headers=admin.headers).json()
    # Reopened after an answer: staff's turn, and no longer resolved.
    assert reopened["status"] == "waiting_on_staff" and reopened["resolved_at"] is None
    _error(client.post(f"{API}/{tid}/status", json={"status": "open"}, headers=admin.headers),
           409, "invalid_transition")

    closed = client.post(f"{API}/staff/{tid}/status", json={"status": "closed"},
                         headers=operator.headers).json()
    assert closed["status"] == "closed" and closed["closed_at"] is not None
    assert closed["message_count"] == 4
    # Closed is final, for both sides.
    _error(client.post(f"{API}/{tid}/messages", json={"body": "one more"},
                       headers=admin.headers), 409, "ticket_closed")
    _error(client.post(f"{API}/staff/{tid}/messages", json={"body": "x"},
                       headers=operator.headers), 409, "ticket_closed")
    _error(client.post(f"{API}/{tid}/status", json={"status": "resolved"},
                       headers=admin.headers), 409, "ticket_closed")
    _error(_upload(client, admin.headers, tid, PNG, "late.png"), 409, "ticket_closed")
    detail = client.get(f"{API}/{tid}", headers=admin.headers).json()
    assert [m["author_kind"] for m in detail["messages"]] == [
        "customer", "staff", "customer", "staff"
    ]


def test_invalid_bodies_are_refused_without_echoing_them(
    client: TestClient, admin: Admin
) -> None:
    secret = "canary-" + "q" * 30
    r = client.post(API, json={"subject": secret, "category": "nonsense", "description": "d"},
                    headers=admin.headers)
    err = _error(r, 422, "invalid_value")
    assert err["param"] == "category" and secret not in r.text
    r = client.post(API, json={"subject": secret * 10, "category": "other",
                               "description": "d"}, headers=admin.headers)
    assert _error(r, 422, "invalid_value")["param"] == "subject" and "canary" not in r.text


# -- who sees what -----------------------------------------------------------------------------


def test_members_see_their_orgs_tickets_per_role_and_nobody_elses(
    client: TestClient, state: AppState, admin: Admin, other_admin: Admin
) -> None:
    viewer = add_account(state, client, admin.org_id, "viewer@acme.test", "viewer")
    developer = add_account(state, client, admin.org_id, "dev@acme.test", "developer")
    mine = _open(client, admin.headers)
    theirs = _open(client, other_admin.headers, category="technical")

    # Every member reads the org's tickets; viewers do not write.
    listed = client.get(API, headers=viewer).json()
    assert [t["id"] for t in listed["data"]] == [mine["id"]] and not listed["has_more"]
    assert client.get(f"{API}/{mine['id']}", headers=viewer).status_code == 200
    _error(client.post(f"{API}/{mine['id']}/messages", json={"body": "x"}, headers=viewer),
           403, "permission_denied")
    _error(client.post(API, json={"subject": "s", "category": "other", "description": "d"},
                       headers=viewer), 403, "permission_denied")
    assert client.post(f"{API}/{mine['id']}/messages", json={"body": "x"},
                       headers=developer).status_code == 201

    # Another org's ticket does not exist for them, whatever they try.
    for method, path, body in (
        ("GET", f"{API}/{theirs['id']}", None),
        ("POST", f"{API}/{theirs['id']}/messages", {"body": "x"}),
        ("POST", f"{API}/{theirs['id']}/status", {"status": "closed"}),
    ):
        r = client.request(method, path, json=body, headers=admin.headers)
        _error(r, 404, "not_found")
    _error(_upload(client, admin.headers, theirs["id"], PNG, "x.png"), 404, "not_found")
    # Owners are not staff.
    _error(client.get(f"{API}/staff/queue", headers=admin.headers), 403, "permission_denied")
    _error(client.get(f"{API}/staff/{mine['id']}", headers=admin.headers), 403,
           "permission_denied")


def test_the_staff_queue_spans_orgs_and_filters(
    client: TestClient, admin: Admin, other_admin: Admin, operator: Admin
) -> None:
    a = _open(client, admin.headers)
    b = _open(client, other_admin.headers, category="technical")
    done = _open(client, other_admin.headers, category="account")
    client.post(f"{API}/{done['id']}/status", json={"status": "closed"},
                headers=other_admin.headers)
    queue = client.get(f"{API}/staff/queue", headers=operator.headers).json()
    # Newest first, closed ones left out unless asked for.
    assert [t["id"] for t in queue["data"]] == [b["id"], a["id"]]
    only = client.get(f"{API}/staff/queue", params={"org_id": admin.org_id},
                      headers=operator.headers).json()
    assert [t["id"] for t in only["data"]] == [a["id"]]
    tech = client.get(f"{API}/staff/queue", params={"category": "technical"},
                      headers=operator.headers).json()
    assert [t["id"] for t in tech["data"]] == [b["id"]]
    closed = client.get(f"{API}/staff/queue", params={"status": "closed"},
                        headers=operator.headers).json()
    assert [t["id"] for t in closed["data"]] == [done["id"]]
    page = client.get(f"{API}/staff/queue", params={"limit": 1}, headers=operator.headers)
    assert page.json()["has_more"] is True
    rest = client.get(f"{API}/staff/queue", headers=operator.headers,
                      params={"before": page.json()["data"][0]["created_at"]}).json()
    assert [t["id"] for t in rest["data"]] == [a["id"]]


def test_staff_reads_downloads_and_answers_are_in_the_orgs_security_log(
    client: TestClient, admin: Admin, operator: Admin
) -> None:
    t = _open(client, admin.headers)
    att = _upload(client, admin.headers, t["id"], PNG, "screen.png").json()
    drained_events()
    assert client.get(f"{API}/staff/{t['id']}", headers=operator.headers).status_code == 200
    got = client.get(f"{API}/staff/{t['id']}/attachments/{att['id']}", headers=operator.headers)
    assert got.status_code == 200 and got.content == PNG
    client.post(f"{API}/staff/{t['id']}/messages", json={"body": "On it."},
                headers=operator.headers)
    client.post(f"{API}/staff/{t['id']}/status", json={"status": "resolved"},
                headers=operator.headers)
    # A customer reading their own ticket is not staff access.
    client.get(f"{API}/{t['id']}", headers=admin.headers)
    events = [e for e in drained_events() if e["kind"].startswith("ticket.")]
    assert [e["kind"] for e in events] == [
        "ticket.staff_read", "ticket.staff_download", "ticket.staff_answered",
        "ticket.staff_status",
    ]
    for e in events:
        assert e["org_id"] == admin.org_id and e["actor_id"] == operator.account_id
        assert e["subject_id"] == t["id"]
        # Metadata only: nothing the customer wrote.
        assert "Invoice" not in json.dumps(e["detail"])
    assert events[1]["detail"]["attachment_id"] == att["id"]
    assert events[3]["detail"]["status_after"] == "resolved"


# -- attachments -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (PNG, "image/png"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", "image/jpeg"),
        (b"GIF89a\x01\x00\x01\x00", "image/gif"),
        (b"RIFF\x24\x00\x00\x00WEBPVP8 ", "image/webp"),
        (PDF, "application/pdf"),
        ("trace: ошибка 502 at 12:00\n".encode(), "text/plain; charset=utf-8"),
        (b"<!DOCTYPE html><html><script>alert(1)</script>", None),
        (b"  <svg onload=alert(1)>", None),
        (b"\x00\x01\x02binary", None),
        (b"\xc3\x28 not utf-8", None),
        (b"", None),
    ],
)
def test_the_kind_comes_from_the_bytes(data: bytes, expected: str | None) -> None:
    kind = content.detect(data)
    assert (kind.content_type if kind else None) == expected


def test_filenames_are_sanitised_and_take_the_detected_extension() -> None:
    assert content.safe_filename("../../etc/passwd", content.TEXT) == "passwd.txt"
    assert content.safe_filename("C:\\Users\\a\\shot.pdf", content.PNG) == "shot.png"
    assert content.safe_filename('a"b<c>.png', content.PNG) == "a_b_c_.png"
    assert content.safe_filename("...", content.PDF) == "attachment.pdf"
    assert content.safe_filename(".bashrc", content.TEXT) == "bashrc.txt"
    disposition = content.content_disposition("отчёт.pdf")
    assert disposition.startswith('attachment; filename="_____.pdf"')
    assert "filename*=UTF-8''%D0%BE%D1%82%D1%87%D1%91%D1%82.pdf" in disposition


def test_a_png_named_pdf_is_stored_and_served_as_png(
    client: TestClient, admin: Admin, settings: Settings, state: AppState
) -> None:
    t = _open(client, admin.headers)
    r = _upload(client, admin.headers, t["id"], PNG, "../invoice.pdf", "application/pdf")
    assert r.status_code == 201, r.text
    att = r.json()
    assert att["content_type"] == "image/png" and att["filename"] == "invoice.png"
    assert att["size_bytes"] == len(PNG)
    got = client.get(f"{API}/{t['id']}/attachments/{att['id']}", headers=admin.headers)
    assert got.status_code == 200 and got.content == PNG
    assert got.headers["content-type"] == "image/png"
    assert got.headers["x-content-type-options"] == "nosniff"
    assert got.headers["content-disposition"].startswith('attachment; filename="invoice.png"')
    assert "sandbox" in got.headers["content-security-policy"]
    # Stored under a random name in the data dir's store, never the user's name.
    with state.session_factory() as s:
        row = s.scalars(select(TicketAttachment)).one()
        key = row.storage_key
    stored = [p for p in settings.ticket_store_dir.rglob("*") if p.is_file()]
    assert [p.name for p in stored] == [key] and stored[0].read_bytes() == PNG
    assert "invoice" not in key and stored[0].stat().st_mode & 0o077 == 0
    text = _upload(client, admin.headers, t["id"], b"line one\nline two\n", "log.txt")
    served = client.get(f"{API}/{t['id']}/attachments/{text.json()['id']}",
                        headers=admin.headers)
    assert served.headers["content-type"] == "text/plain; charset=utf-8"


def test_html_claiming_to_be_an_image_is_refused(
    client: TestClient, admin: Admin, settings: Settings
) -> None:
    t = _open(client, admin.headers)
    page = b"<html><body><script>document.location='https://evil.test'</script></body></html>"
    r = _upload(client, admin.headers, t["id"], page, "cat.png", "image/png")
    err = _error(r, 415, "unsupported_attachment_type")
    assert err["type"] == "invalid_request_error" and "evil" not in r.text
    assert not settings.ticket_store_dir.exists() or not any(
        p.is_file() for p in settings.ticket_store_dir.rglob("*")
    )


def test_size_and_count_limits(
    client: TestClient, admin: Admin, settings: Settings, state: AppState
) -> None:
    settings.ticket_attachment_max_bytes = 2048
    settings.ticket_attachments_max = 2
    t = _open(client, admin.headers)
    big = b"a" * 2049
    err = _error(_upload(client, admin.headers, t["id"], big, "big.txt"), 413,
                 "attachment_too_large")
    assert err["type"] == "invalid_request_error" and "2048" in err["message"]

    # Without a declared length the stream is cut as it arrives.
    def chunks() -> Any:
        for _ in range(5):
            yield b"b" * 1024

    r = client.post(f"{API}/{t['id']}/attachments", content=chunks(), headers=admin.headers)
    _error(r, 413, "attachment_too_large")
    assert _upload(client, admin.headers, t["id"], b"a" * 2048, "fits.txt").status_code == 201
    assert _upload(client, admin.headers, t["id"], PNG, "two.png").status_code == 201
    _error(_upload(client, admin.headers, t["id"], PNG, "three.png"), 409,
           "too_many_attachments")
    with state.session_factory() as s:
        assert len(s.scalars(select(TicketAttachment)).all()) == 2


# -- retention, export, erasure ---------------------------------------------------------------


def _age_close(state: AppState, ticket_id: str, days: int) -> None:
    with state.session_factory() as s:
        ticket = s.get(Ticket, ticket_id)
        assert ticket is not None
        ticket.status = "closed"
        ticket.closed_at = utcnow() - timedelta(days=days)
        s.commit()


def test_closed_tickets_are_purged_with_their_files_after_the_retention_days(
    client: TestClient, admin: Admin, settings: Settings, state: AppState
) -> None:
    settings.ticket_retention_days = 30
    old = _open(client, admin.headers, subject="old one")
    recent = _open(client, admin.headers, subject="recent one")
    still_open = _open(client, admin.headers, subject="still open")
    for t in (old, recent, still_open):
        _upload(client, admin.headers, t["id"], PNG, "s.png")
        client.post(f"{API}/{t['id']}/messages", json={"body": "m"}, headers=admin.headers)
    _age_close(state, old["id"], 31)
    _age_close(state, recent["id"], 29)
    with state.session_factory() as s:
        # Opened long ago but never closed: retention runs from the close.
        opened = s.get(Ticket, still_open["id"])
        assert opened is not None
        opened.created_at = utcnow() - timedelta(days=400)
        s.commit()
    files_before = {p.name for p in settings.ticket_store_dir.rglob("*") if p.is_file()}
    assert len(files_before) == 3

    result = retention.purge(state.session_factory, state.settings)
    assert result.tickets == 1
    with state.session_factory() as s:
        assert {t.id for t in s.scalars(select(Ticket))} == {recent["id"], still_open["id"]}
        assert {m.ticket_id for m in s.scalars(select(TicketMessage))} == {
            recent["id"], still_open["id"]
        }
        kept = {a.storage_key for a in s.scalars(select(TicketAttachment))}
    files_after = {p.name for p in settings.ticket_store_dir.rglob("*") if p.is_file()}
    assert files_after == kept and len(files_after) == 2
    assert retention.purge(state.session_factory, state.settings).tickets == 0


def test_the_data_export_holds_the_accounts_tickets(
    client: TestClient, admin: Admin, state: AppState, operator: Admin
) -> None:
    dev = add_account(state, client, admin.org_id, "dev@acme.test", "developer")
    mine = _open(client, admin.headers, subject="export me")
    _upload(client, admin.headers, mine["id"], PDF, "contract.pdf")
    client.post(f"{API}/staff/{mine['id']}/messages", json={"body": "answered"},
                headers=operator.headers)
    _open(client, dev, subject="not mine")
    doc = client.get("/api/v1/me/export", headers=admin.headers).json()
    (ticket,) = doc["tickets"]
    assert ticket["subject"] == "export me" and ticket["description"] == mine["description"]
    assert [m["body"] for m in ticket["messages"]] == ["answered"]
    (att,) = ticket["attachments"]
    assert att["content_type"] == "application/pdf" and att["filename"] == "contract.pdf"
    got = client.get(att["download"], headers=admin.headers)
    assert got.status_code == 200 and got.content == PDF


def test_cancelling_an_account_erases_what_it_submitted_and_keeps_the_record(
    client: TestClient, admin: Admin, state: AppState, settings: Settings, operator: Admin
) -> None:
    dev = add_account(state, client, admin.org_id, "dev@acme.test", "developer")
    dev_id = client.get("/api/v1/me", headers=dev).json()["id"]
    opened = _open(client, dev, subject="Dana's problem", description="my phone +1555")
    _upload(client, dev, opened["id"], PNG, "me.png")
    client.post(f"{API}/staff/{opened['id']}/messages", json={"body": "Hi Dana"},
                headers=operator.headers)
    others = _open(client, admin.headers, subject="Owner's ticket")
    client.post(f"{API}/{others['id']}/messages", json={"body": "Dana adds: same here"},
                headers=dev)
    _upload(client, dev, others["id"], b"dana's notes", "notes.txt")
    client.post(f"{API}/{others['id']}/messages", json={"body": "owner again"},
                headers=admin.headers)
    kept_png = _upload(client, admin.headers, others["id"], PNG, "owner.png").json()

    r = client.post(f"/api/v1/accounts/{dev_id}/cancel", headers=admin.headers)
    assert r.status_code == 200, r.text

    gone = client.get(f"{API}/{opened['id']}", headers=admin.headers).json()
    assert gone["subject"] == gone["description"] == "[erased]"
    assert [m["body"] for m in gone["messages"]] == ["[erased]"]
    assert gone["attachments"] == [] and gone["status"] == "closed"
    assert gone["closed_at"] is not None and gone["first_staff_response_at"] is not None
    assert gone["opened_by"] == dev_id and gone["category"] == "billing"
    kept = client.get(f"{API}/{others['id']}", headers=admin.headers).json()
    assert kept["subject"] == "Owner's ticket" and kept["status"] != "closed"
    assert [m["body"] for m in kept["messages"]] == ["[erased]", "owner again"]
    assert [a["id"] for a in kept["attachments"]] == [kept_png["id"]]
    files = [p for p in settings.ticket_store_dir.rglob("*") if p.is_file()]
    assert [p.read_bytes() for p in files] == [PNG]
    blob = Path(str(settings.database_url).removeprefix("sqlite:///"))
    if blob.exists():
        assert b"Dana's problem" not in blob.read_bytes()


# -- audit-retention ---------------------------------------------------------------------------


def _plant_in_ticket(client: TestClient, admin: Admin, needle: str) -> None:
    t = _open(client, admin.headers, description=f"the app printed {needle}")
    assert _upload(client, admin.headers, t["id"], f"log: {needle}\n".encode(),
                   "trace.txt").status_code == 201


def test_audit_reports_ticket_hits_apart_and_passes_on_them_only(
    client: TestClient, admin: Admin, settings: Settings
) -> None:
    needle = f"canary-{uuid.uuid4().hex}"
    _plant_in_ticket(client, admin, needle)
    ch = open_client(settings)
    try:
        report = audit.audit(settings, needle, client=ch)
        assert report.findings == [] and report.problems == [], report.render()
        # The attachment file, and the ticket tables (SQLite's file explained by them).
        assert any(str(settings.ticket_store_dir) in f for f in report.ticket_findings)
        assert any("control DB tickets.description" in f for f in report.ticket_findings)
        assert report.exit_code == 0 and "IN TICKETS" in report.render()

        # The same string anywhere else is a finding, and fails the audit.
        (Path(settings.data_dir) / "logs").mkdir(exist_ok=True)
        (Path(settings.data_dir) / "logs" / "control.log").write_text(f'{{"x":"{needle}"}}\n')
        report = audit.audit(settings, needle, client=ch)
        assert len(report.findings) == 1 and "control.log" in report.findings[0]
        assert report.ticket_findings and report.exit_code == 1
    finally:
        ch.close()


def test_a_sqlite_hit_its_ticket_tables_do_not_explain_stays_a_finding(
    client: TestClient, admin: Admin, settings: Settings
) -> None:
    """A needle in a non-ticket table of the SQLite file is call-side data even when a
    ticket also holds it (the classification checks the tables, not just the file)."""
    if not str(settings.database_url).startswith("sqlite"):
        pytest.skip("the SQLite file's classification")
    needle = f"canary-{uuid.uuid4().hex}"
    _plant_in_ticket(client, admin, needle)
    r = client.post("/api/v1/keys", json={"name": needle[:60]}, headers=admin.headers)
    assert r.status_code == 201, r.text
    report = audit.audit(settings, needle, clickhouse_scan=lambda _n, _r: None)
    assert any("control.db" in f for f in report.findings), report.render()
    assert report.exit_code == 1


def test_the_cli_exits_0_on_ticket_hits_and_1_on_others(
    client: TestClient, admin: Admin, settings: Settings, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    needle = f"canary-{uuid.uuid4().hex}"
    _plant_in_ticket(client, admin, needle)
    monkeypatch.setenv("ONETOKEN_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("ONETOKEN_DATABASE_URL", str(settings.database_url))
    monkeypatch.setenv("ONETOKEN_SECRET_KEY", TEST_SECRET)
    assert cli.main(["audit-retention", "--needle", needle]) == 0
    out = capsys.readouterr()
    assert "IN TICKETS" in out.out and "FOUND" not in out.out
    assert "only in tickets" in out.err
    (Path(settings.data_dir) / "logs").mkdir(exist_ok=True)
    (Path(settings.data_dir) / "logs" / "gateway.log").write_text(needle)
    assert cli.main(["audit-retention", "--needle", needle]) == 1
    assert "FOUND" in capsys.readouterr().out


def test_concurrent_uploads_never_pass_the_count_limit(
    client: TestClient, admin: Admin, state: AppState, settings: Settings
) -> None:
    """Six uploads at once to a ticket that takes three more: exactly three land, on
    SQLite and PostgreSQL alike, and no file is left behind for the refused ones."""
    t = _open(client, admin.headers)
    store = open_store(settings.ticket_store_dir)
    start = threading.Barrier(6)

    def upload(i: int) -> str:
        with state.session_factory() as s:
            ticket = tickets.get(s, t["id"], admin.org_id)
            start.wait()
            try:
                tickets.add_attachment(s, store, ticket, f"note {i}".encode(),
                                       claimed_name=f"n{i}.txt", uploaded_by=admin.account_id,
                                       max_bytes=1024, max_count=3)
                s.commit()
                return "stored"
            except tickets.TooManyAttachments:
                s.rollback()
                return "refused"

    with ThreadPoolExecutor(6) as pool:
        outcomes = sorted(pool.map(upload, range(6)))
    assert outcomes == ["refused"] * 3 + ["stored"] * 3
    with state.session_factory() as s:
        keys = {a.storage_key for a in s.scalars(select(TicketAttachment))}
    assert len(keys) == 3
    assert {p.name for p in settings.ticket_store_dir.rglob("*") if p.is_file()} == keys
