"""Properties of the CSV export on generated values: any value keeps the table's shape
(no value adds a row or a column), reads back as written, and no cell starts as a
spreadsheet formula; a value is changed only by the leading quote that defuses one."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from onetoken.rights.export import to_csv

# What spreadsheets read as the start of a formula (OWASP's list).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")

values = st.one_of(
    st.none(),
    st.text(),
    st.sampled_from(["=1+1", "+1", "-1", "@A1", "\t=1", "\r=1", '"', ",", "\n", "\r\n"]).flatmap(
        lambda head: st.text().map(lambda tail: head + tail)
    ),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3),
)


def _text(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@given(st.lists(st.tuples(st.text(max_size=10), values), max_size=8))
def test_values_read_back_unchanged_but_never_as_formulas(pairs: list[tuple[str, Any]]) -> None:
    rows = [{"field": f, "value": v} for f, v in pairs]
    table = list(csv.reader(io.StringIO(to_csv(rows, ("field", "value")), newline="")))
    assert table[0] == ["field", "value"]
    assert len(table) == len(rows) + 1
    for (field, value), cells in zip(pairs, table[1:], strict=True):
        assert len(cells) == 2
        for cell, written in zip(cells, (_text(field), _text(value)), strict=True):
            # Changed only by the quote that defuses a formula start.
            assert cell == written or (cell == "'" + written and written.startswith(FORMULA_STARTS))
            # A formula start is always defused (a plain signed number may stay a number).
            signed_text = written[:1] in ("+", "-") and not _is_number(written)
            if written.startswith(("=", "@")) or signed_text:
                assert cell == "'" + written
