"""Exact money: integer nano-units inside, decimal strings at the API edge."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer, WithJsonSchema
from pydantic_core import PydanticCustomError

NANO_PER_UNIT = 1_000_000_000
NANO_DIGITS = 9
# Fits a signed BIGINT with room for sums of many entries.
MAX_AMOUNT_NANO = 10**18
_DECIMAL_RE = re.compile(r"^-?[0-9]{1,12}(\.[0-9]{1,30})?$")


class MoneyFormatError(ValueError):
    pass


def parse_amount(value: str) -> int:
    """Decimal string → nano-units; rejects anything not a whole number of nano-units."""
    text = value.strip()
    if not _DECIMAL_RE.match(text):
        raise MoneyFormatError('must be a decimal string such as "12.50"')
    try:
        scaled = Decimal(text) * NANO_PER_UNIT
    except InvalidOperation as exc:
        raise MoneyFormatError("must be a decimal string") from exc
    if scaled != scaled.to_integral_value():
        raise MoneyFormatError("has more than 9 decimal places")
    nano = int(scaled)
    if abs(nano) > MAX_AMOUNT_NANO:
        raise MoneyFormatError("is out of range")
    return nano


def format_amount(nano: int) -> str:
    sign = "-" if nano < 0 else ""
    whole, frac = divmod(abs(nano), NANO_PER_UNIT)
    return f"{sign}{whole}.{frac:0{NANO_DIGITS}d}"


def _validate(value: Any) -> int:
    # JSON numbers are refused: a float has already lost exactness before we see it.
    if isinstance(value, bool) or not isinstance(value, str):
        raise PydanticCustomError(
            "onetoken_money_type", 'Amount must be a decimal string such as "12.50".'
        )
    try:
        return parse_amount(value)
    except MoneyFormatError as exc:
        raise PydanticCustomError("onetoken_money_format", f"Amount {exc}.") from None


_SCHEMA = {"type": "string", "pattern": r"^-?[0-9]+(\.[0-9]{1,9})?$", "examples": ["12.50"]}
# What parse_amount accepts, for the document: up to 9 whole digits keeps every amount
# within MAX_AMOUNT_NANO (10**18 nano-units is 10**9 units). Answers may carry sums past it.
_SCHEMA_IN = {**_SCHEMA, "pattern": r"^-?[0-9]{1,9}(\.[0-9]{1,9})?$"}
# The same without a sign, for amounts that must not be negative.
SCHEMA_IN_NON_NEGATIVE = {**_SCHEMA, "pattern": r"^[0-9]{1,9}(\.[0-9]{1,9})?$"}

MoneyIn = Annotated[int, BeforeValidator(_validate), WithJsonSchema(_SCHEMA_IN)]
MoneyOut = Annotated[int, PlainSerializer(format_amount, return_type=str), WithJsonSchema(_SCHEMA)]
