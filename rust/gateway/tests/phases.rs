//! `phase_timing`: the thread CPU time of each request phase in `/metrics`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod harness;

use std::collections::HashMap;

use harness::*;
use http_body_util::BodyExt;
use onetoken_gateway::PHASE_NAMES;
use serde_json::json;

fn phase_seconds(h: &Gateway) -> HashMap<String, f64> {
    let text = h.engine.metrics_text();
    let prefix = "onetoken_phase_cpu_seconds_total{phase=\"";
    text.lines()
        .filter_map(|l| l.strip_prefix(prefix))
        .map(|rest| {
            let (phase, value) = rest.split_once("\"} ").unwrap();
            (phase.to_owned(), value.parse::<f64>().unwrap())
        })
        .collect()
}

/// Wait (bounded) until every request sent has been recorded: the record phase runs as
/// the response is handed over, so it may trail the client's read.
async fn settled(h: &Gateway) {
    assert!(
        wait_until_async(WAIT, || h.engine.stats().in_flight == 0).await,
        "requests still in flight"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_phase_a_request_runs_is_counted() {
    let h = Gateway::custom(|c| c["phase_timing"] = json!(true), |_| {});
    let whole = h.ask("ot-good", "hello").await;
    assert_eq!(whole.status, 200);
    let resp = h
        .open_chat(Some("ot-good"), chat("hello", json!({"stream": true})))
        .await;
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("[DONE]"));
    settled(&h).await;
    let seconds = phase_seconds(&h);
    assert_eq!(seconds.len(), PHASE_NAMES.len(), "{seconds:?}");
    for phase in PHASE_NAMES {
        assert!(seconds[phase] > 0.0, "{phase}: {seconds:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_key_counts_only_the_phases_it_reached() {
    let h = Gateway::custom(|c| c["phase_timing"] = json!(true), |_| {});
    let r = h.ask("ot-unknown", "hello").await;
    assert_eq!(r.status, 401);
    settled(&h).await;
    let seconds = phase_seconds(&h);
    for phase in ["admit", "authenticate", "settle", "record"] {
        assert!(seconds[phase] > 0.0, "{phase}: {seconds:?}");
    }
    for phase in ["route", "reserve", "forward", "relay"] {
        assert_eq!(seconds[phase], 0.0, "{phase}: {seconds:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn off_by_default_the_counters_stay_zero() {
    let h = Gateway::start();
    let r = h.ask("ot-good", "hello").await;
    assert_eq!(r.status, 200);
    settled(&h).await;
    let seconds = phase_seconds(&h);
    assert_eq!(seconds.len(), PHASE_NAMES.len(), "{seconds:?}");
    assert!(seconds.values().all(|s| *s == 0.0), "{seconds:?}");
}
