"""The control and ingest processes' /metrics (onetoken.kit.metrics, onetoken.ingest.metrics):
journal depth behind each consumer's cursor moves as a journal grows and as ingestion
catches up, a ClickHouse outage shows as the call_log consumer's backlog, and the control
API counts requests by route template (never an id). tests/unit/test_prometheus_rules.py
scrapes real `onetoken control` and `onetoken ingest` processes."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from onetoken.control import ingest_metrics
from onetoken.ingest.ingestor import Ingestor
from onetoken.ingest.metrics import ingestor_metrics, journal_metrics
from onetoken.kit.metrics import Metric, Registry, RequestStats, render
from onetoken.orgs import service as orgs
from onetoken.settings import Settings
from onetoken.state import AppState
from tests.support import Samples, parse_metrics, sample
from tests.unit.journal_files import append, dead, live, record

UNREAD = "onetoken_journal_unread_bytes"
SEGMENTS = "onetoken_journal_unread_segments"
AGE = "onetoken_journal_oldest_unread_age_seconds"


class Sink:
    """A call_log that takes blocks unless `down` (ClickHouse refusing), counting as the
    real sink does."""

    def __init__(self) -> None:
        self.down = False
        self.rows_written = 0
        self.batches_failed = 0

    def available(self) -> bool:
        return True

    def insert(self, block: bytes, rows: int, dedup_token: str, database: str = "") -> bool:
        if self.down:
            self.batches_failed += 1
            return False
        self.rows_written += rows
        return True

    def close(self) -> None:
        pass


@pytest.fixture
def sink() -> Sink:
    return Sink()


@pytest.fixture
def ingestor(settings: Settings, state: AppState, sink: Sink) -> Ingestor:
    settings.ensure_dirs()
    return Ingestor(settings, state.session_factory, sink=sink)  # type: ignore[arg-type]


def scrape(settings: Settings, state: AppState, ingestor: Ingestor) -> Samples:
    text = render([*journal_metrics(settings.spool_dir, state.session_factory),
                   *ingestor_metrics(ingestor)])
    return parse_metrics(text)


def backlog(m: Samples, instance: str, consumer: str) -> tuple[float, float, float]:
    """(unread bytes, unread segments, oldest unread age) of one consumer."""
    labels = {"engine_instance": instance, "consumer": consumer}
    return (sample(m, UNREAD, **labels), sample(m, SEGMENTS, **labels), sample(m, AGE, **labels))


def ago_us(seconds: float) -> int:
    return int((time.time() - seconds) * 1_000_000)


def test_depth_grows_with_the_journal_and_falls_as_ingestion_catches_up(
    settings: Settings, state: AppState, ingestor: Ingestor
) -> None:
    spool = settings.spool_dir
    with live(spool, "i1"):
        first = append(spool, "i1", 1, [record("r1", ts_us=ago_us(300)), record("r2")])
        m = scrape(settings, state, ingestor)
        size = first.stat().st_size
        for consumer in ("ledger", "call_log"):
            unread, segs, age = backlog(m, "i1", consumer)
            assert (unread, segs) == (size, 1)
            # The oldest unread record is the one five minutes old.
            assert 300 <= age < 360
        assert sample(m, "onetoken_journal_live", engine_instance="i1") == 1
        assert sample(m, "onetoken_journal_segments", engine_instance="i1") == 1
        assert sample(m, "onetoken_journal_bytes", engine_instance="i1") == size

        append(spool, "i1", 1, [record("r3")])
        grown = first.stat().st_size
        assert grown > size
        assert backlog(scrape(settings, state, ingestor), "i1", "ledger")[0] == grown

        assert ingestor.catch_up() == 3
        m = scrape(settings, state, ingestor)
        assert backlog(m, "i1", "ledger") == backlog(m, "i1", "call_log") == (0, 0, 0)
        # The live engine's last segment stays on disk (it may still grow).
        assert sample(m, "onetoken_journal_segments", engine_instance="i1") == 1
        assert sample(m, "onetoken_ingest_records_total", consumer="ledger") == 3
        assert sample(m, "onetoken_ingest_records_total", consumer="call_log") == 3
        assert sample(m, "onetoken_ingest_rounds_total") == 1
        assert time.time() - sample(m, "onetoken_ingest_last_round_timestamp_seconds") < 60

        # The engine moves on to a new segment: only its bytes are unread.
        second = append(spool, "i1", 2, [record("r4", ts_us=ago_us(60))])
        unread, segs, age = backlog(scrape(settings, state, ingestor), "i1", "ledger")
        assert (unread, segs) == (second.stat().st_size, 1)
        assert 60 <= age < 120
        ingestor.catch_up()
        m = scrape(settings, state, ingestor)
        assert backlog(m, "i1", "ledger") == (0, 0, 0)
        # Segment 1 was complete and read by both: collected.
        assert sample(m, "onetoken_journal_segments", engine_instance="i1") == 1
        assert sample(m, "onetoken_journal_bytes", engine_instance="i1") == second.stat().st_size


def test_clickhouse_refusing_leaves_the_call_log_backlog_and_its_segments(
    settings: Settings, state: AppState, ingestor: Ingestor, sink: Sink
) -> None:
    spool = settings.spool_dir
    sink.down = True
    first = append(spool, "i2", 1, [record("r1", ts_us=ago_us(120))])
    second = append(spool, "i2", 2, [record("r2")])
    dead(spool, "i2")
    ingestor.catch_up()
    m = scrape(settings, state, ingestor)
    assert backlog(m, "i2", "ledger") == (0, 0, 0)
    unread, segs, age = backlog(m, "i2", "call_log")
    assert (unread, segs) == (first.stat().st_size + second.stat().st_size, 2)
    assert age >= 120
    # The journal is the ClickHouse write spool: nothing is collected while it refuses.
    assert sample(m, "onetoken_journal_segments", engine_instance="i2") == 2
    assert sample(m, "onetoken_journal_live", engine_instance="i2") == 0
    assert sample(m, "onetoken_clickhouse_insert_failures_total") == 1
    assert sample(m, "onetoken_ingest_records_total", consumer="call_log") == 0

    sink.down = False
    ingestor.catch_up()
    m = scrape(settings, state, ingestor)
    assert sample(m, "onetoken_clickhouse_rows_written_total") == 2
    # Read to its end by both and dead: retired, its series gone.
    assert not [k for k in m if dict(k[1]).get("engine_instance") == "i2"]


def test_a_line_still_being_written_is_unread_but_has_no_age(
    settings: Settings, state: AppState, ingestor: Ingestor
) -> None:
    spool = settings.spool_dir
    with live(spool, "i3"):
        append(spool, "i3", 1, [record("r1", ts_us=ago_us(600))], raw=b'{"ts":1')
        ingestor.catch_up()
        unread, segs, age = backlog(scrape(settings, state, ingestor), "i3", "ledger")
        assert (unread, segs, age) == (len(b'{"ts":1'), 1, 0)


def test_journals_of_a_pool_are_counted_without_naming_it(
    settings: Settings, state: AppState, ingestor: Ingestor
) -> None:
    # A pool's name may be a customer's: the series carry the engine instance only.
    append(settings.spool_dir / "pools" / "acme", "i4", 1, [record("r1")])
    text = render(journal_metrics(settings.spool_dir, state.session_factory))
    assert 'engine_instance="i4"' in text
    assert "acme" not in text


def test_control_api_requests_are_counted_by_route_template(
    client: TestClient, state: AppState
) -> None:
    with state.session_factory() as s:
        org = orgs.create_org(s, "Secretive Org")
        s.commit()
        org_id = org.id
    assert client.get("/healthz").status_code == 200
    assert client.get(f"/api/v1/orgs/{org_id}").status_code == 401
    client.request("BREW", "/healthz")
    text = render(state.requests.metrics())
    m = parse_metrics(text)
    assert sample(m, "onetoken_control_requests_total", method="GET", route="/healthz",
                  code="200") == 1
    assert sample(m, "onetoken_control_requests_total", method="GET",
                  route="/api/v1/orgs/{org_id}", code="401") == 1
    # A method made up by a client is one label value, not a new series each.
    assert sample(m, "onetoken_control_requests_total", method="other", route="/healthz",
                  code="405") == 1
    assert sample(m, "onetoken_control_request_duration_seconds_count") == 3
    assert sample(m, "onetoken_control_request_duration_seconds_bucket", le="+Inf") == 3
    assert org_id not in text


def test_a_failing_collector_is_left_out_and_said_so() -> None:
    registry = Registry()
    registry.register("ok", lambda: [Metric("onetoken_x", "gauge", "x").add(2, a='q"\\\n')])

    def broken() -> list[Metric]:
        raise OSError("disk gone")

    registry.register("broken", broken)
    m = parse_metrics(registry.render())
    assert sample(m, "onetoken_x", a='q\\"\\\\\\n') == 2
    assert sample(m, "onetoken_collector_up", collector="ok") == 1
    assert sample(m, "onetoken_collector_up", collector="broken") == 0


def test_request_stats_buckets_are_cumulative_and_leave_long_polls_out() -> None:
    stats = RequestStats("t", buckets=(0.1, 1.0), long_polls=frozenset({"/poll"}))
    for seconds in (0.05, 0.5, 0.5, 5.0):
        stats.observe("GET", "/x", 200, seconds)
    stats.observe("GET", "/poll", 200, 25.0)
    m = parse_metrics(render(stats.metrics()))
    assert sample(m, "t_requests_total", method="GET", route="/poll", code="200") == 1
    assert [sample(m, "t_request_duration_seconds_bucket", le=le) for le in ("0.1", "1", "+Inf")] \
        == [1, 3, 4]
    assert sample(m, "t_request_duration_seconds_sum") == pytest.approx(6.05)


def test_ingest_metrics_registry_names_its_collectors(
    settings: Settings, state: AppState, ingestor: Ingestor
) -> None:
    m = parse_metrics(ingest_metrics(settings, state.session_factory, ingestor).render())
    assert {dict(k[1])["collector"] for k in m if k[0] == "onetoken_collector_up"} == {
        "journal", "ingest", "security_log"}
