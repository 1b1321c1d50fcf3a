"""Reading what the server recorded, through its control API (the embedded ClickHouse
belongs to the server process while it runs)."""

from __future__ import annotations

import time
from typing import Any

from .harness import Admin

PIPELINE_TIMEOUT_S = 30.0


def all_calls(admin: Admin) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = admin.get("/api/v1/calls", params={"limit": 100000})["data"]
    return rows


def wait_for_calls(admin: Admin, request_ids: set[str]) -> list[dict[str, Any]]:
    """The call_log rows of these requests, once the pipeline has landed all of them."""
    deadline = time.monotonic() + PIPELINE_TIMEOUT_S
    while True:
        rows = [r for r in all_calls(admin) if r["request_id"] in request_ids]
        if {r["request_id"] for r in rows} >= request_ids or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    missing = request_ids - {r["request_id"] for r in rows}
    assert not missing, f"no call_log row for {sorted(missing)}"
    return rows


def ledger_usage_units(admin: Admin) -> int:
    """Sum of usage charges in the ledger, as positive nano-units."""
    entries = admin.get("/api/v1/billing/ledger", params={"limit": 100000, "kind": "usage"})["data"]
    return -sum(int(e["amount_units"]) for e in entries)
