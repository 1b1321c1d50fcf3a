"""Text cells of the CSV files the API hands out (statements, invoices, exports)."""

from __future__ import annotations

# A spreadsheet runs a cell that starts with one of these as a formula (OWASP "CSV
# injection"): tab and carriage return too, since spreadsheets strip them before looking.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def formula_safe(text: str) -> str:
    """`text` as a CSV cell a spreadsheet shows as text: a leading quote when it would
    start a formula. For free text only (names, descriptions): signed numbers stay numbers
    when written without it."""
    return "'" + text if text.startswith(_FORMULA_STARTS) else text
