"""Engine.set_control_status through the extension: /healthz and /metrics say whether the
control plane is reachable while the engine keeps serving its last good snapshot (the
behaviour itself is specified in rust/gateway/tests/gateway_spec.rs)."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

from onetoken import _core

CONTRACT = Path(__file__).resolve().parents[1] / "contract"


def _healthz(address: str) -> dict[str, object]:
    with urllib.request.urlopen(f"http://{address}/healthz", timeout=5) as resp:
        assert resp.status == 200
        body: dict[str, object] = json.loads(resp.read())
        return body


def test_control_status_reaches_healthz_and_metrics(tmp_path: Path) -> None:
    cfg = json.loads((CONTRACT / "engine_config.json").read_text())
    cfg["spool_dir"] = str(tmp_path / "spool")
    engine = _core.Engine(json.dumps(cfg).encode())
    address = engine.start()
    try:
        engine.load_snapshot((CONTRACT / "snapshot.json").read_bytes())
        health = _healthz(address)
        assert health["control"] == "ok"
        assert health["snapshot_version"] == 1
        assert isinstance(health["snapshot_age_seconds"], float)
        assert "onetoken_control_reachable 1" in engine.metrics_text()

        engine.set_control_status(False)
        assert _healthz(address)["control"] == "unreachable"
        assert "onetoken_control_reachable 0" in engine.metrics_text()
        assert "onetoken_snapshot_age_seconds " in engine.metrics_text()
        engine.set_control_status(True)
        assert _healthz(address)["control"] == "ok"
    finally:
        engine.stop(1.0)
