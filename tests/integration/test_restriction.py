"""Restriction of processing (policy XIII.4), end to end on a real server: with it on, the
client's address and User-Agent (planted through a trusted proxy's X-Forwarded-For and the
User-Agent header) are in no persisted byte (journal, chDB call_log and security_log,
control DB, logs) nor in /metrics, while the detectors keyed on the address still fire on
its token; with it off they are recorded as before. The engine serves the change within a
second of the API call that makes it, measured."""

from __future__ import annotations

import secrets
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import wait_until

from .harness import Admin, deployed
from .records import exported_calls

MAX_TAKE_EFFECT_S = 1.0


def _address() -> str:
    # 198.18.0.0/15 (benchmarking): never a real client, and random per run so the scans
    # cannot match anything but this test's plants.
    octets = (18 + secrets.randbelow(2), 1 + secrets.randbelow(254), 1 + secrets.randbelow(254))
    return "198.{}.{}.{}".format(*octets)


CLEAR_IP, RESTRICTED_IP, FLOOD_IP = _address(), _address(), _address()
while len({CLEAR_IP, RESTRICTED_IP, FLOOD_IP}) < 3:
    RESTRICTED_IP, FLOOD_IP = _address(), _address()
CLEAR_UA_MARK = f"clear-ua-{uuid.uuid4().hex}"
RESTRICTED_UA_MARK = f"restricted-ua-{uuid.uuid4().hex}"
# What the client software calls itself is kept when restricted; the rest is the plant.
CLEAR_UA = f"OpenAI/Python 1.54.0 ({CLEAR_UA_MARK})"
RESTRICTED_UA = f"OpenAI/Python 1.54.0 ({RESTRICTED_UA_MARK})"
CHAT = {"model": "demo-chat", "messages": [{"role": "user", "content": "hi"}]}


def _from(ip: str, ua: str, key: str | None = None) -> dict[str, str]:
    headers = {"X-Forwarded-For": ip, "User-Agent": ua}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    return headers


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, mock_addr: str) -> dict[str, Any]:
    data_dir: Path = tmp_path_factory.mktemp("restrict")
    env = {
        "ONETOKEN_TRUSTED_PROXIES": "127.0.0.1/32",
        "ONETOKEN_GATEWAY_TRUSTED_PROXIES": "127.0.0.1/32",
        "ONETOKEN_LOGIN_MAX_FAILURES_IP": "3",
        "ONETOKEN_LOGIN_MAX_FAILURES_ACCOUNT": "1000",
    }
    with deployed(data_dir, mock_addr, env) as d:
        server, creds = d["server"], d["creds"]
        admin = Admin(server, creds["admin_email"], creds["admin_password"])
        key = creds["api_key"]
        gw = httpx.Client(base_url=server.gateway_url, timeout=30)
        out: dict[str, Any] = {"data_dir": data_dir}

        r = gw.post("/v1/chat/completions", json=CHAT, headers=_from(CLEAR_IP, CLEAR_UA, key))
        assert r.status_code == 200, r.text
        out["clear_id"] = r.headers["x-request-id"]

        # A key only good from elsewhere: its use from the restricted address is a key risk.
        fenced = admin.post("/api/v1/keys", {"name": "fenced", "allowed_ips": ["10.9.0.0/16"]})

        # Restrict the account; the first call made once the API answered is restricted.
        t0 = time.monotonic()
        r = admin.http.put("/api/v1/me/restriction", json={"mode": "restricted"},
                           headers={"User-Agent": RESTRICTED_UA, "X-Forwarded-For": RESTRICTED_IP})
        assert r.status_code == 200, r.text
        r = gw.post("/v1/chat/completions", json=CHAT,
                    headers=_from(RESTRICTED_IP, RESTRICTED_UA, key))
        out["take_effect_s"] = time.monotonic() - t0
        assert r.status_code == 200, r.text
        out["first_restricted_id"] = r.headers["x-request-id"]
        out["restricted_ids"] = {out["first_restricted_id"]}
        refused = [
            gw.post("/v1/chat/completions", json=CHAT,
                    headers=_from(RESTRICTED_IP, RESTRICTED_UA, fenced["key"]))
            for _ in range(2)
        ]
        for r in refused:
            assert r.status_code == 403, r.text
            out["restricted_ids"].add(r.headers["x-request-id"])
        # The journal, before ingestion may have consumed it (the record is journaled
        # before the response's end reaches the client).
        out["journal_hits"] = [
            str(p) for p in (data_dir / "spool").rglob("*") if p.is_file()
            and any(n.encode() in p.read_bytes() for n in (RESTRICTED_IP, RESTRICTED_UA_MARK))
        ]
        out["journal_files"] = sum(1 for p in (data_dir / "spool").rglob("*") if p.is_file())

        # The control API: a sign-in, then a flood of failures from one address.
        ctl = httpx.Client(base_url=server.control_url, timeout=30)
        login = {"email": creds["admin_email"], "password": creds["admin_password"]}
        r = ctl.post("/api/v1/auth/login", json=login,
                     headers=_from(RESTRICTED_IP, RESTRICTED_UA))
        assert r.status_code == 200, r.text
        flood = [
            ctl.post("/api/v1/auth/login", json={**login, "password": "not the password"},
                     headers=_from(FLOOD_IP, RESTRICTED_UA)).status_code
            for _ in range(5)
        ]
        out["flood"] = flood

        def events() -> list[dict[str, Any]] | None:
            rows = admin.get("/api/v1/security/events", params={"limit": 1000})["data"]
            kinds = {e["kind"] for e in rows}
            wanted = {"key.ip_not_allowed", "auth.login", "account.restriction_changed",
                      "auth.lockout"}
            seen["kinds"] = kinds
            return rows if wanted <= kinds else None

        seen: dict[str, set[str]] = {}
        out["events"] = wait_until(
            events, 30, 0.2,
            message=lambda: f"security events ({seen}, {[r.json() for r in refused]})")
        out["metrics"] = httpx.get(server.metrics_url, timeout=10).text + httpx.get(
            f"{server.control_url}/metrics", timeout=10).text

        # Lifted: recorded as before again.
        r = admin.http.put("/api/v1/me/restriction", json={"mode": "clear"})
        assert r.json() == {"mode": "clear", "effective": "clear"}
        r = gw.post("/v1/chat/completions", json=CHAT, headers=_from(CLEAR_IP, CLEAR_UA, key))
        out["lifted_id"] = r.headers["x-request-id"]
        ids = {out["clear_id"], out["lifted_id"], *out["restricted_ids"]}

        def landed() -> dict[str, dict[str, Any]] | None:
            rows = {c["request_id"]: c for c in exported_calls(data_dir)}
            return rows if ids <= set(rows) else None

        out["calls"] = wait_until(landed, 30, 0.3, message="call_log rows")
        out["exit_code"] = server.stop()
    return out


def test_the_engine_honours_the_change_within_a_second(run: dict[str, Any]) -> None:
    first = run["calls"][run["first_restricted_id"]]
    assert first["source_ip"].startswith("hmac:") and first["user_agent"] == "OpenAI"
    print(f"restriction took effect {run['take_effect_s'] * 1000:.0f} ms after the API call")
    assert run["take_effect_s"] < MAX_TAKE_EFFECT_S


def test_clear_before_and_after_restricted_between(run: dict[str, Any]) -> None:
    calls = run["calls"]
    for request_id in (run["clear_id"], run["lifted_id"]):
        assert (calls[request_id]["source_ip"], calls[request_id]["user_agent"]) == (
            CLEAR_IP, CLEAR_UA)
    tokens = {calls[i]["source_ip"] for i in run["restricted_ids"]}
    assert len(tokens) == 1 and tokens.pop().startswith("hmac:")
    assert {calls[i]["user_agent"] for i in run["restricted_ids"]} == {"OpenAI"}


def test_detectors_still_fire_on_the_token(run: dict[str, Any]) -> None:
    token = run["calls"][run["first_restricted_id"]]["source_ip"]
    events = run["events"]
    risks = [e for e in events if e["kind"] == "key.ip_not_allowed"]
    assert risks and all(e["source_ip"] == token for e in risks), risks
    assert all(e["user_agent"] == "OpenAI" for e in risks)
    # The control plane makes the engine's token: one address, one source in both logs.
    logins = [e for e in events if e["kind"] == "auth.login" and e["source_ip"] == token]
    assert logins and all(e["user_agent"] == "OpenAI" for e in logins)
    # The flood from one address against the restricted account: locked out and alarmed
    # on the address's token.
    assert run["flood"][:3] == [401, 401, 401] and 429 in run["flood"][3:], run["flood"]
    flooded = [e for e in events if e["kind"] == "auth.lockout"
               and e["detail"].get("scope") == "ip"]
    assert flooded, [e["kind"] for e in events]
    assert all(e["source_ip"].startswith("hmac:") and e["source_ip"] != token
               for e in flooded), flooded
    changed = [e for e in events if e["kind"] == "account.restriction_changed"]
    assert changed and all(e["source_ip"] == token for e in changed)


def test_planted_values_are_in_no_persisted_byte(run: dict[str, Any]) -> None:
    assert run["exit_code"] == 0
    assert run["journal_files"] > 0 and run["journal_hits"] == []
    files = [p for p in Path(run["data_dir"]).rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert "control.db" in names and any("clickhouse" in p.parts for p in files)
    for needle in (RESTRICTED_IP, FLOOD_IP, RESTRICTED_UA_MARK):
        assert needle not in run["metrics"]
        found = [str(p) for p in files if needle.encode() in p.read_bytes()]
        assert found == [], (needle, found)
    # Positive control: the clear phase's values are stored as they always were.
    clear = [str(p) for p in files if CLEAR_UA_MARK.encode() in p.read_bytes()]
    assert clear, "the scan finds what is really stored"
