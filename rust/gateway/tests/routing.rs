//! Routing specs: fallback and retries before the first byte only, circuit breakers,
//! provider concurrency limits, strategies and aliases, data-handling policies and org
//! scoping, and the snapshot v2 contract for providers, deployments, routes and routing.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod harness;

use std::time::Duration;

use harness::*;
use http_body_util::Full;
use onetoken_gateway::{validate_snapshot, Engine, Error};
use onetoken_mock_upstream::MockDefaults;
use serde_json::{json, Value};

/// Prompt "hi there" is 6 mock tokens (2 words + 4), the default reply 8.
const PROMPT: u64 = 6;
const COMPLETION: u64 = 8;

fn cost(tokens: u64, price: i64) -> i64 {
    ((i128::from(tokens) * i128::from(price) + 999_999) / 1_000_000) as i64
}

fn fast_routing(extra: Value) -> Value {
    let mut r = json!({"max_attempts": 3, "retry_deadline_ms": 5000, "backoff_ms": 1,
                       "breaker_failures": 100, "breaker_open_ms": 1000});
    merge(&mut r, extra);
    json!({"routing": r})
}

fn two_deployments(primary: Value, secondary: Value, routing: Value) -> Value {
    snapshot(
        1,
        vec![primary, secondary],
        vec![
            deployment(
                "m",
                "prov_a",
                "up-a",
                1_000_000_000,
                2_000_000_000,
                json!({"priority": 0}),
            ),
            deployment(
                "m",
                "prov_b",
                "mock-gpt",
                3_000_000_000,
                4_000_000_000,
                json!({"priority": 1}),
            ),
        ],
        routing,
        json!({}),
        json!({}),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_failing_before_the_first_byte_falls_back_with_one_record() {
    let secondary = mock();
    let s500 = Scripted::start(500);
    let s429 = Scripted::start(429);
    let cases = [
        ("500", openai("prov_a", s500.addr, json!({}))),
        ("429", openai("prov_a", s429.addr, json!({}))),
        ("refused", openai("prov_a", dead_addr(), json!({}))),
    ];
    for (what, primary) in cases {
        let fleet = Gateway::serving(two_deployments(
            primary,
            openai("prov_b", secondary.addr(), json!({})),
            fast_routing(json!({})),
        ));
        let mut replies = Vec::new();
        for stream in [false, true] {
            let body = chat_body("m", &format!("hi {CANARY}"), json!({"stream": stream}));
            let r = post_chat(fleet.addr, body).await;
            assert_eq!(r.status, 200, "{what} stream={stream}: {}", r.text());
            replies.push(r);
        }
        let recs = fleet.take_records(2).await;
        assert_eq!(recs.len(), 2, "{what}: one record per request");
        for rec in &recs {
            assert_eq!(rec.attempts, 2, "{what}");
            assert_eq!(rec.provider, "prov_b", "{what}");
            assert_eq!(rec.model_served, "mock-gpt", "{what}");
            assert_eq!(rec.status, 200);
            assert_eq!(rec.usage_source, "upstream");
            // Billed at the prices of the deployment that served.
            assert_eq!(
                rec.cost,
                cost(PROMPT, 3_000_000_000) + cost(COMPLETION, 4_000_000_000),
                "{what}"
            );
        }
        let refs: Vec<&Reply> = replies.iter().collect();
        fleet.assert_no_canary(&recs, &refs);
    }
    assert_eq!(s500.hits(), 2);
    assert_eq!(s429.hits(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_attempt_failing_returns_the_last_error_uncharged() {
    let s500 = Scripted::start(500);
    let fleet = Gateway::serving(two_deployments(
        openai("prov_a", s500.addr, json!({})),
        openai("prov_b", dead_addr(), json!({})),
        fast_routing(json!({})),
    ));
    let r = post_chat(fleet.addr, chat_body("m", CANARY, json!({}))).await;
    // Primary 500, secondary refused, primary again after a backoff: 500.
    assert_eq!(r.status, 500);
    assert_eq!(r.json()["error"]["code"], "upstream_error");
    let recs = fleet.take_records(1).await;
    assert_eq!(recs[0].attempts, 3);
    assert_eq!(recs[0].provider, "prov_a");
    assert_eq!(recs[0].cost, 0);
    assert_eq!(recs[0].usage_source, "none");
    assert_eq!(s500.hits(), 2);
    fleet.assert_no_canary(&recs, &[&r]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_cut_after_the_first_byte_is_not_retried() {
    let (a, b) = (mock(), mock());
    let fleet = Gateway::serving(two_deployments(
        openai("prov_a", a.addr(), json!({})),
        openai("prov_b", b.addr(), json!({})),
        fast_routing(json!({})),
    ));
    let r = cut_stream(fleet.addr, "m").await;
    assert_eq!(r.status, 200);
    let events = r.events();
    assert_eq!(
        events.len(),
        3,
        "two chunks, then the gateway's error event"
    );
    assert_eq!(events[2].1["error"]["code"], "upstream_stream_cut");
    let recs = fleet.take_records(1).await;
    assert_eq!(recs[0].attempts, 1);
    assert_eq!(recs[0].provider, "prov_a");
    assert_eq!(recs[0].error_code, "upstream_stream_cut");
    assert_eq!(recs[0].usage_source, "estimated");
    assert_eq!(b.request_count(), 0, "never retried elsewhere");
    assert_eq!(a.request_count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_breaker_opens_after_consecutive_failures_and_recovers() {
    let primary = Scripted::start(500);
    let secondary = mock();
    let fleet = Gateway::serving(two_deployments(
        openai("prov_a", primary.addr, json!({})),
        openai("prov_b", secondary.addr(), json!({})),
        fast_routing(json!({"max_attempts": 1, "breaker_failures": 2, "breaker_open_ms": 300})),
    ));
    let body = chat_body("m", "hi there", json!({}));
    for _ in 0..2 {
        assert_eq!(post_chat(fleet.addr, body.clone()).await.status, 500);
    }
    // Open: the primary is skipped without being called.
    let r = post_chat(fleet.addr, body.clone()).await;
    assert_eq!(r.status, 200);
    assert_eq!(primary.hits(), 2);
    primary.set(200);
    assert_eq!(post_chat(fleet.addr, body.clone()).await.status, 200);
    assert_eq!(primary.hits(), 2, "still open before breaker_open_ms");
    // The behaviour under test: the breaker stays open for breaker_open_ms.
    tokio::time::sleep(Duration::from_millis(350)).await;
    // Half-open: one probe goes to the primary; it succeeds and closes the circuit.
    for _ in 0..2 {
        assert_eq!(post_chat(fleet.addr, body.clone()).await.status, 200);
    }
    assert_eq!(primary.hits(), 4);
    let recs = fleet.take_records(6).await;
    let served: Vec<&str> = recs.iter().map(|r| r.provider.as_str()).collect();
    assert_eq!(
        served,
        ["prov_a", "prov_a", "prov_b", "prov_b", "prov_a", "prov_a"]
    );
    assert!(recs.iter().all(|r| r.attempts == 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_at_max_concurrency_is_skipped_or_refused_with_429() {
    let (a, b) = (mock(), mock());
    let snap = snapshot(
        1,
        vec![
            openai("prov_a", a.addr(), json!({"max_concurrency": 1})),
            openai("prov_b", b.addr(), json!({})),
        ],
        vec![
            deployment("solo", "prov_a", "mock-gpt", 1, 1, json!({})),
            deployment("duo", "prov_a", "mock-gpt", 1, 1, json!({"priority": 0})),
            deployment("duo", "prov_b", "mock-gpt", 1, 1, json!({"priority": 1})),
        ],
        fast_routing(json!({})),
        json!({}),
        json!({}),
    );
    let fleet = Gateway::serving(snap);
    // Hold prov_a's only slot with a slow stream (headers received, body pending).
    let mut sender = connect(fleet.addr).await;
    let held = sender
        .send_request(
            http::Request::builder()
                .method("POST")
                .uri("/v1/chat/completions")
                .header("host", "gw")
                .header("authorization", "Bearer ot-a")
                .body(Full::new(bytes::Bytes::from(
                    chat_body(
                        "solo",
                        "hi",
                        json!({"stream": true, "mock": {"chunks": 4, "delay_ms": 150}}),
                    )
                    .to_string(),
                )))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(held.status(), 200);
    let busy = fleet.ask_model("solo").await;
    assert_eq!(busy.status, 429);
    assert_eq!(busy.json()["error"]["code"], "upstream_busy");
    let other = fleet.ask_model("duo").await;
    assert_eq!(other.status, 200);
    drop(held);
    drop(sender);
    // The slot is released when the stream ends (here: the client went away).
    let solo = chat_body("solo", "hi", json!({}));
    let released = wait_for(WAIT, || async {
        post_chat(fleet.addr, solo.clone()).await.status == 200
    })
    .await;
    assert!(released, "slot released");
    let recs = fleet.take_records(4).await;
    let busy_rec = recs
        .iter()
        .find(|r| r.error_code == "upstream_busy")
        .unwrap();
    assert_eq!(busy_rec.attempts, 0);
    let duo = recs.iter().find(|r| r.model_requested == "duo").unwrap();
    assert_eq!((duo.provider.as_str(), duo.attempts), ("prov_b", 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strategies_order_deployments_and_aliases_resolve() {
    let (a, b) = (mock(), mock());
    let slow = mock_with(MockDefaults {
        latency_ms: 40,
        ..MockDefaults::default()
    });
    let snap = snapshot(
        1,
        vec![
            openai("prov_a", a.addr(), json!({})),
            openai("prov_b", b.addr(), json!({})),
            openai("prov_slow", slow.addr(), json!({})),
        ],
        vec![
            deployment(
                "cheap",
                "prov_a",
                "mock-gpt",
                9_000_000_000,
                9_000_000_000,
                json!({}),
            ),
            deployment(
                "cheap",
                "prov_b",
                "mock-gpt",
                1_000_000_000,
                1_000_000_000,
                json!({"priority": 5}),
            ),
            deployment("weighted", "prov_a", "mock-gpt", 1, 1, json!({"weight": 0})),
            deployment("weighted", "prov_b", "mock-gpt", 1, 1, json!({"weight": 1})),
            deployment("fast", "prov_slow", "mock-gpt", 1, 1, json!({})),
            deployment("fast", "prov_b", "mock-gpt", 1, 1, json!({"priority": 1})),
        ],
        json!({"routes": [
            {"name": "cheap", "strategy": "lowest_price", "aliases": ["bargain"]},
            {"name": "weighted", "strategy": "weighted"},
            {"name": "fast", "strategy": "lowest_latency"}
        ]}),
        json!({}),
        json!({}),
    );
    let fleet = Gateway::serving(snap);
    for model in ["cheap", "bargain"] {
        assert_eq!(fleet.ask_model(model).await.status, 200);
    }
    for _ in 0..8 {
        assert_eq!(fleet.ask_model("weighted").await.status, 200);
    }
    for _ in 0..6 {
        assert_eq!(fleet.ask_model("fast").await.status, 200);
    }
    let recs = fleet.take_records(16).await;
    assert_eq!(recs[0].provider, "prov_b", "lowest price first");
    assert_eq!(
        (recs[1].provider.as_str(), recs[1].model_requested.as_str()),
        ("prov_b", "bargain")
    );
    assert!(
        recs[2..10].iter().all(|r| r.provider == "prov_b"),
        "weight 0 never first"
    );
    // Both unmeasured deployments are tried first, then the faster one keeps winning.
    let fast: Vec<&str> = recs[10..].iter().map(|r| r.provider.as_str()).collect();
    assert!(fast[2..].iter().all(|p| *p == "prov_b"), "{fast:?}");
    // `/v1/models` lists names and aliases.
    let models = get(
        fleet.addr,
        "/v1/models",
        &[("authorization", "Bearer ot-a")],
    )
    .await;
    let ids = models.model_ids();
    assert_eq!(ids, ["cheap", "weighted", "fast", "bargain"]);
}

/// Providers with different data-handling attributes, all serving "chat".
fn policy_snapshot(
    version: u64,
    addrs: [std::net::SocketAddr; 3],
    org: Value,
    key: Value,
) -> Value {
    snapshot(
        version,
        vec![
            openai(
                "p_us",
                addrs[0],
                json!({"vendor": "openai", "region": "us", "zero_retention": true}),
            ),
            openai(
                "p_cn",
                addrs[1],
                json!({"vendor": "Alibaba", "region": "cn-mainland", "trains_on_data": true}),
            ),
            openai(
                "p_eu",
                addrs[2],
                json!({"vendor": "mistral", "region": "eu", "retains_content": true}),
            ),
        ],
        vec![
            deployment("chat", "p_us", "gpt-x", 1, 1, json!({"priority": 0})),
            deployment("chat", "p_cn", "qwen-x", 1, 1, json!({"priority": 1})),
            deployment("chat", "p_eu", "mistral-x", 1, 1, json!({"priority": 2})),
            deployment("private", "p_us", "gpt-x", 1, 1, json!({"org_id": "org_b"})),
        ],
        json!({}),
        org,
        key,
    )
}

async fn model_ids(fleet: &Gateway, key: &str) -> Vec<String> {
    let auth = format!("Bearer {key}");
    let r = get(
        fleet.addr,
        "/v1/models",
        &[("authorization", auth.as_str())],
    )
    .await;
    r.model_ids()
}

/// `/v1/models` tells a developer who would process each name for this key: the vendor,
/// region and data-handling flags of the providers both policies permit, nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_list_names_the_processors_the_policies_permit() {
    let ups = [mock(), mock(), mock()];
    let addrs = [ups[0].addr(), ups[1].addr(), ups[2].addr()];
    let processors = |fleet: &Gateway, key: &'static str| {
        let addr = fleet.addr;
        async move {
            let auth = format!("Bearer {key}");
            let r = get(addr, "/v1/models", &[("authorization", auth.as_str())]).await;
            let v = r.json();
            let chat = v["data"]
                .as_array()
                .unwrap()
                .iter()
                .find(|m| m["id"] == "chat")
                .cloned()
                .unwrap();
            chat["processors"].clone()
        }
    };
    let us = json!({"vendor": "openai", "region": "us", "trains_on_data": false, "zero_retention": true});
    let cn = json!({"vendor": "alibaba", "region": "cn-mainland", "trains_on_data": true, "zero_retention": false});
    let eu = json!({"vendor": "mistral", "region": "eu", "trains_on_data": false, "zero_retention": false});
    // The default org policy: the provider that trains is not among them.
    let fleet = Gateway::serving(policy_snapshot(1, addrs, json!({}), json!({})));
    assert_eq!(processors(&fleet, "ot-a").await, json!([us, eu]));
    assert_eq!(processors(&fleet, "ot-b").await, json!([us, eu]), "no policy at all");
    // Lifted by the org, narrowed by the key.
    let snap = policy_snapshot(2, addrs, json!({"no_training": false}), json!({"deny_regions": ["us"]}));
    fleet.engine.load_snapshot(snap.to_string().as_bytes()).unwrap();
    assert_eq!(processors(&fleet, "ot-a").await, json!([cn, eu]));
    assert_eq!(processors(&fleet, "ot-b").await, json!([us, eu]), "org_b unaffected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_policy_kind_blocks_exactly_its_providers_and_models_agree() {
    let ups = [mock(), mock(), mock()];
    let addrs = [ups[0].addr(), ups[1].addr(), ups[2].addr()];
    let fleet = Gateway::serving(policy_snapshot(1, addrs, json!({}), json!({})));
    // (org policy, key policy) → provider that serves, or the 403 message.
    let cases: Vec<(Value, Value, Result<&str, &str>)> = vec![
        (json!({}), json!({}), Ok("p_us")),
        (
            json!({"allow_regions": ["cn-mainland"], "no_training": false}),
            json!({}),
            Ok("p_cn"),
        ),
        // An org that never lifted no_training is not served by a provider that trains,
        // whatever else its policy says (the refusal names the first deployment's rule).
        (
            json!({"allow_regions": ["cn-mainland"]}),
            json!({}),
            Err("org policy: region not allowed"),
        ),
        (json!({"deny_vendors": ["OpenAI"]}), json!({}), Ok("p_eu")),
        (
            json!({"deny_vendors": ["OpenAI"], "no_training": false}),
            json!({}),
            Ok("p_cn"),
        ),
        (json!({"allow_vendors": ["mistral"]}), json!({}), Ok("p_eu")),
        (
            json!({"deny_regions": ["us"], "no_training": true}),
            json!({}),
            Ok("p_eu"),
        ),
        (json!({"zero_retention_only": true}), json!({}), Ok("p_us")),
        (
            json!({"deny_models": ["gpt-x"], "no_training": false}),
            json!({}),
            Ok("p_cn"),
        ),
        (
            json!({"allow_regions": ["us", "cn-mainland"], "no_training": false}),
            json!({"deny_regions": ["us"]}),
            Ok("p_cn"),
        ),
        // A key cannot lift its org's no_training.
        (
            json!({"allow_regions": ["cn-mainland"]}),
            json!({"no_training": false}),
            Err("org policy: region not allowed"),
        ),
        (
            json!({"allow_regions": ["xx"]}),
            json!({}),
            Err("org policy: region not allowed"),
        ),
        (
            json!({"allow_models": ["other"]}),
            json!({}),
            Err("org policy: model not allowed"),
        ),
        (
            json!({"deny_vendors": ["openai", "mistral"], "no_training": true}),
            json!({}),
            Err("org policy: vendor not allowed"),
        ),
        (
            json!({"allow_regions": ["cn-mainland"], "no_training": false}),
            json!({"zero_retention_only": true}),
            Err("key policy: zero_retention_only (provider is not zero-retention)"),
        ),
        (
            json!({}),
            json!({"deny_models": ["chat"]}),
            Err("key policy: model not allowed"),
        ),
    ];
    let mut version = 1;
    for (org, key, want) in cases {
        version += 1;
        let snap = policy_snapshot(version, addrs, org.clone(), key.clone());
        fleet
            .engine
            .load_snapshot(snap.to_string().as_bytes())
            .unwrap();
        let before: u64 = ups.iter().map(|u| u.request_count()).sum();
        let r = fleet.ask_model("chat").await;
        let listed = model_ids(&fleet, "ot-a").await.contains(&"chat".to_owned());
        let recs = fleet.take_records(0).await;
        let rec = recs
            .iter()
            .find(|r| r.path == "/v1/chat/completions")
            .unwrap();
        match want {
            Ok(provider) => {
                assert_eq!(r.status, 200, "{org} {key}: {}", r.text());
                assert_eq!(rec.provider, provider, "{org} {key}");
                assert!(listed, "{org} {key}: listed");
            }
            Err(message) => {
                assert_eq!(r.status, 403, "{org} {key}");
                let e = r.json();
                assert_eq!(e["error"]["code"], "policy_denied");
                assert_eq!(e["error"]["message"], message, "{org} {key}");
                assert_eq!((rec.error_code, rec.attempts), ("policy_denied", 0));
                let after: u64 = ups.iter().map(|u| u.request_count()).sum();
                assert_eq!(after, before, "nothing forwarded");
                assert!(!listed, "{org} {key}: not listed");
            }
        }
        // The other org is never affected by org_a's policies.
        let b = send_as(fleet.addr, "ot-b", CHAT, chat_body("chat", "hi", json!({}))).await;
        assert_eq!(b.status, 200);
        let _ = fleet.take_records(0).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn org_scoped_deployments_are_invisible_to_other_orgs() {
    let ups = [mock(), mock(), mock()];
    let fleet = Gateway::serving(policy_snapshot(
        1,
        [ups[0].addr(), ups[1].addr(), ups[2].addr()],
        json!({}),
        json!({}),
    ));
    let a = fleet.ask_model("private").await;
    assert_eq!(a.status, 404);
    assert_eq!(a.json()["error"]["code"], "model_not_found");
    let b = send_as(
        fleet.addr,
        "ot-b",
        CHAT,
        chat_body("private", "hi", json!({})),
    )
    .await;
    assert_eq!(b.status, 200);
    assert!(!model_ids(&fleet, "ot-a")
        .await
        .contains(&"private".to_owned()));
    assert!(model_ids(&fleet, "ot-b")
        .await
        .contains(&"private".to_owned()));
}

fn bare_engine() -> Engine {
    let dir =
        std::env::temp_dir().join(format!("onetoken-contract-{:016x}", rand::random::<u64>()));
    Engine::new(engine_config(dir.to_str().unwrap())).unwrap()
}

#[test]
fn snapshot_v2_providers_deployments_routes_and_routing() {
    let engine = bare_engine();
    assert_eq!(
        engine
            .load_snapshot(&fixture("snapshot_full.json"))
            .unwrap(),
        2
    );
    // Unknown fields are refused, naming the field, in every new object.
    assert_unknown_fields_refused(
        &engine,
        "snapshot_full.json",
        10,
        &[
            "/providers/0",
            "/models/0",
            "/routes/0",
            "/routing",
            "/orgs/0/policy",
            "/keys/0/policy",
        ],
    );
    // Semantic checks: the entry at fault is left out and reported (kind, id, field,
    // reason); the rest of the snapshot serves.
    type Patch = Box<dyn Fn(&mut Value)>;
    type Reported = (&'static str, &'static str, &'static str, &'static str);
    let cases: Vec<(&str, Patch, Vec<Reported>)> = vec![
        (
            "protocol",
            Box::new(|v| v["providers"][0]["protocol"] = json!("grpc")),
            vec![
                ("provider", "prov_primary", "protocol", "unknown_protocol"),
                ("model", "demo-chat", "provider_id", "unknown_provider"),
                ("model", "demo-embed", "provider_id", "unknown_provider"),
            ],
        ),
        (
            "base_url",
            Box::new(|v| v["providers"][1]["base_url"] = json!("https://x.test/<v1>")),
            vec![
                ("provider", "prov_claude", "base_url", "invalid_url"),
                ("model", "demo-chat", "provider_id", "unknown_provider"),
            ],
        ),
        (
            "route name",
            Box::new(|v| v["routes"][0]["name"] = json!("nope")),
            vec![("route", "nope", "name", "unknown_model")],
        ),
        (
            "alias clash",
            Box::new(|v| v["routes"][0]["aliases"] = json!(["demo-embed"])),
            vec![("alias", "demo-embed", "aliases", "name_taken")],
        ),
        (
            "embedding on anthropic",
            Box::new(|v| v["models"][2]["provider_id"] = json!("prov_claude")),
            vec![("model", "demo-embed", "kind", "not_served_by_protocol")],
        ),
        (
            "mixed kinds",
            Box::new(|v| v["models"][1]["kind"] = json!("embedding")),
            vec![("model", "demo-chat", "kind", "not_served_by_protocol")],
        ),
        (
            "mixed kinds on one protocol",
            Box::new(|v| v["models"][2]["name"] = json!("demo-chat")),
            vec![("model", "demo-chat", "kind", "kind_mismatch")],
        ),
        (
            "negative request price",
            Box::new(|v| v["models"][0]["request_price"] = json!(-1)),
            vec![("model", "demo-chat", "request_price", "negative_price")],
        ),
    ];
    for (i, (what, patch, expected)) in cases.into_iter().enumerate() {
        let version = 11 + i as u64;
        let mut v: Value = serde_json::from_slice(&fixture("snapshot_full.json")).unwrap();
        v["version"] = Value::from(version);
        patch(&mut v);
        assert_eq!(
            engine.load_snapshot(v.to_string().as_bytes()).unwrap(),
            version,
            "{what}"
        );
        let got: Vec<_> = engine
            .snapshot_dropped()
            .into_iter()
            .map(|d| (d.kind, d.id, d.field, d.reason))
            .collect();
        let expected: Vec<_> = expected
            .into_iter()
            .map(|(k, id, f, r)| (k, id.to_owned(), f, r))
            .collect();
        assert_eq!(got, expected, "{what}");
        assert_eq!(
            validate_snapshot(v.to_string().as_bytes()).unwrap(),
            engine.snapshot_dropped(),
            "{what}: the validator applies the engine's rules"
        );
    }
    assert!(engine
        .metrics_text()
        .contains("onetoken_snapshot_dropped_entries 1\n"));
    // An unknown strategy does not parse: the whole document is refused, naming it.
    let mut v: Value = serde_json::from_slice(&fixture("snapshot_full.json")).unwrap();
    v["version"] = Value::from(99);
    v["routes"][0]["strategy"] = json!("random");
    let err = engine.load_snapshot(v.to_string().as_bytes()).unwrap_err();
    assert!(
        matches!(&err, Error::Config(m) if m.contains("random")),
        "{err}"
    );
    // The minimal fixture still loads (every new field optional).
    let engine = bare_engine();
    assert_eq!(engine.load_snapshot(&fixture("snapshot.json")).unwrap(), 1);
}
