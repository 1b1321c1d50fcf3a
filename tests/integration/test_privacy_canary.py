"""Privacy invariant 6: a unique string pushed through every success and failure path is
found nowhere afterwards: not under the data dir, not in any log, not in ClickHouse, not
in an error returned to the client. `onetoken audit-retention` must agree."""

from __future__ import annotations

import base64
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from .harness import Admin, Server, bootstrap, cli
from .records import exported_calls, reconcile

CANARY = f"CANARY-{uuid.uuid4().hex}"


def chat(prompt: str, **extra: Any) -> dict[str, Any]:
    return {"model": "demo-chat", "messages": [{"role": "user", "content": prompt}], **extra}


@pytest.fixture(scope="module")
def canary_run(tmp_path_factory: pytest.TempPathFactory, mock_addr: str) -> dict[str, Any]:
    """Drive every path once with the canary, then stop the server cleanly."""
    data_dir: Path = tmp_path_factory.mktemp("canary")
    creds = bootstrap(data_dir)
    server = Server(data_dir=data_dir, upstream=mock_addr)
    server.start()
    key = creds["api_key"]
    auth = {"Authorization": f"Bearer {key}"}
    gw = httpx.Client(base_url=server.gateway_url, timeout=30)
    admin = Admin(server, creds["admin_email"], creds["admin_password"])
    seen: dict[str, httpx.Response] = {}

    def call(name: str, method: str, path: str, **kw: Any) -> httpx.Response:
        r = gw.request(method, path, **kw)
        assert CANARY not in r.text, f"{name}: the response echoed request content"
        seen[name] = r
        return r

    echo = {"mock": {"echo": True, "chunks": 3}}
    call("ok", "POST", "/v1/chat/completions", headers=auth, json=chat(CANARY))
    r = gw.post("/v1/chat/completions", headers=auth, json=chat(CANARY, **echo))
    assert r.status_code == 200 and CANARY in r.text  # the client does get its own answer
    seen["ok_echo"] = r
    with gw.stream(
        "POST", "/v1/chat/completions", headers=auth, json=chat(CANARY, stream=True, **echo)
    ) as s:
        body = s.read()
        assert CANARY.encode() in body
        seen["stream_echo"] = s
    call(
        "embeddings",
        "POST",
        "/v1/embeddings",
        headers=auth,
        json={"model": "demo-embed", "input": [CANARY, CANARY]},
    )
    # The unit-priced interfaces: the upstream's answers carry the canary back (the revised
    # prompt, the reranked documents), and the image's bytes are a second needle.
    r = gw.post(
        "/v1/images/generations",
        headers=auth,
        json={"model": "demo-image", "prompt": CANARY, "n": 2, "mock": {"echo": True}},
    )
    assert r.status_code == 200 and CANARY in r.text
    seen["image_echo"] = r
    call(
        "image_500",
        "POST",
        "/v1/images/generations",
        headers=auth,
        json={"model": "demo-image", "prompt": CANARY, "mock": {"status": 500, "echo": True}},
    )
    call(
        "moderation",
        "POST",
        "/v1/moderations",
        headers=auth,
        json={"model": "demo-moderation", "input": [CANARY, CANARY]},
    )
    r = gw.post(
        "/v1/rerank",
        headers=auth,
        json={"model": "demo-rerank", "query": CANARY, "documents": [CANARY, "other"],
              "return_documents": True},
    )
    assert r.status_code == 200 and CANARY in r.text
    seen["rerank_echo"] = r
    call(
        "speech",
        "POST",
        "/v1/audio/speech",
        headers=auth,
        json={"model": "demo-tts", "voice": "alloy", "input": CANARY},
    )
    call(
        "rerank_bad",
        "POST",
        "/v1/rerank",
        headers=auth,
        json={"model": "demo-rerank", "query": CANARY, "documents": CANARY},
    )
    call(
        "bad_json",
        "POST",
        "/v1/chat/completions",
        headers=auth,
        content=b'{"model": "demo-chat", "messages": [' + CANARY.encode(),
    )
    call("not_object", "POST", "/v1/chat/completions", headers=auth, json=[CANARY])
    call(
        "unauthorized",
        "POST",
        "/v1/chat/completions",
        headers={"Authorization": f"Bearer ot-{CANARY}"},
        json=chat(CANARY),
    )
    call(
        "unknown_model",
        "POST",
        "/v1/chat/completions",
        headers=auth,
        json={"model": CANARY, "messages": [{"role": "user", "content": CANARY}]},
    )
    call("too_large", "POST", "/v1/chat/completions", headers=auth, json=chat(CANARY * 400_000))
    call("unknown_path", "POST", f"/v1/{CANARY}", headers=auth, json=chat(CANARY))
    # Admission refusals: the request names the parameter, never its content.
    call(
        "no_messages",
        "POST",
        "/v1/chat/completions",
        headers=auth,
        json={"model": "demo-chat", "prompt": CANARY, "user": CANARY},
    )
    call(
        "bad_max_tokens",
        "POST",
        "/v1/chat/completions",
        headers=auth,
        json={**chat(CANARY), "max_tokens": -1},
    )
    # A request that already went through a gateway: refused as a loop.
    call(
        "loop",
        "POST",
        "/v1/chat/completions",
        headers={**auth, "x-onetoken-hop": "1"},
        json=chat(CANARY),
    )
    call(
        "upstream_500",
        "POST",
        "/v1/chat/completions",
        headers=auth,
        json=chat(CANARY, mock={"status": 500, "echo": True}),
    )

    def echoed_stream(**mock: int) -> Any:
        body = chat(CANARY, stream=True, mock={"echo": True, **mock})
        return gw.stream("POST", "/v1/chat/completions", headers=auth, json=body)

    with echoed_stream(chunks=10, cut_after=2) as s:
        s.read()
        seen["stream_cut"] = s
    with echoed_stream(chunks=200, delay_ms=20) as s:
        it = s.iter_bytes()
        next(it)  # the first bytes arrived; now the client walks away mid-stream
        seen["client_gone"] = s
    # 402: a model priced far above the org's balance.
    admin.post("/api/v1/models", pricey_model(admin))
    call(
        "no_balance",
        "POST",
        "/v1/chat/completions",
        headers=auth,
        json={**chat(CANARY), "model": "pricey"},
    )

    # Control plane: what someone types at sign-in, as a password or a one-time code is
    # never kept, not even in the security log of the failures it causes.
    ctl = httpx.Client(base_url=server.control_url, timeout=30)
    for body in (
        {"login": CANARY, "password": CANARY},
        {"login": creds["admin_email"], "password": CANARY},
        {"login": creds["admin_email"], "password": CANARY, "totp_code": "123456"},
    ):
        r = ctl.post("/api/v1/auth/login", json=body, headers={"User-Agent": "canary-check"})
        assert r.status_code == 401 and CANARY not in r.text
    for path, body in (
        ("/api/v1/accounts", {"role": "viewer", "login_name": "canary-member",
                              "password": CANARY}),
        ("/api/v1/me/password", {"current_password": CANARY, "new_password": CANARY}),
        ("/api/v1/auth/accept-invite", {"token": CANARY, "password": CANARY}),
    ):
        r = admin.http.post(path, json=body)
        assert r.status_code < 500 and CANARY not in r.text, path

    code = server.stop()  # a clean stop drains and flushes every record
    request_ids = {r.headers["x-request-id"] for r in seen.values()}
    rows = exported_calls(data_dir)
    return {
        "data_dir": data_dir,
        "seen": seen,
        "exit_code": code,
        "request_ids": request_ids,
        "rows": rows,
        "reconcile": reconcile(data_dir),
    }


def pricey_model(admin: Admin) -> dict[str, Any]:
    demo = next(p for p in admin.get("/api/v1/providers")["data"] if p["name"] == "demo")
    return {
        "name": "pricey",
        "kind": "chat",
        "provider_id": demo["id"],
        "upstream_model": "mock-gpt",
        "input_price": "1000000",
        "output_price": "1000000",
        "max_output_tokens": 4096,
    }


def test_every_path_got_its_status(canary_run: dict[str, Any]) -> None:
    status = {name: r.status_code for name, r in canary_run["seen"].items()}
    assert status == {
        "ok": 200,
        "ok_echo": 200,
        "stream_echo": 200,
        "embeddings": 200,
        "image_echo": 200,
        "image_500": 500,
        "moderation": 200,
        "rerank_echo": 200,
        "rerank_bad": 400,
        "speech": 200,
        "bad_json": 400,
        "not_object": 400,
        "unauthorized": 401,
        "unknown_model": 404,
        "too_large": 413,
        "unknown_path": 404,
        "no_messages": 400,
        "bad_max_tokens": 400,
        "loop": 508,
        "upstream_500": 500,
        "stream_cut": 200,
        "client_gone": 200,
        "no_balance": 402,
    }


def test_each_failure_left_exactly_one_metadata_record(canary_run: dict[str, Any]) -> None:
    by_id = {r["request_id"]: r for r in canary_run["rows"]}
    assert len(by_id) == len(canary_run["rows"]), "a request was recorded twice"
    # Plus the admin API's own model creation: no other gateway traffic happened.
    assert set(by_id) == canary_run["request_ids"]
    codes = {
        name: by_id[r.headers["x-request-id"]]["error_code"]
        for name, r in canary_run["seen"].items()
    }
    assert codes["ok"] == "" and codes["bad_json"] == "invalid_json"
    assert (
        codes["unauthorized"] == "invalid_api_key" and codes["unknown_model"] == "model_not_found"
    )
    assert codes["too_large"] == "body_too_large" and codes["no_balance"] == "insufficient_balance"
    assert (
        codes["upstream_500"] == "upstream_error" and codes["stream_cut"] == "upstream_stream_cut"
    )
    assert codes["client_gone"] == "client_disconnected"
    assert codes["no_messages"] == codes["bad_max_tokens"] == "invalid_request"
    assert codes["loop"] == "loop_detected"
    assert codes["image_500"] == "upstream_error" and codes["rerank_bad"] == "invalid_request"
    image = by_id[canary_run["seen"]["image_echo"].headers["x-request-id"]]
    rerank = by_id[canary_run["seen"]["rerank_echo"].headers["x-request-id"]]
    assert (image["images"], rerank["search_units"]) == (2, 1)
    speech = by_id[canary_run["seen"]["speech"].headers["x-request-id"]]
    assert image["cost"] > 0 and rerank["cost"] > 0
    assert speech["characters"] == len(CANARY) and speech["cost"] > 0
    gone = by_id[canary_run["seen"]["client_gone"].headers["x-request-id"]]
    assert gone["status"] == 499 and gone["usage_source"] == "estimated" and gone["cost"] > 0
    failed_early = [
        by_id[canary_run["seen"][n].headers["x-request-id"]]
        for n in (
            "bad_json",
            "unauthorized",
            "unknown_model",
            "too_large",
            "no_messages",
            "bad_max_tokens",
            "loop",
            "upstream_500",
            "no_balance",
            "image_500",
            "rerank_bad",
        )
    ]
    assert all(r["cost"] == 0 for r in failed_early), (
        "a failure before the first upstream byte was charged"
    )


def test_server_stopped_cleanly(canary_run: dict[str, Any]) -> None:
    assert canary_run["exit_code"] == 0


def test_ledger_equals_call_log(canary_run: dict[str, Any]) -> None:
    code, lines = canary_run["reconcile"]
    total = sum(int(r["cost"]) for r in canary_run["rows"])
    assert total > 0
    # One line per org and UTC day (a run may cross midnight), each exact.
    assert code == 0 and all(x["difference"] == 0 for x in lines), lines
    assert sum(x["ledger_usage"] for x in lines) == sum(x["call_log_cost"] for x in lines) == total


def test_canary_is_in_no_persisted_byte(canary_run: dict[str, Any]) -> None:
    needle = CANARY.encode()
    # The generated image as the upstream sent it, and its decoded bytes.
    b64 = canary_run["seen"]["image_echo"].json()["data"][0]["b64_json"]
    image = base64.b64decode(b64)[8:]  # past the PNG signature every image shares
    audio = canary_run["seen"]["speech"].content[5:]  # past the MP3 tag every answer shares
    files = [p for p in Path(canary_run["data_dir"]).rglob("*") if p.is_file()]
    # What the scan must cover: the control DB, the embedded ClickHouse, journal, logs.
    assert {"control.db", "onetoken.log"} <= {p.name for p in files}, files
    assert any("clickhouse" in p.parts for p in files)
    found = [
        str(p)
        for p in files
        for data in [p.read_bytes()]
        if needle in data or b64.encode() in data or image in data or audio in data
    ]
    assert found == []


def test_audit_retention_agrees_and_can_find(canary_run: dict[str, Any]) -> None:
    data_dir = canary_run["data_dir"]
    clean = cli(data_dir, "audit-retention", "--needle", CANARY, check=False)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    # Positive controls: the scanner must see what is really there, in ClickHouse and on disk.
    some_request = canary_run["rows"][0]["request_id"]
    found = cli(data_dir, "audit-retention", "--needle", some_request, check=False)
    assert found.returncode == 1, found.stdout + found.stderr
    planted = f"PLANTED-{uuid.uuid4().hex}"
    (Path(data_dir) / "logs" / "planted.txt").write_text(f"x {planted} y")
    found = cli(data_dir, "audit-retention", "--needle", planted, check=False)
    assert found.returncode == 1
