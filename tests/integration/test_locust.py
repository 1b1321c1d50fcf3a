"""The locust bench as an SRE runs it (`make locust`'s entry point, bench/loadtest.py),
for ten seconds against a real server with the fake provider: tenants made through the
control API, the traffic mix with its bad requests, and the reports checked here again
from the outside: locust's CSV, the HTML report, and each tenant org's stored calls read
through the CLI (`onetoken calls export`), not through the bench's own summary."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from .records import exported_calls

ROOT = Path(__file__).resolve().parents[2]
USERS = 5
TENANTS = 3


def test_locust_smoke_run_stores_every_answered_call(
    deployment: dict[str, Any], tmp_path: Path
) -> None:
    server, creds = deployment["server"], deployment["creds"]
    out = tmp_path / "locust"
    env = {
        **os.environ,
        "ONETOKEN_ADMIN_LOGIN": creds["admin_email"],
        "ONETOKEN_ADMIN_PASSWORD": creds["admin_password"],
    }
    env.pop("ONETOKEN_API_KEYS", None)
    proc = subprocess.run(
        [
            sys.executable, "bench/loadtest.py",
            "--host", server.gateway_url, "--control-url", server.control_url,
            "--users", str(USERS), "--duration", "10s", "--tenants", str(TENANTS),
            # Short waits so a few users make a few hundred requests; every third response
            # of each kind is checked against the OpenAI SDK's types.
            "--wait", "0.01,0.05", "--validate-every", "3",
            "--out", str(out),
        ],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=150,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    with (out / "locust_stats.csv").open(newline="") as f:
        stats = {(r["Type"], r["Name"]): r for r in csv.DictReader(f)}
    assert {name: r["Failure Count"] for name, r in stats.items()} == {
        name: "0" for name in stats
    }
    requests = sum(int(r["Request Count"]) for (kind, _), r in stats.items()
                   if kind in ("GET", "POST"))
    assert requests >= 300, requests
    # The bad requests ran and were judged by their documented answers (no failures above).
    for name in ("expected 400: malformed JSON", "expected 404: unknown model"):
        assert int(stats[("POST", name)]["Request Count"]) > 0, name
    streams = int(stats[("POST", "chat stream")]["Request Count"])
    assert int(stats[("TTFT", "chat stream")]["Request Count"]) == streams > 0
    assert int(stats[("STREAM", "chat stream")]["Request Count"]) == streams
    # The mock sends several content chunks per stream: several gaps each.
    assert int(stats[("GAP", "chat stream")]["Request Count"]) >= 2 * streams
    html = (out / "report.html").read_text()
    assert "<html" in html.lower() and "chat stream" in html

    summary = json.loads((out / "summary.json").read_text())
    assert summary["problems"] == []
    counts = json.loads((out / "counts.json").read_text())
    assert counts["invalid"] == {} and sum(counts["validated"].values()) > 0
    assert counts["unknown_key_blocked"] == 0
    assert len(summary["tenants"]) == TENANTS
    # Each tenant org stored a record for every request its key got an answer for (and
    # for the bench's readiness probe), and none that its key did not send.
    per_org = Counter(row["org_id"] for row in exported_calls(deployment["data_dir"]))
    for i, tenant in enumerate(summary["tenants"]):
        answered, sent = counts["answered_per_key"][i], counts["sent_per_key"][i]
        assert answered > 0, tenant
        assert answered + 1 <= per_org[tenant["org_id"]] <= sent + 1, (tenant, per_org)
