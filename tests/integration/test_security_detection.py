"""Risk detection, webhooks and account erasure against a real server: traffic through the
gateway (a key suddenly at 20x its baseline, a key from 50 source addresses, a 401 flood,
a revoked key), security_log rows through the control API, signed deliveries at a real
local receiver; then an account cancelled and every store scanned for its data.

Source addresses are distinct loopback addresses (127.x.y.z) bound on the client side,
so the gateway sees them as peers without trusting any proxy header.
"""

from __future__ import annotations

import contextlib
import json
import random
import secrets
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from onetoken.audit import AuditReport, needle_variants, scan_tree
from onetoken.webhooks.signing import SIGNATURE_HEADER, verify
from tests.support import wait_until
from tests.webhook_receiver import Received, Receiver

from .harness import Admin, Server, bootstrap
from .records import reconcile, wait_for_calls

DETECTION_ENV = {
    "ONETOKEN_WEBHOOK_PRIVATE_CIDRS": "127.0.0.0/8",
    "ONETOKEN_WEBHOOK_BACKOFF_BASE_SECONDS": "0.1",
    "ONETOKEN_WEBHOOK_POLL_INTERVAL_SECONDS": "0.1",
    "ONETOKEN_ANOMALY_BUCKET_SECONDS": "0.5",
    "ONETOKEN_ANOMALY_WARMUP_BUCKETS": "3",
    "ONETOKEN_ANOMALY_MIN_REQUESTS": "20",
    "ONETOKEN_ANOMALY_IP_THRESHOLD": "50",
    "ONETOKEN_ATTACK_401_THRESHOLD": "30",
    "ONETOKEN_ATTACK_401_WINDOW_SECONDS": "30",
    "ONETOKEN_ATTACK_BLOCK_SECONDS": "120",
}
CHAT = {"model": "demo-chat", "messages": [{"role": "user", "content": "hi"}],
        "mock": {"chunks": 1}}
WAIT_S = 30.0


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver().start()
    yield r
    r.stop()


@pytest.fixture(scope="module")
def env(
    tmp_path_factory: pytest.TempPathFactory, mock_addr: str, receiver: Receiver
) -> Iterator[dict[str, Any]]:
    data_dir: Path = tmp_path_factory.mktemp("detect")
    creds = bootstrap(data_dir)
    server = Server(data_dir=data_dir, upstream=mock_addr, extra_env=DETECTION_ENV)
    server.start()
    try:
        admin = Admin(server, creds["admin_email"], creds["admin_password"])
        # The bootstrap owner is an operator: one endpoint gets the org's events and the
        # platform-wide ones (attack interception on unknown keys has no org).
        hook = admin.post("/api/v1/webhooks", {
            "url": receiver.url,
            "kinds": ["frequency_anomaly", "abnormal_calls", "attack_blocked", "key_risk",
                      "system_alarm", "permission_change"],
            "platform": True,
        })
        yield {"server": server, "admin": admin, "secret": hook["secret"], "data_dir": data_dir}
    finally:
        server.kill()


def new_key(admin: Admin, name: str) -> tuple[str, str]:
    created = admin.post("/api/v1/keys", {"name": name})
    return created["id"], created["key"]


def client_from(server: Server, source: str = "127.0.0.1") -> httpx.Client:
    return httpx.Client(
        base_url=server.gateway_url,
        transport=httpx.HTTPTransport(local_address=source),
        timeout=10,
    )


def chat(c: httpx.Client, key: str, *, close: bool = False) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"}
    if close:
        # Refused before its body is read, a request leaves a connection hyper will not
        # reuse (without announcing it): refused requests go on fresh connections.
        headers["connection"] = "close"
    return c.post("/v1/chat/completions", json=CHAT, headers=headers)


def security_events(admin: Admin, kind: str) -> list[dict[str, Any]]:
    page = admin.get("/api/v1/security/events", params={"kind": kind, "limit": 1000})
    return list(page["data"])


def wait_event(admin: Admin, kind: str, match: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    found: dict[str, Any] = wait_until(
        lambda: next((e for e in security_events(admin, kind) if match(e)), None),
        WAIT_S,
        0.1,
        message=f"a security_log row {kind}",
    )
    return found


def wait_hook(
    receiver: Receiver, secret: str, kind: str, match: Callable[[dict[str, Any]], bool]
) -> tuple[Received, dict[str, Any]]:
    def found(rs: list[Received]) -> bool:
        return any(_match(r, kind, match) for r in rs)

    got = receiver.wait_for(found, timeout=WAIT_S)
    hit = next(r for r in got if _match(r, kind, match))
    assert verify(secret, hit.body, hit.headers[SIGNATURE_HEADER])
    return hit, orjson.loads(hit.body)


def _match(r: Received, kind: str, match: Callable[[dict[str, Any]], bool]) -> bool:
    event = orjson.loads(r.body)
    return bool(event["type"] == kind and match(event))


def test_key_at_twenty_times_its_baseline(env: dict[str, Any], receiver: Receiver) -> None:
    server, admin = env["server"], env["admin"]
    key_id, key = new_key(admin, "steady")
    with client_from(server) as c:
        # Baseline: 2 requests per 0.5 s bucket for six buckets. The pacing is the traffic
        # shape under test (a steady rate the burst is compared with), not a wait.
        for _ in range(12):
            assert chat(c, key).status_code == 200
            time.sleep(0.25)
    with ThreadPoolExecutor(8) as pool:
        def burst(_: int) -> int:
            with client_from(server) as c:
                return sum(chat(c, key).status_code == 200 for _ in range(20))

        assert sum(pool.map(burst, range(8))) == 160
    event = wait_event(admin, "calls.rate_anomaly", lambda e: e["subject_id"] == key_id)
    assert event["severity"] == "high" and event["detail"]["ratio"] >= 10
    _, hook = wait_hook(receiver, env["secret"], "frequency_anomaly",
                        lambda e: e["data"].get("subject_id") == key_id)
    assert hook["data"]["security_kind"] == "calls.rate_anomaly"


def test_key_from_fifty_source_addresses(env: dict[str, Any], receiver: Receiver) -> None:
    server, admin = env["server"], env["admin"]
    key_id, key = new_key(admin, "shared")
    for i in range(50):
        with client_from(server, f"127.0.5.{i + 1}") as c:
            assert chat(c, key).status_code == 200
    event = wait_event(admin, "calls.many_sources", lambda e: e["subject_id"] == key_id)
    assert event["detail"]["sources"] >= 50
    wait_hook(receiver, env["secret"], "abnormal_calls",
              lambda e: e["data"].get("subject_id") == key_id)


def test_401_flood_is_blocked_and_recorded(env: dict[str, Any], receiver: Receiver) -> None:
    server, admin = env["server"], env["admin"]
    _, key = new_key(admin, "victim")
    attacker = "127.0.9.9"
    with client_from(server, attacker) as c:
        for _ in range(40):
            r = chat(c, "ot-" + secrets.token_hex(20), close=True)
            assert r.status_code in (401, 403)
        blocked = wait_until(
            lambda: (r := chat(c, "ot-" + secrets.token_hex(20), close=True)).status_code
            == 403
            and r,
            WAIT_S,
            message="the flooding address blocked",
        )
        assert blocked.json()["error"]["code"] == "ip_blocked"
        # The block refuses the failing attempts, not a valid key from the same address.
        assert chat(c, key).status_code == 200
    with client_from(server, "127.0.0.1") as c:
        assert chat(c, key).status_code == 200
    event = wait_event(admin, "attack.auth_flood_blocked",
                       lambda e: e["source_ip"] == attacker)
    assert event["severity"] == "critical" and event["detail"]["blocked"] is True
    _, hook = wait_hook(receiver, env["secret"], "attack_blocked",
                        lambda e: e["data"].get("source_ip") == attacker)
    assert hook["org_id"] == ""


# bench/locustfile.py's task weights, and the status each kind of request must get.
LOCUST_MIX: tuple[tuple[str, int, int], ...] = (
    ("chat", 40, 200), ("chat_stream", 30, 200), ("embeddings", 10, 200), ("models", 5, 200),
    ("bad_key", 2, 401), ("bad_json", 2, 400), ("unknown_model", 1, 404),
)


def _locust_request(c: httpx.Client, kind: str, key: str) -> httpx.Response:
    auth = {"Authorization": f"Bearer {key}"}
    if kind == "chat":
        return c.post("/v1/chat/completions", json=CHAT, headers=auth)
    if kind == "chat_stream":
        with c.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True},
                      headers=auth) as r:
            r.read()
            return r
    if kind == "embeddings":
        return c.post("/v1/embeddings", json={"model": "demo-embed", "input": "the cat"},
                      headers=auth)
    if kind == "models":
        return c.get("/v1/models", headers=auth)
    if kind == "bad_key":
        return chat(c, "ot-" + secrets.token_hex(20), close=True)
    if kind == "bad_json":
        return c.post("/v1/chat/completions", content=b"{not json", headers=auth)
    return c.post("/v1/chat/completions", json={**CHAT, "model": "no-such-model"}, headers=auth)


def test_locust_mix_from_one_address_loses_no_valid_request(env: dict[str, Any]) -> None:
    """bench/locustfile.py's traffic (valid keys plus its share of unknown keys) from one
    address, until the 401-flood detector blocks the address and well after: the unknown
    keys are refused as `ip_blocked`, no request with a valid key is. The detector's window
    (30 s, 30 failures, DETECTION_ENV) compresses locust's minute (100 in 60 s)."""
    server, admin = env["server"], env["admin"]
    keys = [new_key(admin, f"locust-{i}")[1] for i in range(4)]
    kinds = [kind for kind, weight, _ in LOCUST_MIX for _ in range(weight)]
    expected = {kind: status for kind, _, status in LOCUST_MIX}
    source = "127.0.10.10"
    lock = threading.Lock()
    refused_valid: list[tuple[str, int, str]] = []
    unknown: list[int] = []
    blocked_at: list[int] = []
    sent = [0]
    deadline = time.monotonic() + 60

    def user(n: int) -> None:
        rng = random.Random(n)  # noqa: S311 (traffic shape)
        with httpx.Client(base_url=server.gateway_url, timeout=10,
                          transport=httpx.HTTPTransport(local_address=source)) as c:
            while time.monotonic() < deadline:
                with lock:
                    # Run on for 300 requests after the block was first seen.
                    if blocked_at and sent[0] > blocked_at[0] + 300:
                        return
                    sent[0] += 1
                kind = rng.choice(kinds)
                r = _locust_request(c, kind, keys[n % len(keys)])
                with lock:
                    if kind == "bad_key":
                        unknown.append(r.status_code)
                        if r.status_code == 403 and not blocked_at:
                            blocked_at.append(sent[0])
                    elif r.status_code != expected[kind]:
                        code = r.json()["error"]["code"] if r.status_code >= 400 else ""
                        refused_valid.append((kind, r.status_code, code))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(user, range(8)))
    assert blocked_at, f"the unknown keys were never blocked ({len(unknown)} sent)"
    assert refused_valid == [], refused_valid[:10]
    # Once blocked, the unknown keys stay refused.
    after = unknown[unknown.index(403):]
    assert len(after) >= 3 and set(after) == {403}, after
    assert sent[0] > blocked_at[0] + 250


def test_revoked_key_use_is_a_key_risk(env: dict[str, Any], receiver: Receiver) -> None:
    server, admin = env["server"], env["admin"]
    key_id, key = new_key(admin, "to-revoke")
    r = admin.http.post(f"/api/v1/keys/{key_id}/revoke")
    assert r.status_code == 200
    with client_from(server, "127.0.3.3") as c:
        wait_until(lambda: chat(c, key, close=True).status_code == 401, WAIT_S,
                   message="the revoked key refused")
        assert chat(c, key, close=True).json()["error"]["code"] == "key_revoked"
    _, hook = wait_hook(receiver, env["secret"], "key_risk",
                        lambda e: e["data"].get("subject_id") == key_id)
    assert hook["data"]["error_code"] == "key_revoked"
    assert hook["data"]["source_ip"] == "127.0.3.3"
    event = wait_event(admin, "key.revoked_used", lambda e: e["subject_id"] == key_id)
    assert event["source_ip"] == "127.0.3.3"
    # The revocation itself is a permission change.
    _, change = wait_hook(receiver, env["secret"], "permission_change",
                          lambda e: e["data"].get("subject_id") == key_id)
    assert change["data"]["security_kind"] == "admin.key_revoked"
    assert change["data"]["status.after"] == "revoked"


def test_delivery_log_shows_the_deliveries(env: dict[str, Any]) -> None:
    log = env["admin"].get("/api/v1/webhooks/deliveries", params={"limit": 500})["data"]
    delivered = [d for d in log if d["status"] == "delivered"]
    assert {d["kind"] for d in delivered} >= {"frequency_anomaly", "abnormal_calls", "key_risk"}
    assert all(d["last_status_code"] == 200 and d["attempts"] >= 1 for d in delivered)


# -- users' rights: export, cancellation, and the scan afterwards (stops the server) ------------


def _scan_clickhouse(data_dir: Path, needles: list[str]) -> dict[str, list[str]]:
    """Every String column of every ClickHouse table, in a child process (the embedded
    chDB path belongs to one process at a time)."""
    script = (
        "import json,sys\n"
        "from onetoken.settings import Settings\n"
        "from onetoken.analytics.clickhouse import open_client\n"
        "from onetoken.audit import AuditReport, scan_clickhouse\n"
        "s = Settings(data_dir=sys.argv[1])\n"
        "c = open_client(s)\n"
        "out = {}\n"
        "for n in json.loads(sys.argv[2]):\n"
        "    r = AuditReport(); scan_clickhouse(c, n, r, None)\n"
        "    assert r.columns_scanned > 0 and not r.problems, r.problems\n"
        "    out[n] = r.findings\n"
        "ttl = c.query(\"SELECT engine_full FROM system.tables WHERE database = 'onetoken' \"\n"
        "              \"AND name = 'security_log'\").result_rows[0][0]\n"
        "out['_security_log_engine'] = [ttl]\n"
        "out['_mutations'] = [str(r[0]) for r in c.query(\n"
        "    \"SELECT command FROM system.mutations WHERE database = 'onetoken'\").result_rows]\n"
        "print(json.dumps(out))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(data_dir), json.dumps(needles)],
        capture_output=True, text=True, timeout=180, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def _wait_erased(data_dir: Path, account_id: str) -> None:
    """Until the erasure worker has finished the account's ClickHouse part."""
    with contextlib.closing(sqlite3.connect(f"file:{data_dir / 'control.db'}?mode=ro",
                                            uri=True)) as db:
        wait_until(
            lambda: db.execute("SELECT state FROM account_erasures WHERE account_id = ?",
                               (account_id,)).fetchone() == ("done",),
            WAIT_S,
            0.1,
            message="the erasure completed",
        )


def _events_about(admin: Admin, account_id: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for field in ("actor_id", "subject_id"):
        page = admin.get("/api/v1/security/events", params={field: account_id, "limit": 1000})
        out += page["data"]
    return out


def test_cancellation_leaves_no_personal_data(env: dict[str, Any]) -> None:
    server, admin, data_dir = env["server"], env["admin"], env["data_dir"]
    tag = secrets.token_hex(4)
    email = f"erin.{tag}@example.test"
    mobile = f"+1555{int(tag, 16) % 10_000_000:07d}"
    name = f"Erin Uniquename{tag}"
    login = f"erin.{tag}"
    source = "127.0.77.7"
    agent = f"ErinAgent/{tag}"
    password = "erins own long password"
    created = admin.post("/api/v1/accounts", {
        "email": email, "mobile": mobile, "display_name": name, "login_name": login,
        "role": "developer", "password": password,
    })
    account_id = created["id"]
    erin = httpx.Client(base_url=server.control_url, timeout=30, headers={"user-agent": agent},
                        transport=httpx.HTTPTransport(local_address=source))
    r = erin.post("/api/v1/auth/login", json={"email": email, "password": password})
    assert r.status_code == 200, r.text
    erin.headers["Authorization"] = f"Bearer {r.json()['access_token']}"
    version = erin.get("/api/v1/me/terms").json()["version"]
    assert erin.post("/api/v1/me/terms/accept", json={"version": version}).status_code == 200
    assert erin.patch("/api/v1/me", json={"display_name": name + " X"}).status_code == 200
    assert erin.patch("/api/v1/me", json={"display_name": name}).status_code == 200
    key = erin.post("/api/v1/keys", json={"name": "erin key"}).json()
    ids = set()
    with client_from(server, source) as c:
        c.headers["user-agent"] = agent
        for _ in range(3):
            resp = chat(c, key["key"])
            assert resp.status_code == 200
            ids.add(resp.headers["x-request-id"])
    rows = wait_for_calls(admin, ids)
    assert {r["source_ip"] for r in rows} == {source}
    # Before: the security log holds the address, the User-Agent and the name.
    before = _events_about(admin, account_id)
    assert any(e["source_ip"] == source and e["user_agent"] == agent for e in before)
    assert any(name in json.dumps(e["detail"]) for e in before)

    # Export: JSON with call statistics, and CSV.
    doc = erin.get("/api/v1/me/export").json()
    assert doc["account"]["email"] == email and doc["account"]["mobile"] == mobile
    assert sum(s["calls"] for s in doc["call_statistics"]) == 3
    assert any(e["kind"] == "auth.login" for e in doc["security_events"])
    csv_calls = erin.get("/api/v1/me/export", params={"format": "csv", "part": "calls"})
    assert csv_calls.text.splitlines()[0].startswith("day,model,calls")
    assert ",demo-chat,3," in csv_calls.text

    r = erin.post("/api/v1/me/cancel", json={"password": password})
    assert r.status_code == 200, r.text
    # The control DB at once; ClickHouse queued for the erasure worker.
    assert r.json()["state"] == "control_done" and r.json()["keys_revoked"] == 1
    assert erin.get("/api/v1/me").status_code == 401
    erin.close()
    keys = {k["id"]: k for k in admin.get("/api/v1/keys")["data"]}
    assert keys[key["id"]]["status"] == "revoked"
    _wait_erased(data_dir, account_id)

    # Ids stay (pseudonymous): the account's call records are still there for billing.
    rows_after = wait_for_calls(admin, ids)
    assert {r["source_ip"] for r in rows_after} == {""}
    assert {r["user_agent"] for r in rows_after} == {""}
    assert {r["account_id"] for r in rows_after} == {account_id}

    after = _events_about(admin, account_id)
    assert len(after) >= len(before)
    assert not any(e["source_ip"] == source or e["user_agent"] == agent for e in after)
    assert not any(name in json.dumps(e["detail"]) for e in after)

    assert server.stop() == 0
    needles = [email, mobile, name, login, source, agent]
    found = _scan_clickhouse(data_dir, needles)
    # The mutations ClickHouse keeps name none of the erased values.
    commands = found.pop("_mutations")
    assert commands and not [c for c in commands for n in needles if n in c], commands
    # Retention: login records have their own period in the TTL rule (docs/retention.md).
    engine = found.pop("_security_log_engine")[0]
    assert "toIntervalDay(if(startsWith(kind, 'auth.'), 180, " in engine
    assert found == {n: [] for n in needles}, found
    # Every file of the data dir: the SQLite control DB and its WAL, spool, logs, and
    # chDB's parts (the parts the mutations replaced are gone too).
    for needle in needles:
        report = AuditReport()
        scan_tree(data_dir, needle_variants(needle), report)
        assert report.findings == [], (needle, report.findings)
    code, lines = reconcile(data_dir)
    assert code == 0, lines
