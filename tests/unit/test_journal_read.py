"""`_core.read_journal` and `_core.journal_instance_live`: the engine's journal read back
as call_log column batches (the format itself is tested in rust/gateway journal_reader)."""

from __future__ import annotations

import fcntl
import json
from pathlib import Path
from typing import Any

import orjson
import pytest

from onetoken import _core

CONTRACT = json.loads(
    (Path(__file__).resolve().parents[1] / "contract" / "call_log_columns.json").read_text()
)["columns"]
COLUMNS = [name for name, _, _ in CONTRACT]
STRINGS = {name for name, ch_type, _ in CONTRACT if "String" in ch_type}
# The engine writes these from fixed sets; any short value reads back.
FIXED = {"path": "/v1/chat/completions", "usage_source": "upstream", "rate_limit": "pass"}


def _record(i: int) -> dict[str, Any]:
    return {n: FIXED.get(n, f"{n}-{i}") if n in STRINGS else i for n in COLUMNS}


def _line(i: int) -> bytes:
    return orjson.dumps(_record(i)) + b"\n"


def test_columns_are_the_contract_columns_and_offsets_resume(tmp_path: Path) -> None:
    seg = tmp_path / "journal-inst-00000000.jsonl"
    seg.write_bytes(_line(0) + b"torn {\n" + _line(1) + _line(2))
    columns, offset, bad = _core.read_journal(str(seg), 0, 2, False)
    assert columns is not None
    assert list(columns) == COLUMNS
    assert columns["ts"] == [0, 1]
    assert columns["request_id"] == ["request_id-0", "request_id-1"]
    assert bad == 1, "the bad line is counted, not returned"
    rest, end, bad = _core.read_journal(str(seg), offset, 10, False)
    assert rest is not None and rest["ts"] == [2]
    assert (end, bad) == (seg.stat().st_size, 0)
    assert _core.read_journal(str(seg), end, 10, True) == (None, end, 0)


def test_a_tail_without_newline_waits_unless_complete(tmp_path: Path) -> None:
    seg = tmp_path / "journal-inst-00000000.jsonl"
    seg.write_bytes(_line(0) + _line(1)[:30])
    whole = len(_line(0))
    assert _core.read_journal(str(seg), whole, 10, False) == (None, whole, 0)
    assert _core.read_journal(str(seg), whole, 10, True) == (None, whole + 30, 1)


def test_a_missing_segment_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        _core.read_journal(str(tmp_path / "gone.jsonl"), 0, 1, False)


def test_an_instance_is_live_while_its_lock_is_held(tmp_path: Path) -> None:
    lock = tmp_path / "journal-inst.lock"
    assert not _core.journal_instance_live(str(lock))
    with lock.open("w") as held:
        assert not _core.journal_instance_live(str(lock))
        fcntl.flock(held, fcntl.LOCK_EX)
        assert _core.journal_instance_live(str(lock))
    assert not _core.journal_instance_live(str(lock))
