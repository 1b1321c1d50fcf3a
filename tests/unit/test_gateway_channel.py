"""The control end of the gateway channel: /internal/gateway/config and /snapshot."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from onetoken.billing import service as billing
from onetoken.billing import usage
from onetoken.db.session import bump_revision
from onetoken.gateway.snapshot import SnapshotSource
from onetoken.gateway.supervisor import engine_config
from onetoken.kit import channel
from onetoken.orgs import service as orgs
from onetoken.settings import Settings
from onetoken.state import AppState
from tests.unit.conftest import TEST_SECRET

# Spent marks per engine instance, as the ingestor would have committed them.
MARKS: dict[str, tuple[dict[str, int], dict[str, int]]] = {}


def fake_marks(_: Session, instance_id: str) -> tuple[dict[str, int], dict[str, int]]:
    orgs_marks, key_marks = MARKS.get(instance_id, ({}, {}))
    return dict(orgs_marks), dict(key_marks)


@pytest.fixture
def source(state: AppState) -> Iterator[SnapshotSource]:
    MARKS.clear()
    state.snapshots = SnapshotSource(state.secrets, state.session_factory, marks=fake_marks)
    yield state.snapshots
    MARKS.clear()


@pytest.fixture
def org_id(state: AppState) -> str:
    with state.session_factory() as s:
        org = orgs.create_org(s, "A")
        billing.credit(s, org.id, amount=1_000_000, kind="grant", idempotency_key="g")
        s.commit()
        return org.id


def auth(token: str | None = None) -> dict[str, str]:
    token = token or channel.channel_token(TEST_SECRET.encode(), channel.GATEWAY)
    return {"Authorization": f"Bearer {token}"}


def _org(snapshot: dict[str, object], org_id: str) -> dict[str, int]:
    orgs_list = snapshot["orgs"]
    assert isinstance(orgs_list, list)
    found: dict[str, int] = next(o for o in orgs_list if o["id"] == org_id)
    return found


@pytest.mark.parametrize(
    "path", ["/internal/gateway/config", "/internal/gateway/snapshot?instance=i"]
)
def test_channel_refuses_a_missing_or_wrong_token(
    client: TestClient, source: SnapshotSource, path: str
) -> None:
    wrong = [
        {},
        auth("0" * 64),
        # Another channel's token opens nothing here.
        auth(channel.channel_token(TEST_SECRET.encode(), channel.OPS)),
        {"Authorization": "Basic " + channel.channel_token(TEST_SECRET.encode(), channel.GATEWAY)},
    ]
    for headers in wrong:
        r = client.get(path, headers=headers)
        assert r.status_code == 401, headers
        # The control API's error shape, naming no secret.
        assert r.json()["error"]["type"] == "authentication_error"
        assert "secret" not in r.text and "key_hash" not in r.text


def test_channel_is_not_in_the_public_openapi(client: TestClient) -> None:
    paths = client.get("/api/openapi.json").json()["paths"]
    assert not [p for p in paths if p.startswith("/internal")]


def test_config_is_the_engine_config(
    client: TestClient, settings: Settings, state: AppState
) -> None:
    r = client.get("/internal/gateway/config", headers=auth())
    assert r.status_code == 200
    assert r.headers["cache-control"] == "no-store"
    assert r.json() == orjson.loads(orjson.dumps(engine_config(settings, state.secrets)))


def test_snapshot_etag_and_304_until_the_config_changes(
    client: TestClient, source: SnapshotSource, state: AppState, org_id: str
) -> None:
    url = "/internal/gateway/snapshot?instance=gw-1"
    first = client.get(url, headers=auth())
    assert first.status_code == 200
    etag = first.headers["etag"]
    assert etag == f'"{first.json()["version"]}"'
    again = client.get(url, headers={**auth(), "If-None-Match": etag})
    assert again.status_code == 304 and again.headers["etag"] == etag
    # A stale or foreign ETag gets the snapshot.
    assert client.get(url, headers={**auth(), "If-None-Match": '"1"'}).status_code == 200
    etag = client.get(url, headers=auth()).headers["etag"]
    with state.session_factory() as s:
        bump_revision(s)
        s.commit()
    changed = client.get(url, headers={**auth(), "If-None-Match": etag})
    assert changed.status_code == 200
    assert changed.json()["version"] > first.json()["version"]


def test_versions_rise_across_a_control_restart(state: AppState, org_id: str) -> None:
    before = SnapshotSource(state.secrets, state.session_factory, marks=fake_marks)
    _, body = before.get("gw", None)
    after = SnapshotSource(state.secrets, state.session_factory, marks=fake_marks)
    _, body2 = after.get("gw", None)
    assert body is not None and body2 is not None
    assert orjson.loads(body2)["version"] > orjson.loads(body)["version"]


def test_snapshot_carries_that_instances_marks(
    client: TestClient, source: SnapshotSource, org_id: str
) -> None:
    MARKS["gw-a"] = ({org_id: 300}, {})
    a = client.get("/internal/gateway/snapshot?instance=gw-a", headers=auth()).json()
    b = client.get("/internal/gateway/snapshot?instance=gw-b", headers=auth()).json()
    assert _org(a, org_id)["spent_mark"] == 300
    # A new engine instance (a restarted gateway) counted nothing yet.
    assert _org(b, org_id)["spent_mark"] == 0
    assert _org(a, org_id)["balance"] == _org(b, org_id)["balance"] == 1_000_000


def test_balance_and_marks_are_read_under_the_mark_lock(state: AppState, org_id: str) -> None:
    """The ingestor commits a batch's ledger entries and marks under the lock: a snapshot
    built meanwhile must see both or neither."""
    lock = threading.Lock()
    src = SnapshotSource(state.secrets, state.session_factory, lock, marks=fake_marks)
    got: list[bytes | None] = []
    with lock:
        t = threading.Thread(target=lambda: got.append(src.get("gw", None)[1]))
        t.start()
        # Long enough for the build to reach the lock if it ignored it: what must not
        # happen has no condition to wait for, so this pause is the test.
        time.sleep(0.2)
        assert got == []
        # The "batch": ledger and mark move together.
        with state.session_factory() as s:
            usage.record_usage(
                s,
                [
                    billing.Usage(
                        org_id=org_id, entry_id="r1", cost=250, ts_us=time.time_ns() // 1000
                    )
                ],
            )
            s.commit()
        MARKS["gw"] = ({org_id: 250}, {})
    t.join(timeout=10)
    assert got and got[0] is not None
    org = _org(orjson.loads(got[0]), org_id)
    assert (org["balance"], org["spent_mark"]) == (1_000_000 - 250, 250)


def test_config_change_reaches_the_next_poll(
    client: TestClient, source: SnapshotSource, state: AppState, org_id: str
) -> None:
    url = "/internal/gateway/snapshot?instance=gw"
    etag = client.get(url, headers=auth()).headers["etag"]
    with state.session_factory() as s:
        orgs.create_org(s, "made elsewhere")  # commits a new revision with it
        s.commit()
    r = client.get(url, headers={**auth(), "If-None-Match": etag})
    assert r.status_code == 200 and len(r.json()["orgs"]) == 2


def _bump(state: AppState) -> None:
    with state.session_factory() as s:
        bump_revision(s)
        s.commit()


def _poll_in_thread(
    src: SnapshotSource, etag: str, wait: float
) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []

    def run() -> None:
        began = time.monotonic()
        body = src.poll("gw", etag, wait)[1]
        out.append((body, time.monotonic() - began))

    t = threading.Thread(target=run)
    t.start()
    return t, out


@pytest.mark.parametrize(
    ("recheck_s", "in_this_process"),
    [
        # An API change: AppState.config_changed calls changed(), which answers at once.
        (30.0, True),
        # The CLI's change: no changed() in this process; the recheck finds it.
        (0.05, False),
    ],
)
def test_long_poll_answers_a_committed_change(
    state: AppState, org_id: str, recheck_s: float, in_this_process: bool
) -> None:
    src = SnapshotSource(
        state.secrets, state.session_factory, marks=fake_marks, recheck_s=recheck_s
    )
    etag, _ = src.get("gw", None)
    t, out = _poll_in_thread(src, etag, 30)
    _bump(state)
    if in_this_process:
        src.changed()
    t.join(timeout=10)
    ((body, took),) = out
    assert body is not None and took < 5


def test_long_poll_answers_304_after_the_wait_and_at_once_when_closed(
    state: AppState, org_id: str
) -> None:
    src = SnapshotSource(state.secrets, state.session_factory, marks=fake_marks, recheck_s=0.05)
    etag, _ = src.get("gw", None)
    began = time.monotonic()
    assert src.poll("gw", etag, 0.3) == (etag, None)
    assert time.monotonic() - began >= 0.3
    t, out = _poll_in_thread(src, etag, 30)
    src.close()
    t.join(timeout=10)
    ((body, took),) = out
    assert body is None and took < 5
    # Closed (the control process is stopping): polls no longer wait.
    began = time.monotonic()
    assert src.poll("gw", etag, 30) == (etag, None)
    assert time.monotonic() - began < 5


def test_api_changes_wake_the_gateways_poll(
    client: TestClient, source: SnapshotSource, state: AppState, admin: Any
) -> None:
    url = "/internal/gateway/snapshot?instance=gw"
    etag = client.get(url, headers=auth()).headers["etag"]
    source.recheck_s = 30
    t, out = _poll_in_thread(source, etag, 30)
    r = client.post("/api/v1/keys", json={"name": "new"}, headers=admin.headers)
    assert r.status_code in (200, 201)
    t.join(timeout=10)
    ((body, took),) = out
    assert body is not None and took < 5


def test_a_change_returns_once_the_polling_gateway_serves_it(state: AppState, org_id: str) -> None:
    """An API call that returned has taken effect on the gateway, as when the engine ran
    in the control process: config_changed waits for the gateway's confirming poll."""
    src = SnapshotSource(state.secrets, state.session_factory, marks=fake_marks, confirm_s=30)
    etag, _ = src.get("gw", None)
    src.get("gw", etag)  # the gateway serves it
    _bump(state)
    done = threading.Event()
    t = threading.Thread(target=lambda: (src.changed(), done.set()))
    t.start()
    new_etag, body = src.get("gw", etag)  # the woken poll: the new snapshot
    assert body is not None
    assert not done.wait(0.2)  # handed out is not yet served
    src.get("gw", new_etag)  # the next poll names it: served
    assert done.wait(5)
    t.join()


def test_a_change_does_not_wait_for_gateways_that_stopped_polling(
    state: AppState, org_id: str
) -> None:
    src = SnapshotSource(state.secrets, state.session_factory, marks=fake_marks, confirm_s=30)
    began = time.monotonic()
    src.changed()  # nobody polls (a control process alone, a test client)
    assert time.monotonic() - began < 5
    src.get("gw", None)
    src._confirmed["gw"] = (-1, time.monotonic() - 60)  # last polled a minute ago
    _bump(state)
    began = time.monotonic()
    src.changed()
    assert time.monotonic() - began < 5


def test_answered_polls_stay_out_of_the_info_log(
    client: TestClient, source: SnapshotSource, org_id: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Every gateway polls several times a second: its answered polls are DEBUG lines,
    a refused one is not."""
    import logging

    url = "/internal/gateway/snapshot?instance=gw"
    with caplog.at_level(logging.DEBUG, logger="onetoken.access"):
        client.get(url, headers=auth())
        client.get(url)  # no token
    levels = [
        (r.levelno, getattr(r, "status", None))
        for r in caplog.records
        if r.name == "onetoken.access"
    ]
    assert levels == [(logging.DEBUG, 200), (logging.INFO, 401)]


def test_marks_are_the_ingestors_by_default(state: AppState, org_id: str) -> None:
    from onetoken.ingest.marks import add_marks

    with state.session_factory() as s:
        add_marks(s, "gw-real", {org_id: 300}, {})
        s.commit()
    src = SnapshotSource(state.secrets, state.session_factory)
    _, body = src.get("gw-real", None)
    assert body is not None
    assert _org(orjson.loads(body), org_id)["spent_mark"] == 300
