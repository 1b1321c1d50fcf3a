#!/usr/bin/env python3
"""Tenants for a load test: N orgs, each with an owner, some money and one API key, made
through the control API with the platform operator's credentials.

    ONETOKEN_ADMIN_LOGIN=admin@onetoken.local ONETOKEN_ADMIN_PASSWORD=... \\
        python bench/tenants.py --control-url http://127.0.0.1:8081 --count 4

prints `ONETOKEN_API_KEYS=key1,key2,...` for bench/locustfile.py, so its users spread the
load over the orgs (each org has its own limits, balance and records). bench/loadtest.py
(`make locust`) uses the same functions, counts each org's stored calls after the run and
revokes the keys at the end.

Every run makes new orgs (named `<prefix>-<n>`, the prefix unique per run): a sign-in name
is used once across the installation, and an owner's password is not kept anywhere. The
keys are revoked by bench/loadtest.py when it ends; those printed here stay valid until
revoked in the console or the control API.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import secrets
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import httpx

# A grant per org, in currency units: far above what a load test spends on the demo models
# (about 1e-4 units a call), so no request is refused for money.
DEFAULT_CREDIT = "1000"


class TenantError(Exception):
    """A control API call failed; the message says which and how."""


@dataclass
class Tenant:
    org_id: str
    name: str
    key_id: str
    # Shown once by the control API; held in memory only.
    key: str
    owner_token: str


class Control:
    """The control API (`/api/v1`) with a bearer token per call."""

    def __init__(self, url: str, timeout: float = 30) -> None:
        self.http = httpx.Client(base_url=url.rstrip("/") + "/api/v1", timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def call(
        self, method: str, path: str, token: str = "", body: dict[str, Any] | None = None,
        params: dict[str, str] | None = None,
    ) -> Any:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            r = self.http.request(method, path, json=body, headers=headers, params=params)
        except httpx.HTTPError as exc:
            raise TenantError(f"control API {method} {path}: {type(exc).__name__}") from None
        if r.status_code >= 400:
            try:
                message = r.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = r.text[:200]
            raise TenantError(f"control API {method} {path}: {r.status_code} {message}")
        return r.json() if r.content else {}

    def login(self, login: str, password: str) -> str:
        """A session token with the current terms of service accepted, or every other call
        answers 403 `terms_not_accepted` (docs/terms.md): the tenants are the load tool's
        own, and the operator who runs it accepts them as at a first console sign-in."""
        out = self.call("POST", "/auth/login", body={"login": login, "password": password})
        token = str(out["access_token"])
        terms = self.call("GET", "/me/terms", token)
        if terms["accepted_at"] is None:
            self.call("POST", "/me/terms/accept", token, {"version": terms["version"]})
        return token


def run_prefix() -> str:
    """Unique per run: the time and a few random characters."""
    return f"load-{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def create_tenants(
    control: Control,
    operator_token: str,
    count: int,
    prefix: str,
    credit: str = DEFAULT_CREDIT,
) -> list[Tenant]:
    """`count` orgs, each with an owner (a random password, used once to sign in), a grant
    of `credit` and one API key."""
    tenants = []
    for n in range(1, count + 1):
        name = f"{prefix}-{n}"
        password = secrets.token_urlsafe(18)
        owner = {
            "login_name": f"{name}-owner",
            "display_name": "load test",
            "role": "owner",
            "password": password,
        }
        org = control.call("POST", "/orgs", operator_token, {"name": name, "owner": owner})
        control.call(
            "POST",
            "/billing/credits",
            operator_token,
            {
                "org_id": org["id"],
                "amount": credit,
                "kind": "grant",
                "idempotency_key": f"{name}:credit",
                "memo": "load test",
            },
        )
        owner_token = control.login(owner["login_name"], password)
        key = control.call("POST", "/keys", owner_token, {"name": "load test"})
        tenants.append(Tenant(org["id"], name, key["id"], key["key"], owner_token))
    return tenants


def stored_calls(control: Control, tenant: Tenant) -> int:
    """Call records stored for the tenant's org (its owner's /billing/call-stats)."""
    out = control.call("GET", "/billing/call-stats", tenant.owner_token, params={"group_by": "key"})
    return sum(int(row["calls"]) for row in out["data"])


def revoke(control: Control, tenants: Iterable[Tenant]) -> None:
    for t in tenants:
        control.call("POST", f"/keys/{t.key_id}/revoke", t.owner_token)


def wait_served(gateway_url: str, tenants: list[Tenant], timeout: float = 30) -> list[int]:
    """Wait until the gateway knows every key (new keys reach it with the next snapshot).
    Returns, per tenant, the probes answered 200: each is a call record of its org."""
    answered = [0] * len(tenants)
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=gateway_url.rstrip("/"), timeout=10) as http:
        for i, t in enumerate(tenants):
            while True:
                try:
                    r = http.get("/v1/models", headers={"Authorization": f"Bearer {t.key}"})
                except httpx.HTTPError:
                    r = None
                if r is not None and r.status_code == 200:
                    answered[i] += 1
                    break
                if time.monotonic() > deadline:
                    status = r.status_code if r is not None else "no answer"
                    raise TenantError(f"the gateway does not take {t.name}'s key ({status})")
                # Each refusal is a 401 from this address: few, well below the flood bound.
                time.sleep(0.25)
    return answered


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--control-url", default=os.environ.get("ONETOKEN_CONTROL_URL"),
                        help="control API origin (or ONETOKEN_CONTROL_URL)")
    parser.add_argument("--count", type=int, default=4, help="orgs to create (default 4)")
    parser.add_argument("--prefix", default="", help="org name prefix (default: unique)")
    parser.add_argument("--credit", default=DEFAULT_CREDIT,
                        help=f"grant per org in currency units (default {DEFAULT_CREDIT})")
    args = parser.parse_args(argv)
    login = os.environ.get("ONETOKEN_ADMIN_LOGIN")
    password = os.environ.get("ONETOKEN_ADMIN_PASSWORD")
    if not (args.control_url and login and password):
        parser.error("needs --control-url and ONETOKEN_ADMIN_LOGIN/ONETOKEN_ADMIN_PASSWORD "
                     "(a platform operator: `onetoken bootstrap --json` prints the first)")
    control = Control(args.control_url)
    try:
        token = control.login(login, password)
        tenants = create_tenants(control, token, args.count, args.prefix or run_prefix(),
                                 args.credit)
    except TenantError as exc:
        print(f"tenants: {exc}", file=sys.stderr)
        return 1
    finally:
        control.close()
    for t in tenants:
        print(f"# {t.name}: org {t.org_id}, key {t.key_id}", file=sys.stderr)
    print("ONETOKEN_API_KEYS=" + ",".join(t.key for t in tenants))
    return 0


if __name__ == "__main__":
    sys.exit(main())
