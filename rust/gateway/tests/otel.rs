//! OTLP export (docs/observability.md): sampling ratio 0 queues no span, and a dead
//! collector costs the requests nothing but spans counted as dropped. The trace tree and
//! what reaches a live collector are tested against a real receiver in
//! tests/integration/test_otel.py.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod harness;

use harness::*;
use serde_json::json;

fn counter(h: &Gateway, name: &str) -> u64 {
    h.engine
        .metrics_text()
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} missing from /metrics"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ratio_zero_exports_nothing_and_a_dead_collector_only_drops_spans() {
    // A port nobody listens on: every export is refused at connect.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    for ratio in [0.0, 1.0] {
        let h = Gateway::custom(
            |c| {
                c["otel"] = json!({"endpoint": format!("http://{dead}"), "ratio": ratio,
                                   "export_interval_ms": 20})
            },
            |_| {},
        );
        for _ in 0..3 {
            assert_eq!(h.ask("ot-good", "hello").await.status, 200);
        }
        assert!(wait_until_async(WAIT, || h.engine.stats().in_flight == 0).await);
        let failures = counter(&h, "onetoken_otel_export_failures_total");
        if ratio == 0.0 {
            // Two more failed exports: at least one whole round began after the requests
            // ended, and it found no span to send.
            assert!(
                wait_until_async(WAIT, || {
                    counter(&h, "onetoken_otel_export_failures_total") >= failures + 2
                })
                .await
            );
            assert_eq!(counter(&h, "onetoken_otel_spans_dropped_total"), 0);
        } else {
            // The request span, seven phases and one upstream attempt, three times.
            assert!(
                wait_until_async(WAIT, || {
                    counter(&h, "onetoken_otel_spans_dropped_total") >= 27
                })
                .await
            );
        }
        assert_eq!(counter(&h, "onetoken_otel_spans_exported_total"), 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_sends_what_is_queued() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    // The first export round would be a minute away.
    let h = Gateway::custom(
        |c| {
            c["otel"] = json!({"endpoint": format!("http://{dead}"), "ratio": 1.0,
                               "export_interval_ms": 60_000})
        },
        |_| {},
    );
    for _ in 0..3 {
        assert_eq!(h.ask("ot-good", "hello").await.status, 200);
    }
    assert!(wait_until_async(WAIT, || h.engine.stats().in_flight == 0).await);
    assert_eq!(counter(&h, "onetoken_otel_spans_dropped_total"), 0);
    let engine = &h.engine;
    tokio::task::block_in_place(|| engine.stop(std::time::Duration::from_secs(1)));
    // Sent at stop (and refused by the dead collector, so counted dropped).
    assert!(counter(&h, "onetoken_otel_spans_dropped_total") >= 27);
}
