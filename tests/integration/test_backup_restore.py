"""`onetoken backup` while serving and `onetoken restore` into a new data dir: the
restored service reconciles to zero, takes the old API key, has the call_log rows and
serves the ticket attachment; the backup file holds none of it in plaintext, and no
request content at all.

One multi-process test: two servers, the backup taken while calls keep arriving."""

from __future__ import annotations

import stat
import threading
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI

from tests.support import wait_until

from .harness import Admin, Server, bootstrap, cli
from .records import exported_calls, reconcile, wait_for_calls

# Sent in a prompt: content, which no store holds, so no backup either.
BODY_CANARY = "backup-body-canary-7c1e94d2a0"
# Sent as the User-Agent, which call_log keeps (metadata): in the backup, encrypted.
UA_PLANTED = "backup-ua-planted-3f8a61b5c9"
# A ticket's text and its attachment: content a customer chose to send, kept, encrypted.
TICKET_PLANTED = "backup-ticket-planted-d24e7b9013"
ATTACHMENT = f"router logs for the support desk: {TICKET_PLANTED}-file\n".encode()
SETTLE_TIMEOUT_S = 30.0


def _chat(client: OpenAI, text: str) -> str:
    r = client.chat.completions.with_raw_response.create(
        model="demo-chat", messages=[{"role": "user", "content": text}]
    )
    return str(r.headers["x-request-id"])


def _settled_reconcile(data_dir: Path) -> list[dict[str, Any]]:
    def settled() -> list[dict[str, Any]] | None:
        code, lines = reconcile(data_dir)
        return lines if code == 0 and lines else None

    lines: list[dict[str, Any]] = wait_until(
        settled, SETTLE_TIMEOUT_S, 0.2, message="reconcile finding no difference"
    )
    return lines


def test_backup_while_serving_restores_into_a_new_data_dir(
    tmp_path_factory: pytest.TempPathFactory, mock_addr: str
) -> None:
    old_dir = tmp_path_factory.mktemp("backup-old")
    new_dir = tmp_path_factory.mktemp("backup-new") / "data"
    out = tmp_path_factory.mktemp("backup-file") / "onetoken.backup"
    creds = bootstrap(old_dir)
    old = Server(data_dir=old_dir, upstream=mock_addr)
    old.start()
    try:
        admin = Admin(old, creds["admin_email"], creds["admin_password"])
        gateway = OpenAI(base_url=f"{old.gateway_url}/v1", api_key=creds["api_key"],
                         default_headers={"User-Agent": UA_PLANTED}, max_retries=0)
        before = {_chat(gateway, f"{BODY_CANARY} question {i}") for i in range(5)}
        ticket = admin.post("/api/v1/tickets", {
            "subject": "Gateway logs", "category": "technical",
            "description": f"Attached the logs. {TICKET_PLANTED}",
        })
        r = admin.http.post(f"/api/v1/tickets/{ticket['id']}/attachments",
                            params={"filename": "logs.txt"}, content=ATTACHMENT,
                            headers={"content-type": "text/plain"})
        assert r.status_code == 201, r.text
        attachment = r.json()
        wait_for_calls(admin, before)

        # Calls keep arriving while the backup is taken: whatever batch the backup holds,
        # the ledger and call_log in it hold the same ones.
        stop = threading.Event()
        during: list[str] = []

        def traffic() -> None:
            while not stop.is_set():
                during.append(_chat(gateway, f"{BODY_CANARY} during"))

        worker = threading.Thread(target=traffic)
        worker.start()
        try:
            wait_until(lambda: len(during) >= 3, SETTLE_TIMEOUT_S, message="traffic flowing")
            made = cli(old_dir, "backup", str(out))
        finally:
            stop.set()
            worker.join(timeout=30)
        assert "encrypted" in made.stdout and "--secret-file" in made.stderr
        assert stat.S_IMODE(out.stat().st_mode) == 0o600
        # The staging copy is gone: the only copy of the stores is the encrypted file.
        assert not any((old_dir / "backup-staging").iterdir())
        assert len(during) >= 3
    finally:
        old.stop()

    raw = out.read_bytes()
    for planted in (UA_PLANTED, TICKET_PLANTED, BODY_CANARY, creds["org_id"],
                    creds["admin_email"]):
        assert planted.encode() not in raw, planted
    assert b"SQLite format 3" not in raw and b"CREATE TABLE" not in raw
    # Nor the master secret: the restore must be given it.
    assert (old_dir / "secret.key").read_bytes().strip() not in raw

    # Without the master secret it was made under, nothing is restored.
    refused = cli(new_dir, "restore", str(out), check=False)
    assert refused.returncode == 2 and "master secret" in refused.stderr, refused.stderr
    assert not new_dir.exists()
    # Into a data dir in use: refused unless --force.
    busy = cli(old_dir, "restore", str(out), check=False)
    assert busy.returncode == 2 and "not empty" in busy.stderr, busy.stderr

    restored = cli(new_dir, "restore", str(out), "--secret-file", str(old_dir / "secret.key"))
    assert "call_log row(s)" in restored.stdout, restored.stdout
    assert (new_dir / "secret.key").read_bytes().strip() == (
        (old_dir / "secret.key").read_bytes().strip()
    )

    # What a backup killed half-way would leave: the server removes it at start.
    stale = new_dir / "backup-staging" / ("ab" * 16)
    stale.mkdir(parents=True)
    (stale / "control.db").write_bytes(b"a plaintext copy")
    new = Server(data_dir=new_dir, upstream=mock_addr)
    new.start()
    try:
        assert not stale.exists()
        rows = exported_calls(new_dir)
        ids = {row["request_id"] for row in rows}
        assert before <= ids
        assert all(row["user_agent"] == UA_PLANTED for row in rows)

        # The old key works through the restored gateway, and its call is charged.
        gateway = OpenAI(base_url=f"{new.gateway_url}/v1", api_key=creds["api_key"],
                         max_retries=0)
        after = _chat(gateway, "after the restore")
        assert after not in ids
        admin = Admin(new, creds["admin_email"], creds["admin_password"])
        wait_for_calls(admin, {after})
        # The restored ledger and call_log agree, with the new call in both.
        lines = _settled_reconcile(new_dir)
        assert all(line["difference"] == 0 for line in lines)
        assert sum(line["call_log_calls"] for line in lines) == len(ids) + 1

        # The restore is in the restored service's security log (counts, never values).
        events = wait_until(
            lambda: admin.get("/api/v1/security/events",
                              params={"kind": "backup.restored"})["data"],
            SETTLE_TIMEOUT_S, 0.2, message="the backup.restored event")
        assert events[0]["detail"]["call_log_rows"] == len(ids)
        assert events[0]["detail"]["ticket_files"] == 1
        got = admin.http.get(f"/api/v1/tickets/{ticket['id']}/attachments/{attachment['id']}")
        assert got.status_code == 200 and got.content == ATTACHMENT
        detail = admin.get(f"/api/v1/tickets/{ticket['id']}")
        assert TICKET_PLANTED in detail["description"]

        # Like every store, the restored one holds no request content.
        audit = cli(new_dir, "audit-retention", "--needle", BODY_CANARY, check=False)
        assert audit.returncode == 0, audit.stdout + audit.stderr
    finally:
        new.stop()

    # Stopped, the CLI takes the backup itself; here under a key file instead of the
    # master secret, restored with --force over the first data dir (same secret).
    key_file = out.with_name("backup.key")
    key_file.write_bytes(b"a passphrase kept in a vault\n")
    second = out.with_name("second.backup")
    cli(new_dir, "backup", str(second), "--key-file", str(key_file))
    assert TICKET_PLANTED.encode() not in second.read_bytes()
    without_key = cli(old_dir, "restore", str(second), "--force", check=False)
    assert without_key.returncode == 2 and "--key-file" in without_key.stderr
    cli(old_dir, "restore", str(second), "--force", "--key-file", str(key_file))
    code, lines = reconcile(old_dir)
    assert code == 0 and sum(line["call_log_calls"] for line in lines) == len(ids) + 1
