//! In-process specs: a real engine on 127.0.0.1:0 in front of a tiny upstream.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod harness;

use std::time::Duration;

use harness::*;
use http_body_util::BodyExt;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_metrics() {
    let h = Gateway::custom(|c| c["metrics_listen"] = json!("127.0.0.1:0"), |_| {});
    let r = call(h.addr, request("GET", "/healthz", None, "")).await;
    assert_eq!(r.status, 200);
    let age = r.json()["snapshot_age_seconds"].as_f64().unwrap();
    assert!((0.0..60.0).contains(&age), "{age}");
    assert_eq!(
        r.json(),
        json!({"status": "ok", "control": "ok", "snapshot_version": 1, "snapshot_age_seconds": age})
    );
    // The metrics are not for the gateway's clients: only the metrics listener has them.
    let public = call(h.addr, request("GET", "/metrics", None, "")).await;
    assert_eq!(public.status, 404);
    assert_eq!(public.json()["error"]["code"], "not_found");
    let metrics_addr = h.engine.metrics_address().unwrap();
    assert_ne!(metrics_addr, h.addr);
    let health = call(metrics_addr, request("GET", "/healthz", None, "")).await;
    assert_eq!(health.status, 200);
    let m = call(metrics_addr, request("GET", "/metrics", None, "")).await;
    assert_eq!(m.status, 200);
    for name in [
        "onetoken_requests_total{path=\"/v1/chat/completions\"}",
        "onetoken_errors_total{code=\"invalid_api_key\"}",
        "onetoken_request_duration_seconds_bucket",
        "onetoken_in_flight_requests",
        "onetoken_records_total",
        "onetoken_journal_segments_total",
        "onetoken_journal_errors_total",
        "onetoken_control_reachable 1",
        "onetoken_snapshot_age_seconds",
        "onetoken_snapshot_version 1",
        "onetoken_connections_open",
        "onetoken_connections_refused_total",
    ] {
        assert!(m.text().contains(name), "metrics lack {name}");
    }
}

/// The gateway keeps serving on its last good snapshot while the control plane is
/// unreachable, and says so: `/healthz` stays 200 and names it, the snapshot's age grows
/// until a poll reaches the control plane again (or a newer snapshot loads).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_metrics_report_an_unreachable_control_plane() {
    let h = Gateway::start();
    let health = || async {
        let r = call(h.addr, request("GET", "/healthz", None, "")).await;
        assert_eq!(r.status, 200, "still serving");
        let v = r.json();
        (
            v["control"].as_str().unwrap().to_owned(),
            v["snapshot_age_seconds"].as_f64().unwrap(),
        )
    };
    let metric = |name: &str| -> f64 {
        let text = h.engine.metrics_text();
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name}"));
        line[name.len() + 1..].parse().unwrap()
    };
    h.engine.set_control_status(false);
    let (control, first) = health().await;
    assert_eq!(control, "unreachable");
    assert_eq!(metric("onetoken_control_reachable"), 0.0);
    // The age grows while the control plane stays unreachable.
    let grown = wait_for(WAIT, || async { health().await.1 >= first + 0.03 }).await;
    assert!(grown, "the snapshot age did not grow from {first}");
    let (_, later) = health().await;
    assert!(metric("onetoken_snapshot_age_seconds") >= later);
    let r = h.ask("ot-good", "hi").await;
    assert_eq!(r.status, 200, "requests are served meanwhile");

    h.engine.set_control_status(true);
    let (control, now) = health().await;
    assert_eq!(control, "ok");
    assert!(
        now < later,
        "a poll that reached the control plane confirms the snapshot"
    );
    assert_eq!(metric("onetoken_control_reachable"), 1.0);

    // A newer snapshot also confirms, even before the status is reported.
    h.engine.set_control_status(false);
    assert!(wait_for(WAIT, || async { health().await.1 >= 0.03 }).await);
    let (_, stale) = health().await;
    let newer = spec_snapshot(2, h.upstream().addr, 100_000_000_000).to_string();
    h.engine.load_snapshot(newer.as_bytes()).unwrap();
    let (control, fresh) = health().await;
    assert!(fresh < stale, "{stale} then {fresh}");
    assert_eq!(control, "unreachable", "until a poll says otherwise");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_served_nowhere_without_a_metrics_listener() {
    let h = Gateway::start();
    assert_eq!(h.engine.metrics_address(), None);
    let r = call(h.addr, request("GET", "/metrics", None, "")).await;
    assert_eq!(r.status, 404);
}

#[test]
fn healthz_says_starting_before_the_first_snapshot() {
    let spool = tempdir::Dir::new();
    let engine = onetoken_gateway::Engine::new(engine_config(spool.path())).unwrap();
    let addr = engine.start().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let r = rt.block_on(call(addr, request("GET", "/healthz", None, "")));
    assert_eq!(r.status, 503);
    assert_eq!(r.json(), json!({"status": "starting", "control": "ok"}));
    engine.stop(Duration::from_secs(1));
    assert!(!engine.running());
    engine.stop(Duration::from_secs(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_failures_are_401_or_403_with_one_record_each() {
    let h = Gateway::start();
    let body = chat(CANARY, json!({}));
    let cases = [
        (None, 401, "invalid_api_key"),
        (Some("ot-unknown"), 401, "invalid_api_key"),
        (Some("ot-revoked"), 401, "key_revoked"),
        (Some("ot-expired"), 401, "key_expired"),
        (Some("ot-off"), 403, "org_disabled"),
    ];
    let mut replies = Vec::new();
    for (key, status, code) in cases {
        let r = post(h.addr, CHAT, key, body.clone()).await;
        assert_eq!(r.status, status, "{code}");
        assert_eq!(r.json()["error"]["code"], code);
        assert!(r.headers.contains_key("x-request-id"));
        replies.push(r);
    }
    let x = call(h.addr, {
        let mut r = request("POST", CHAT, None, body.to_string());
        r.headers_mut()
            .insert("x-api-key", "ot-good".parse().unwrap());
        r
    })
    .await;
    assert_eq!(x.status, 200, "x-api-key header authenticates");
    h.wait_records(6).await;
    let recs = h.records();
    assert_eq!(recs.len(), 6);
    assert_eq!(recs[0].org_id, "");
    assert_eq!(recs[0].key_id, "");
    assert_eq!(recs[2].key_id, "key_revoked");
    assert_eq!(recs[2].error_code, "key_revoked");
    assert_eq!(recs[2].status, 401);
    assert_eq!(recs[2].attempts, 0);
    assert_eq!(
        recs[0].request_id,
        replies[0].headers["x-request-id"].to_str().unwrap()
    );
    assert_eq!(h.upstream().requests(), 1);
    let refs: Vec<&Reply> = replies.iter().collect();
    h.assert_no_canary(&recs, &refs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_errors_never_reach_the_upstream() {
    let h = Gateway::start();
    let big = format!("{CANARY}{}", "x".repeat(70_000));
    let too_large = h.ask("ot-good", &big).await;
    assert_eq!(too_large.status, 413);
    assert_eq!(too_large.json()["error"]["code"], "body_too_large");

    let bad_json = call(
        h.addr,
        request(
            "POST",
            CHAT,
            Some("ot-good"),
            format!("{{\"model\": \"{CANARY}"),
        ),
    )
    .await;
    assert_eq!(bad_json.status, 400);
    assert_eq!(bad_json.json()["error"]["code"], "invalid_json");

    let not_object = call(
        h.addr,
        request("POST", CHAT, Some("ot-good"), format!("[\"{CANARY}\"]")),
    )
    .await;
    assert_eq!(not_object.status, 400);
    assert_eq!(not_object.json()["error"]["code"], "invalid_request");

    let unknown_model = h
        .chat_as("ot-good", chat_body(CANARY, "x", json!({})))
        .await;
    assert_eq!(unknown_model.status, 404);
    assert_eq!(unknown_model.json()["error"]["code"], "model_not_found");

    let wrong_kind = h
        .chat_as("ot-good", chat_body("demo-embed", "x", json!({})))
        .await;
    assert_eq!(wrong_kind.status, 404);

    let not_allowed = h.ask("ot-embed-only", CANARY).await;
    assert_eq!(not_allowed.status, 403);
    assert_eq!(not_allowed.json()["error"]["code"], "model_not_allowed");

    let poor = h.ask("ot-poor", CANARY).await;
    assert_eq!(poor.status, 402);
    assert_eq!(poor.json()["error"]["code"], "insufficient_balance");

    let nowhere = call(
        h.addr,
        request("POST", "/v1/nowhere", Some("ot-good"), CANARY),
    )
    .await;
    assert_eq!(nowhere.status, 404);
    assert_eq!(nowhere.json()["error"]["code"], "not_found");
    let wrong_method = call(h.addr, request("GET", CHAT, Some("ot-good"), "")).await;
    assert_eq!(wrong_method.status, 405);

    h.wait_records(9).await;
    let recs = h.records();
    assert_eq!(recs.len(), 9);
    assert_eq!(h.upstream().requests(), 0);
    assert!(recs
        .iter()
        .all(|r| r.cost == 0 && r.usage_source == "none" && r.attempts == 0));
    assert_eq!(
        recs[3].model_requested, "",
        "unconfigured model names are not recorded"
    );
    assert_eq!(recs[5].model_requested, "demo-chat");
    assert_eq!(recs[7].path, "other");
    assert_eq!(
        h.engine.org_spend().iter().map(|o| o.2).sum::<i64>(),
        0,
        "nothing stays reserved"
    );
    h.assert_no_canary(
        &recs,
        &[
            &too_large,
            &bad_json,
            &not_object,
            &unknown_model,
            &not_allowed,
            &poor,
            &nowhere,
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_stream_success_is_billed_from_upstream_usage() {
    let h = Gateway::start();
    let r = h
        .chat("one two three", json!({"mock": {"chunks": 5}}))
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json()["choices"][0]["message"]["content"],
        "tok tok tok tok tok "
    );
    let sent = h.upstream().state.last_body.lock().clone().unwrap();
    assert_eq!(
        sent["model"], "mock-gpt",
        "model rewritten to the upstream name"
    );
    h.wait_records(1).await;
    let rec = &h.records()[0];
    assert_eq!((rec.prompt_tokens, rec.completion_tokens), (7, 5));
    assert_eq!(rec.usage_source, "upstream");
    // 7 * 500e6 / 1e6 = 3500, 5 * 1500e6 / 1e6 = 7500
    assert_eq!(rec.cost, 11_000);
    assert_eq!(rec.status, 200);
    assert_eq!(rec.error_code, "");
    assert_eq!(rec.model_served, "mock-gpt");
    assert_eq!(rec.provider, "prov_test");
    assert_eq!(rec.streamed, 0);
    assert_eq!(rec.attempts, 1);
    assert_eq!(rec.user_agent, "spec-test/1.0");
    assert_eq!(rec.source_ip, "127.0.0.1");
    assert!(rec.ts > 1_700_000_000_000_000);
    assert_eq!(
        h.engine.org_spend(),
        vec![
            ("org_off".to_owned(), 0, 0),
            ("org_poor".to_owned(), 0, 0),
            ("org_rich".to_owned(), 11_000, 0),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_usage_is_estimated() {
    let h = Gateway::start();
    let r = h
        .chat(
            "hello there",
            json!({"mock": {"chunks": 3, "usage": false}}),
        )
        .await;
    assert_eq!(r.status, 200);
    h.wait_records(1).await;
    let rec = &h.records()[0];
    assert_eq!(rec.usage_source, "estimated");
    assert_eq!(
        rec.prompt_tokens as usize,
        4 + onetoken_gateway::tokens::count("hello there")
    );
    assert_eq!(
        rec.completion_tokens as usize,
        onetoken_gateway::tokens::count("tok tok tok ")
    );
    assert!(rec.cost > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_and_model_list() {
    let h = Gateway::start();
    let r = h.embed("ot-embed-only", "abc").await;
    assert_eq!(r.status, 200);
    let models = call(
        h.addr,
        request("GET", "/v1/models", Some("ot-embed-only"), ""),
    )
    .await;
    assert_eq!(models.status, 200);
    let ids = models.model_ids();
    assert_eq!(ids, vec!["demo-embed"]);
    let all = call(h.addr, request("GET", "/v1/models", Some("ot-good"), "")).await;
    assert_eq!(all.json()["data"].as_array().unwrap().len(), 2);
    h.wait_records(3).await;
    let recs = h.records();
    assert_eq!(recs[0].path, "/v1/embeddings");
    assert_eq!(recs[0].prompt_tokens, 7);
    assert_eq!(recs[0].cost, 140); // 7 * 20e6 / 1e6
    assert_eq!(recs[1].path, "/v1/models");
}

/// Read SSE frames until `[DONE]` or the end; returns (events text, frames seen).
async fn read_stream(resp: http::Response<hyper::body::Incoming>) -> String {
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(body.to_vec()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_is_relayed_chunk_by_chunk() {
    let h = Gateway::start();
    let resp = h.open_stream(json!({"chunks": 5, "delay_ms": 150})).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.into_body();
    let first = loop {
        let f = body.frame().await.unwrap().unwrap();
        if let Ok(d) = f.into_data() {
            break d;
        }
    };
    assert!(first.starts_with(b"data: {"));
    let sent = h.upstream().chunks_sent();
    assert!(
        sent < 5,
        "first chunk arrived after {sent} of 5 upstream chunks: the relay buffered"
    );
    let rest = body.collect().await.unwrap().to_bytes();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&first),
        String::from_utf8_lossy(&rest)
    );
    assert!(all.ends_with("data: [DONE]\n\n"));
    assert!(
        !all.contains("\"usage\""),
        "usage chunk stripped when the client did not ask for it"
    );
    let sent_body = h.upstream().state.last_body.lock().clone().unwrap();
    assert_eq!(
        sent_body["stream_options"]["include_usage"], true,
        "relay asks for usage"
    );
    h.wait_records(1).await;
    let rec = &h.records()[0];
    assert_eq!(rec.streamed, 1);
    assert_eq!(rec.usage_source, "upstream");
    assert_eq!(rec.completion_tokens, 5);
    assert_eq!(rec.status, 200);
    assert!(rec.latency_us >= rec.ttfb_us);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_keeps_usage_when_the_client_asked() {
    let h = Gateway::start();
    let req = chat_request(
        "ot-good",
        chat(
            "hi",
            json!({"stream": true, "stream_options": {"include_usage": true}, "mock": {"chunks": 2}}),
        ),
    );
    let all = read_stream(open(h.addr, req).await).await;
    assert!(all.contains("\"choices\":[]"), "usage-only chunk kept");
    assert!(all.contains("\"usage\""));
    assert!(all.ends_with("data: [DONE]\n\n"));
    h.wait_records(1).await;
    assert_eq!(h.records()[0].usage_source, "upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_error_is_not_echoed_and_not_charged() {
    let h = Gateway::start();
    let r = h
        .chat(CANARY, json!({"mock": {"status": 500, "echo": true}}))
        .await;
    assert_eq!(r.status, 500);
    let e = r.json();
    assert_eq!(
        e["error"]["code"], "upstream_error",
        "an upstream code that is not an identifier is dropped"
    );
    assert_eq!(
        e["error"]["type"], "server_error",
        "identifier-shaped type is kept"
    );
    let s = h
        .chat(
            CANARY,
            json!({"stream": true, "mock": {"status": 429, "echo": true}}),
        )
        .await;
    assert_eq!(s.status, 429);
    h.wait_records(2).await;
    let recs = h.records();
    for rec in &recs {
        assert_eq!(rec.cost, 0);
        assert_eq!(rec.usage_source, "none");
        assert_eq!(rec.error_code, "upstream_error");
        // 500 and 429 are retried (default routing: 3 attempts) before anything is sent.
        assert_eq!(rec.attempts, 3);
    }
    assert_eq!(recs[0].status, 500);
    assert_eq!(
        h.engine
            .org_spend()
            .iter()
            .find(|o| o.0 == "org_rich")
            .unwrap(),
        &("org_rich".to_owned(), 0, 0)
    );
    h.assert_no_canary(&recs, &[&r, &s]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_stream_is_recorded_with_estimated_usage() {
    let h = Gateway::start();
    let resp = h.open_chat(Some("ot-good"), chat(CANARY, json!({"stream": true, "mock": {"chunks": 6, "cut_after": 3, "echo": true, "delay_ms": 20}}))).await;
    assert_eq!(resp.status(), 200);
    let all = read_stream(resp).await;
    assert!(!all.contains("[DONE]"));
    assert!(
        all.contains("upstream_stream_cut"),
        "the client is told the stream broke"
    );
    h.wait_records(1).await;
    let recs = h.records();
    let rec = &recs[0];
    assert_eq!(rec.error_code, "upstream_stream_cut");
    assert_eq!(rec.status, 200);
    assert_eq!(rec.usage_source, "estimated");
    // Exactly what the client received is charged.
    let relayed: usize = all
        .split("\n\n")
        .filter_map(|ev| ev.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(onetoken_gateway::tokens::count)
        })
        .sum();
    assert!(relayed > 0);
    assert_eq!(rec.completion_tokens as usize, relayed);
    assert!(rec.cost > 0);
    assert_eq!(
        h.engine
            .org_spend()
            .iter()
            .find(|o| o.0 == "org_rich")
            .unwrap()
            .2,
        0
    );
    h.assert_no_canary(&recs, &[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_mid_stream_leaves_one_499_record() {
    let h = Gateway::start();
    let resp = h
        .open_chat(
            Some("ot-good"),
            chat(
                CANARY,
                json!({"stream": true, "mock": {"chunks": 50, "delay_ms": 20}}),
            ),
        )
        .await;
    let mut body = resp.into_body();
    let _first = body.frame().await.unwrap().unwrap();
    drop(body);
    h.wait_records(1).await;
    let recs = h.records();
    assert_eq!(recs.len(), 1);
    let rec = &recs[0];
    assert_eq!(rec.status, 499);
    assert_eq!(rec.error_code, "client_disconnected");
    assert_eq!(rec.usage_source, "estimated");
    assert!(rec.completion_tokens >= 1 && rec.completion_tokens < 50);
    assert!(rec.cost > 0);
    let sent = h.upstream().chunks_sent();
    // The behaviour under test: over this window a live upstream request would send ten
    // more chunks; a cancelled one sends none.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let later = h.upstream().chunks_sent();
    assert!(
        later <= sent + 2,
        "upstream request was cancelled ({sent} -> {later})"
    );
    h.assert_no_canary(&recs, &[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_unreachable_and_timeout() {
    let h = Gateway::start();
    // A port with nothing listening.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut snap = spec_snapshot(2, dead, 1_000_000_000);
    h.engine.load_snapshot(snap.to_string().as_bytes()).unwrap();
    let r = h.ask("ot-good", CANARY).await;
    assert_eq!(r.status, 502);
    assert_eq!(r.json()["error"]["code"], "upstream_unreachable");

    snap = spec_snapshot(3, h.upstream().addr, 1_000_000_000);
    snap["providers"][0]["first_byte_timeout_ms"] = json!(100);
    h.engine.load_snapshot(snap.to_string().as_bytes()).unwrap();
    let t = h.chat(CANARY, json!({"mock": {"latency_ms": 1000}})).await;
    assert_eq!(t.status, 504);
    assert_eq!(t.json()["error"]["code"], "upstream_timeout");
    h.wait_records(2).await;
    let recs = h.records();
    assert!(recs.iter().all(|r| r.cost == 0));
    h.assert_no_canary(&recs, &[&r, &t]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_one_record_per_request_under_concurrency() {
    let h = Gateway::start();
    let mut tasks = Vec::new();
    for i in 0..40 {
        let addr = h.addr;
        tasks.push(tokio::spawn(async move {
            let key = if i % 4 == 0 {
                Some("ot-unknown")
            } else {
                Some("ot-good")
            };
            let stream = i % 2 == 1;
            let r = post(
                addr,
                CHAT,
                key,
                chat("count me", json!({"stream": stream, "mock": {"chunks": 3}})),
            )
            .await;
            r.headers["x-request-id"].to_str().unwrap().to_owned()
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await.unwrap());
    }
    h.wait_records(40).await;
    let recs = h.records();
    assert_eq!(recs.len(), 40);
    let mut rec_ids: Vec<String> = recs.iter().map(|r| r.request_id.clone()).collect();
    rec_ids.sort();
    ids.sort();
    assert_eq!(rec_ids, ids);
    let spent: i64 = recs.iter().map(|r| r.cost).sum();
    let org = h
        .engine
        .org_spend()
        .into_iter()
        .find(|o| o.0 == "org_rich")
        .unwrap();
    assert_eq!(org.1, spent, "ledger and records reconcile");
    assert_eq!(org.2, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_stop_lets_an_in_flight_stream_finish() {
    let h = Gateway::start();
    let resp = h.open_stream(json!({"chunks": 6, "delay_ms": 50})).await;
    assert_eq!(resp.status(), 200);
    let reader = tokio::spawn(read_stream(resp));
    let engine = std::sync::Arc::new(h.engine);
    let e2 = engine.clone();
    let stopper = tokio::task::spawn_blocking(move || e2.stop(Duration::from_secs(5)));
    let all = reader.await.unwrap();
    stopper.await.unwrap();
    assert!(
        all.ends_with("data: [DONE]\n\n"),
        "stream completed during the drain"
    );
    assert!(!engine.running());
    let recs = journal_records(&h.spool.0, engine.instance_id());
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].status, 200);
    assert_eq!(recs[0].error_code, "");
    assert!(
        tokio::net::TcpStream::connect(h.addr).await.is_err(),
        "listener closed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_after_the_configured_grace_cancels_and_still_records() {
    let h = Gateway::custom(|c| c["shutdown_grace_ms"] = json!(200), |_| {});
    let resp = h.open_stream(json!({"chunks": 100, "delay_ms": 50})).await;
    let reader =
        tokio::spawn(async move { resp.into_body().collect().await.map(|c| c.to_bytes()) });
    let engine = std::sync::Arc::new(h.engine);
    let e2 = engine.clone();
    let started = std::time::Instant::now();
    tokio::task::spawn_blocking(move || e2.drain())
        .await
        .unwrap();
    // The stream would run 5 s: the grace of 200 ms, not the default 10 s, ended it.
    assert!(started.elapsed() < Duration::from_secs(3));
    let _ = reader.await;
    let recs = journal_records(&h.spool.0, engine.instance_id());
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].error_code, "shutting_down");
    assert_eq!(engine.stats().in_flight, 0);
}

/// Whole responses carry their record in the body: one record per response on a
/// keep-alive connection, committed after the response, and a client that goes away
/// before its answer still leaves exactly one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_responses_leave_exactly_one_record_each() {
    let h = Gateway::start();
    let mut sender = connect(h.addr).await;
    let mut ids = Vec::new();
    for _ in 0..15 {
        let req = chat_request("ot-good", chat("hi", json!({})));
        // The connection takes the next request only once it has finished the last
        // response, which may be after its body was read here.
        sender.ready().await.unwrap();
        let resp = sender.send_request(req).await.unwrap();
        ids.push(resp.headers()["x-request-id"].to_str().unwrap().to_owned());
        resp.into_body().collect().await.unwrap();
    }
    // Refused before the body is read: each closes its connection, so one each.
    for _ in 0..5 {
        let r = h.ask("ot-unknown", "hi").await;
        assert_eq!(r.status, 401);
        ids.push(r.headers["x-request-id"].to_str().unwrap().to_owned());
    }
    h.wait_records(20).await;
    let recs = h.records();
    let got: Vec<&str> = recs.iter().map(|r| r.request_id.as_str()).collect();
    assert_eq!(got, ids, "one record per response, in request order");
    for (i, r) in recs.iter().enumerate() {
        assert_eq!(r.status, if i < 15 { 200 } else { 401 });
        assert!(r.latency_us >= r.ttfb_us);
    }
    assert_eq!(h.engine.stats().in_flight, 0);

    // Gone before the upstream answers: the request is dropped with its body unsent.
    let req = chat_request("ot-good", chat("hi", json!({"mock": {"latency_ms": 300}})));
    let forwarded = h.upstream().requests() + 1;
    let pending = tokio::spawn(open(h.addr, req));
    assert!(wait_until_async(WAIT, || h.upstream().requests() >= forwarded).await);
    pending.abort();
    let _ = pending.await;
    h.wait_records(21).await;
    // The behaviour under test: past the upstream's 300 ms answer, the dropped request
    // still has its one record and no second one.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let recs = h.records();
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].status, 499);
    assert_eq!(recs[0].error_code, "client_disconnected");
    assert_eq!(h.engine.stats().records_total, 21);
    let metrics = h.engine.metrics_text();
    assert!(metrics.contains("onetoken_in_flight_requests 0"));
    for name in [
        "onetoken_journal_segments_total 1",
        "onetoken_journal_errors_total 0",
    ] {
        assert!(metrics.contains(name), "{name}");
    }
}

/// A refusal before the body is read must tell HTTP/1.1 clients the connection closes, or
/// a keep-alive client sends its next request on a connection the server has dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_refusals_close_the_connection_and_successes_keep_it() {
    let h = Gateway::start();
    let body = chat("hello", json!({})).to_string();
    let refused = h.ask("ot-unknown", "hello").await;
    assert_eq!(refused.status, 401);
    assert_eq!(refused.headers["connection"], "close");

    // Two requests on one connection: the success leaves it open for the second.
    let mut sender = connect(h.addr).await;
    for _ in 0..2 {
        let resp = sender
            .send_request(request("POST", CHAT, Some("ot-good"), body.clone()))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert!(!resp.headers().contains_key("connection"));
        resp.into_body().collect().await.unwrap();
        sender.ready().await.unwrap();
    }
}
