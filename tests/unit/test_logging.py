from __future__ import annotations

import json
import logging

from onetoken.kit.logging import JsonFormatter


def _format(name: str, msg: str, **extra: object) -> dict[str, object]:
    record = logging.LogRecord(name, logging.INFO, __file__, 1, msg, None, None)
    for k, v in extra.items():
        setattr(record, k, v)
    out: dict[str, object] = json.loads(JsonFormatter().format(record))
    return out


def test_allow_listed_fields_pass_and_others_are_dropped() -> None:
    out = _format(
        "onetoken.keys",
        "key.created",
        org_id="org_1",
        key_id="key_1",
        api_key="ot-SECRET",
        password="hunter2",
        prompt="hello there",
    )
    assert out["event"] == "key.created"
    assert out["org_id"] == "org_1" and out["key_id"] == "key_1"
    text = json.dumps(out)
    for secret in ("ot-SECRET", "hunter2", "hello there", "api_key", "password", "prompt"):
        assert secret not in text
    assert {"ts", "level", "event"} <= out.keys()


def test_free_text_messages_are_not_logged() -> None:
    out = _format("onetoken.x", "user typed ot-LEAK into %s")
    assert out["event"] == "unnamed_event"
    assert "ot-LEAK" not in json.dumps(out)


def test_foreign_library_messages_are_dropped() -> None:
    out = _format("sqlalchemy.engine", "INSERT ... [parameters: ('ot-LEAK',)]")
    assert "ot-LEAK" not in json.dumps(out)
    assert out["event"] == "lib.sqlalchemy"


def test_exception_text_is_not_logged() -> None:
    try:
        raise ValueError("contains ot-LEAK")
    except ValueError:
        import sys

        record = logging.LogRecord(
            "onetoken.x", logging.ERROR, __file__, 1, "op.failed", None, sys.exc_info()
        )
    out = json.loads(JsonFormatter().format(record))
    assert out["exc_type"] == "ValueError"
    assert "ot-LEAK" not in json.dumps(out)
    assert "test_logging.py" in out["stack"]


def test_access_log_has_route_template_not_raw_path(client: object, caplog: object) -> None:
    import pytest
    from fastapi.testclient import TestClient

    assert isinstance(client, TestClient)
    assert isinstance(caplog, pytest.LogCaptureFixture)
    with caplog.at_level(logging.INFO, logger="onetoken.access"):
        r = client.get("/api/v1/keys/key_SECRETISH?token=abc")
    assert r.headers["x-request-id"]
    rec = next(r for r in caplog.records if r.name == "onetoken.access")
    out = json.loads(JsonFormatter().format(rec))
    assert out["path"] == "/api/v1/keys/{key_id}"
    assert out["method"] == "GET" and out["status"] == 401
    assert "latency_ms" in out
    assert "SECRETISH" not in json.dumps(out) and "abc" not in json.dumps(out)
