"""bench/analytics.py prints figures only after its own checks pass: a small run end to
end, and the same run with a rollup query that answers wrong."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "analytics.py"


@pytest.fixture(scope="module")
def analytics() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_analytics", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def small_run(analytics: ModuleType, root: Path) -> int:
    return int(analytics.main([
        "--rows", "20000", "--pass-rows", "10000", "--measure-at", "10000", "--chunk", "10000",
        "--runs", "1", "--settle", "5", "--no-write", "--data-root", str(root),
    ]))


def test_a_small_run_checks_itself_then_reports(
    analytics: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert small_run(analytics, tmp_path) == 0
    out = capsys.readouterr().out
    # The report is printed after each size, with every size so far.
    first, final = out.split("### 10,000 rows")[1], out.split("### 20,000 rows")[-1]
    assert "- the rollup's calls add up to the rows" in first
    assert "- cost sums equal" in final
    assert out.count("p99 latency by provider: counts equal") == 3
    # The data dir is gone without --keep.
    assert list(tmp_path.iterdir()) == []


def test_a_rollup_answer_that_differs_fails_the_run(
    analytics: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    honest = analytics.queries

    def one_nano_off(end_s: int, org: str) -> list[object]:
        out = honest(end_s, org)
        out[0] = analytics.Query(out[0].name, out[0].what, out[0].raw,
                                 out[0].rollup.replace("sum(cost)", "sum(cost) + 1"))
        return out

    monkeypatch.setattr(analytics, "queries", one_nano_off)
    assert small_run(analytics, tmp_path) == 1
    captured = capsys.readouterr()
    assert "CHECK FAILED: cost by model by day differs" in captured.err
    assert "Checked before printing" not in captured.out
