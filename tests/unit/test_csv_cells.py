"""CSV cells a spreadsheet would run as formulas, in every CSV the API hands out."""

from __future__ import annotations

import csv
import io

import pytest

from onetoken.billing.statements import Period, Statement, UsageRow, statement_csv
from onetoken.kit.spreadsheet import formula_safe
from onetoken.rights.export import to_csv

FORMULAS = ["=1+1", "+1", "-1+cmd", "@SUM(A1)", "\t=1+1", "\r=1+1", "\tcmd", "\rx"]


@pytest.mark.parametrize("text", FORMULAS)
def test_formula_starts_are_quoted(text: str) -> None:
    assert formula_safe(text) == "'" + text


@pytest.mark.parametrize("text", ["plain", "", " =not-a-formula", "1.50", "a=b"])
def test_other_text_is_unchanged(text: str) -> None:
    assert formula_safe(text) == text


def _cells(text: str) -> list[str]:
    return [cell for row in csv.reader(io.StringIO(text, newline="")) for cell in row]


def test_export_csv_quotes_formula_text_and_keeps_numbers() -> None:
    rows = [{"field": name, "value": name} for name in FORMULAS] + [{"field": "n", "value": -5}]
    cells = _cells(to_csv(rows, ("field", "value")))
    assert all(cell.startswith("'") for cell in cells[2:-2])
    assert cells[-1] == "-5"


def test_statement_csv_quotes_tenant_named_groups() -> None:
    stmt = Statement(
        org_id="org_1", period=Period(2026, 1), currency="USD", opening_balance=0,
        closing_balance=0, movement={"refund": -1_000_000_000}, ledger_usage=0,
        call_log_cost=0, calls=1,
        by_model=[UsageRow(name, 1, 1, 1, 0) for name in FORMULAS],
    )
    lines = list(csv.reader(io.StringIO(statement_csv(stmt), newline="")))
    groups = [line[1] for line in lines if line[0] == "model"]
    assert groups == ["'" + name for name in FORMULAS]
    # Amounts stay signed numbers.
    assert [line[-1] for line in lines if line[0] == "movement"] == ["-1.000000000"]


def test_export_csv_line_breaks_inside_values_stay_inside_their_cell() -> None:
    rows = [{"field": "name", "value": "a\rb"}, {"field": "other", "value": "c\nd"}]
    parsed = list(csv.reader(io.StringIO(to_csv(rows, ("field", "value")), newline="")))
    assert parsed == [["field", "value"], ["name", "a\rb"], ["other", "c\nd"]]
