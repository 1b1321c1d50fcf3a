"""Helpers for the routing/policy/limits suites: a catalog written as a providers file
(applied by the server at start, as an operator's GitOps pipeline would), a tiny upstream
that fails on purpose, and price arithmetic."""

from __future__ import annotations

import json
import socket
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

from .harness import Admin

NANO = 1_000_000_000


def write_providers_file(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def part(tokens: int, price_nano_per_m: int) -> int:
    """One part of a cost: ceil(tokens * price / 1e6) (docs/gateway-spec.md)."""
    return -(-tokens * price_nano_per_m // 1_000_000)


def expected_cost(
    prompt: int, completion: int, input_price: int, output_price: int, *, cached: int = 0,
    cached_price: int | None = None, request_price: int = 0,
) -> int:
    cached_price = input_price if cached_price is None else cached_price
    return (
        part(prompt - cached, input_price)
        + part(cached, cached_price)
        + part(completion, output_price)
        + request_price
    )


def new_key(admin: Admin, name: str, **body: Any) -> tuple[str, str]:
    """(key id, plaintext) of a fresh key of the admin's org."""
    r = admin.post("/api/v1/keys", {"name": name, **body})
    return r["id"], r["key"]


def put(admin: Admin, path: str, body: dict[str, Any]) -> Any:
    r = admin.http.put(path, json=body)
    assert r.status_code == 200, f"{path}: {r.status_code} {r.text}"
    return r.json()


def admin_org(admin: Admin) -> str:
    return str(admin.get("/api/v1/org")["id"])


class _FailingHandler(BaseHTTPRequestHandler):
    """The first path segment picks the failure: /s500/..., /s429/..., /cut/... ."""

    server: _FailingServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:  # keep test output quiet
        pass

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        self.rfile.read(length)  # read and drop: nothing is kept
        mode = self.path.strip("/").split("/", 1)[0]
        self.server.hits[mode] += 1
        if mode in ("s500", "s429", "s503"):
            status = int(mode[1:])
            body = json.dumps(
                {"error": {"message": "failing on purpose", "type": "server_error", "code": None}}
            ).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            if status == 429:
                self.send_header("retry-after", "1")
            self.end_headers()
            self.wfile.write(body)
            return
        if mode == "cut":
            # One real chunk reaches the gateway, then the connection dies.
            chunk = {
                "id": "chatcmpl-cut", "object": "chat.completion.chunk", "created": 0,
                "model": "cut", "choices": [
                    {"index": 0, "delta": {"role": "assistant", "content": "tok "},
                     "finish_reason": None}
                ],
            }
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.end_headers()
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        self.send_response(404)
        self.send_header("content-length", "0")
        self.end_headers()


class _FailingServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _FailingHandler)
        self.hits: Counter[str] = Counter()


@contextmanager
def failing_upstream() -> Iterator[_FailingServer]:
    srv = _FailingServer()
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


def failing_base(srv: _FailingServer, mode: str) -> str:
    host, port = srv.server_address[:2]
    return f"http://{host!s}:{port}/{mode}/v1"


def fresh_org(operator: Admin, server: Any, name: str) -> tuple[Admin, str, str]:
    """A new funded org (operator API), its owner signed in, and one API key:
    (owner, org id, key). Isolates tests whose gateway state is per org (rate limits)."""
    email = f"{name}@tenant.test"
    password = f"{name} long tenant password 0123456789"
    org = operator.post(
        "/api/v1/orgs",
        {"name": name, "owner": {"email": email, "password": password, "role": "owner"}},
    )
    owner = Admin(server, email, password)
    # Credits are the operator's to give, never the tenant's.
    operator.post(
        "/api/v1/billing/credits",
        {"amount": "100", "idempotency_key": f"seed-{name}", "org_id": org["id"]},
    )
    return owner, org["id"], new_key(owner, "k")[1]
