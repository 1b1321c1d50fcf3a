"""audit-retention: finds a planted needle in files and ClickHouse rows, clean otherwise."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from clickhouse_connect.driver.client import Client

from onetoken import audit
from onetoken.analytics.clickhouse import open_client
from onetoken.analytics.columns import CALL_LOG_COLUMNS
from onetoken.analytics.sink import CallLogSink
from onetoken.settings import Settings
from tests.unit.batches import encode

NOW = int(time.time() * 1_000_000)


def needle() -> str:
    return f"canary-{uuid.uuid4().hex}"


def one_record(request_id: str, user_agent: str) -> dict[str, list[Any]]:
    values: dict[str, Any] = {
        "ts": NOW,
        "request_id": request_id,
        "org_id": "org-audit",
        "account_id": "acc",
        "key_id": "ot-ab12...9f3c",
        "path": "/v1/chat/completions",
        "model_requested": "m",
        "model_served": "m",
        "provider": "p",
        "prompt_tokens": 1,
        "completion_tokens": 1,
        "cached_tokens": 0,
        "usage_source": "upstream",
        "cost": 1,
        "status": 200,
        "error_code": "",
        "latency_us": 1,
        "ttfb_us": 1,
        "streamed": 0,
        "source_ip": "10.0.0.1",
        "user_agent": user_agent,
        "rate_limit": "pass",
        "attempts": 1,
        "guard_flags": "",
        "application_id": "",
        "images": 0,
        "audio_ms": 0,
        "characters": 0,
        "search_units": 0,
    }
    return {name: [values[name]] for name in CALL_LOG_COLUMNS}


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    data_dir = tmp_path_factory.mktemp("audit")
    (data_dir / "logs").mkdir()
    (data_dir / "logs" / "control.log").write_text('{"event":"auth.login_failed"}\n')
    return Settings(data_dir=data_dir)


@pytest.fixture(scope="module")
def client(settings: Settings) -> Iterator[Client]:
    client = open_client(settings)
    CallLogSink(settings, client=client).insert(
        *encode(one_record("req-clean", "python-httpx/0.27")), "calllog:clean"
    )
    yield client
    client.close()


def test_clean_data_dir_and_clickhouse_report_nothing(settings: Settings, client: Client) -> None:
    report = audit.audit(settings, needle(), client=client)
    assert report.findings == []
    assert report.problems == []
    assert report.exit_code == 0
    assert report.files_scanned > 0
    assert report.columns_scanned >= 10  # call_log and security_log String columns


def test_needle_in_a_log_file_is_found_with_its_offset(settings: Settings, client: Client) -> None:
    secret = needle()
    log = settings.data_dir / "logs" / "leak.log"
    log.write_bytes(b"\x00\x01binary prefix " + secret.encode() + b" trailer\n")
    try:
        found = audit.scan(settings, secret, client=client)
    finally:
        log.unlink()
    assert found == [f"{log}: 1 occurrence(s) (utf-8) at offset 16"]


def test_needle_split_across_chunks_is_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(audit, "CHUNK_BYTES", 64)
    secret = needle()
    blob = tmp_path / "blob.bin"
    # Occurrences straddling chunk boundaries, plus one at the very end.
    data = bytearray(os.urandom(1000).replace(b"c", b"x"))
    offsets = [50, 120, 500, 1000 - len(secret)]
    for off in offsets:
        data[off : off + len(secret)] = secret.encode()
    blob.write_bytes(bytes(data))
    report = audit.AuditReport()
    audit.scan_file(blob, audit.needle_variants(secret), report)
    assert report.findings == [
        f"{blob}: 4 occurrence(s) (utf-8) at offset {', '.join(map(str, offsets))}"
    ]
    assert report.bytes_scanned == 1000


def test_non_utf8_encodings_of_the_needle_are_found(tmp_path: Path) -> None:
    secret = "canary-ünïcode-" + uuid.uuid4().hex
    (tmp_path / "a.json").write_text(
        '{"m": "'
        + secret.encode("ascii", "backslashreplace").decode().replace("\\x", "\\u00")
        + '"}'
    )
    (tmp_path / "b.bin").write_bytes(secret.encode("utf-16-le"))
    report = audit.AuditReport()
    audit.scan_tree(tmp_path, audit.needle_variants(secret), report)
    assert any("a.json" in f and "json-escaped" in f for f in report.findings)
    assert any("b.bin" in f and "utf-16-le" in f for f in report.findings)


def test_needle_in_a_clickhouse_row_is_found(settings: Settings, client: Client) -> None:
    secret = needle()
    assert audit.scan(settings, secret, client=client) == []
    CallLogSink(settings, client=client).insert(
        *encode(one_record("req-leak", f"agent {secret}")), "calllog:leak"
    )
    found = audit.scan(settings, secret, client=client)
    assert "ClickHouse onetoken.call_log.user_agent: 1 row(s)" in found
    # Without a client, the scan opens the (same-process) chDB path itself.
    assert "ClickHouse onetoken.call_log.user_agent: 1 row(s)" in audit.scan(settings, secret)


def test_unreadable_entries_are_reported_not_skipped(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "dangling").symlink_to(tmp_path / "missing")
    report = audit.AuditReport()
    audit.scan_tree(tmp_path, audit.needle_variants("x-needle"), report)
    assert report.findings == []
    assert sorted(report.problems) == [
        f"{tmp_path / 'dangling'}: dangling symlink, not read",
        f"{tmp_path / 'fifo'}: not a regular file, not read",
    ]


def test_links_inside_are_not_rescanned_and_links_outside_are_followed(tmp_path: Path) -> None:
    secret = needle()
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "store").mkdir(parents=True)
    outside.mkdir()
    (root / "store" / "part.bin").write_bytes(secret.encode())
    (root / "alias").symlink_to(root / "store")  # like chDB's data/<db>/<table> links
    (outside / "elsewhere.log").write_bytes(b"..." + secret.encode())
    (root / "external").symlink_to(outside)
    report = audit.AuditReport()
    audit.scan_tree(root, audit.needle_variants(secret), report)
    assert report.problems == []
    assert sorted(report.findings) == [
        f"{outside / 'elsewhere.log'}: 1 occurrence(s) (utf-8) at offset 3",
        f"{root / 'store' / 'part.bin'}: 1 occurrence(s) (utf-8) at offset 0",
    ]


def test_extra_paths_are_scanned(settings: Settings, client: Client, tmp_path: Path) -> None:
    secret = needle()
    outside = tmp_path / "nginx.log"
    outside.write_text(f"GET /?q={secret}\n")
    found = audit.scan(settings, secret, client=client, extra_paths=[outside])
    assert found == [f"{outside}: 1 occurrence(s) (utf-8) at offset 8"]


def test_sql_database_text_columns_are_scanned(tmp_path: Path) -> None:
    import sqlite3

    secret = needle()
    db = tmp_path / "control.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE ledger (id INTEGER, memo TEXT, note VARCHAR(50), amount BIGINT)")
        conn.execute(
            "INSERT INTO ledger VALUES (1, ?, 'ok', 5), (2, 'x%_', ?, 6)", (f"a{secret}b", secret)
        )
    report = audit.AuditReport()
    audit.scan_sql_database(f"sqlite:///{db}", secret, report)
    assert report.problems == []
    assert sorted(report.findings) == [
        "control DB ledger.memo: 1 row(s)",
        "control DB ledger.note: 1 row(s)",
    ]
    clean = audit.AuditReport()
    audit.scan_sql_database(f"sqlite:///{db}", "%", clean)  # LIKE wildcards are not special
    assert clean.findings == ["control DB ledger.memo: 1 row(s)"]


@pytest.mark.skipif(
    not os.environ.get("ONETOKEN_TEST_POSTGRES_URL"), reason="ONETOKEN_TEST_POSTGRES_URL not set"
)
def test_postgres_text_columns_are_scanned() -> None:
    from sqlalchemy import create_engine, text

    url = os.environ["ONETOKEN_TEST_POSTGRES_URL"]
    secret = needle()
    table = f"audit_probe_{uuid.uuid4().hex[:8]}"
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text(f"CREATE TABLE {table} (id int, memo text, meta jsonb, raw bytea)"))
        conn.execute(
            text(f"INSERT INTO {table} VALUES (1, 'clean', CAST(:j AS jsonb), :b)"),  # noqa: S608
            {"j": f'{{"k": "{secret}"}}', "b": f"..{secret}..".encode()},
        )
    try:
        report = audit.AuditReport()
        audit.scan_sql_database(url, secret, report)
        assert report.problems == []
        assert sorted(report.findings) == [
            f"control DB {table}.meta: 1 row(s)",
            f"control DB {table}.raw: 1 row(s)",
        ]
    finally:
        with engine.begin() as conn:
            conn.execute(text(f"DROP TABLE {table}"))
        engine.dispose()


_HOLDER = """
import sys
from pathlib import Path
from onetoken.analytics.clickhouse import open_client
from onetoken.settings import Settings
client = open_client(Settings(data_dir=Path(sys.argv[1])))
print("ready", flush=True)
sys.stdin.read()
client.close()
"""

_PROBE = """
import os, sys
from pathlib import Path
from onetoken import audit
from onetoken.analytics.clickhouse import ChdbLockedError, open_client
from onetoken.settings import Settings
settings = Settings(data_dir=Path(sys.argv[1]))
try:
    open_client(settings)
except ChdbLockedError as exc:
    print("locked", exc.pid)
report = audit.audit(settings, "canary-nowhere")
print("exit", report.exit_code)
for problem in report.problems:
    print("problem", problem)
"""


def test_locked_chdb_path_is_a_clear_error_and_an_audit_problem(tmp_path: Path) -> None:
    # Both sides in fresh processes: chDB allows one engine path per process, and this
    # test process already runs one for the module fixtures.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "ready"
        probe = subprocess.run(
            [sys.executable, "-c", _PROBE, str(tmp_path)],
            capture_output=True,
            env=env,
            text=True,
            timeout=120,
            check=True,
        )
    finally:
        holder.communicate(timeout=60)
    lines = probe.stdout.splitlines()
    assert lines[0] == f"locked {holder.pid}"
    assert lines[1] == "exit 2"
    chdb_problems = [line for line in lines[2:] if "ClickHouse" in line]
    assert len(chdb_problems) == 1
    assert f"locked by process {holder.pid}" in chdb_problems[0]
    assert "through the running server" in chdb_problems[0]
