"""Reading what a deployment recorded: through the control API, or through the CLI (which
asks the running control process while the server holds the embedded ClickHouse)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.support import wait_until

from .harness import Admin, cli

PIPELINE_TIMEOUT_S = 30.0


def org_calls(admin: Admin) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 1000}
        if cursor:
            params["cursor"] = cursor
        page = admin.get("/api/v1/calls", params=params)
        rows += page["data"]
        cursor = page["next_cursor"]
        if not cursor:
            return rows


def wait_for_calls(admin: Admin, request_ids: set[str]) -> list[dict[str, Any]]:
    """The org's call_log rows of these requests, once the pipeline has landed all of them."""

    def landed() -> list[dict[str, Any]] | None:
        rows = [r for r in org_calls(admin) if r["request_id"] in request_ids]
        return rows if {r["request_id"] for r in rows} >= request_ids else None

    rows: list[dict[str, Any]] = wait_until(
        landed, PIPELINE_TIMEOUT_S, message=lambda: f"call_log rows for {sorted(request_ids)}"
    )
    return rows


def exported_calls(data_dir: Path) -> list[dict[str, Any]]:
    """Every call_log row of a deployment (`onetoken calls export`)."""
    out = cli(data_dir, "calls", "export").stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def reconcile(data_dir: Path) -> tuple[int, list[dict[str, Any]]]:
    """`onetoken billing reconcile --json` of a deployment: (exit code, lines)."""
    proc = cli(data_dir, "billing", "reconcile", "--json", check=False)
    assert proc.returncode in (0, 1), proc.stderr
    return proc.returncode, json.loads(proc.stdout)
