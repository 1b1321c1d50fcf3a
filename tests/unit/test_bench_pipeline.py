"""bench/pipeline.py claims a figure only when every record is stored exactly once."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "pipeline.py"


@pytest.fixture(scope="module")
def pipeline() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_pipeline", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_every_record_once_is_a_clean_run(pipeline: ModuleType) -> None:
    calls, cost = pipeline.expected_ledger(1000)
    assert 0 < calls < 1000  # some calls are refused and cost nothing
    assert pipeline.check(
        1000,
        distinct=1000,
        stored=1000,
        ledger_calls=calls,
        ledger_cost=cost,
        bad_lines=0,
        segments_left=0,
    ) == []


@pytest.mark.parametrize(
    ("distinct", "stored", "calls_delta", "cost_delta"),
    [
        (999, 999, 0, 0),  # a record missing from call_log
        (1000, 1001, 0, 0),  # a record doubled in call_log
        (1000, 1000, -1, -1),  # a charge missing from the ledger
        (1000, 1000, 1, 1),  # a charge doubled in the ledger
        (1000, 1000, 0, 1),  # the right calls at the wrong cost
    ],
)
def test_a_missing_or_doubled_record_fails_the_run(
    pipeline: ModuleType, distinct: int, stored: int, calls_delta: int, cost_delta: int
) -> None:
    calls, cost = pipeline.expected_ledger(1000)
    assert pipeline.check(
        1000,
        distinct=distinct,
        stored=stored,
        ledger_calls=calls + calls_delta,
        ledger_cost=cost + cost_delta,
        bad_lines=0,
        segments_left=0,
    )
