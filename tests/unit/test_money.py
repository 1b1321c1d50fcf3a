from __future__ import annotations

import pytest
from pydantic import BaseModel, ValidationError

from onetoken.kit.money import MoneyFormatError, MoneyIn, MoneyOut, format_amount, parse_amount


@pytest.mark.parametrize(
    ("text", "nano"),
    [
        ("0", 0),
        ("1", 1_000_000_000),
        ("0.5", 500_000_000),
        ("12.50", 12_500_000_000),
        ("0.000000001", 1),
        ("-3.25", -3_250_000_000),
        ("100.000000000", 100_000_000_000),
    ],
)
def test_parse(text: str, nano: int) -> None:
    assert parse_amount(text) == nano


@pytest.mark.parametrize(
    "text", ["0.0000000001", "1.0000000005", "abc", "", "1e3", "1,5", "--1", "0x10", "inf", "NaN"]
)
def test_parse_rejects(text: str) -> None:
    with pytest.raises(MoneyFormatError):
        parse_amount(text)


def test_format() -> None:
    assert format_amount(12_500_000_000) == "12.500000000"
    assert format_amount(1) == "0.000000001"
    assert format_amount(-1) == "-0.000000001"
    assert format_amount(0) == "0.000000000"


def test_round_trip() -> None:
    for n in (0, 1, 999_999_999, 10**15 + 7, -(10**12) - 3):
        assert parse_amount(format_amount(n)) == n


class M(BaseModel):
    amount: MoneyIn


class Out(BaseModel):
    amount: MoneyOut


def test_pydantic_types_refuse_json_numbers() -> None:
    assert M.model_validate({"amount": "0.25"}).amount == 250_000_000
    for bad in (0.25, 1, True, None):
        with pytest.raises(ValidationError):
            M.model_validate({"amount": bad})
    assert Out(amount=5).model_dump(mode="json") == {"amount": "0.000000005"}
