//! Admission specs: blocked sources, key scopes (source IPs, not_before, secret rotation),
//! price factors, rate/token/concurrency limits and budgets, through a real engine.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod harness;

use std::sync::Arc;
use std::time::{Duration, Instant};

use harness::*;
use onetoken_gateway::billing::{usage_cost_at, Prices, Usage};
use onetoken_gateway::{Engine, EngineConfig};
use serde_json::{json, Value};

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn today() -> i64 {
    unix_now().div_euclid(86_400)
}

/// The entry of the harness snapshot's `list` whose `field` is `id`, for patching.
fn entry_mut<'a>(snap: &'a mut Value, list: &str, field: &str, id: &str) -> &'a mut Value {
    snap[list]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|e| e[field] == id)
        .unwrap()
}

fn org_mut<'a>(snap: &'a mut Value, id: &str) -> &'a mut Value {
    entry_mut(snap, "orgs", "id", id)
}

fn key_mut<'a>(snap: &'a mut Value, key_id: &str) -> &'a mut Value {
    entry_mut(snap, "keys", "key_id", key_id)
}

/// A harness whose first snapshot is the standard one with `patch` applied.
fn start_with(patch: impl FnOnce(&mut Value)) -> Gateway {
    Gateway::custom(|_| {}, patch)
}

fn reload(h: &Gateway, version: u64, patch: impl FnOnce(&mut Value)) {
    let mut snap = spec_snapshot(version, h.upstream().addr, 100_000_000_000);
    patch(&mut snap);
    assert_eq!(
        h.engine.load_snapshot(snap.to_string().as_bytes()).unwrap(),
        version
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocked_sources_are_refused_before_authentication() {
    let h = start_with(|s| {
        s["blocked_ips"] = json!([{"cidr": "127.0.0.0/8", "until": unix_now() + 3600}]);
    });
    let r = h.ask("ot-good", CANARY).await;
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["error"]["code"], "ip_blocked");
    let no_key = post(h.addr, CHAT, None, chat(CANARY, json!({}))).await;
    assert_eq!(no_key.json()["error"]["code"], "ip_blocked");
    h.wait_records(2).await;
    let recs = h.records();
    assert!(recs
        .iter()
        .all(|r| r.error_code == "ip_blocked" && r.key_id.is_empty() && r.status == 403));
    assert_eq!(h.upstream().requests(), 0);
    h.assert_no_canary(&recs, &[&r, &no_key]);

    // An expired block no longer applies; an unrelated one never did.
    reload(&h, 2, |s| {
        s["blocked_ips"] = json!([
            {"cidr": "127.0.0.0/8", "until": unix_now() - 1},
            {"cidr": "2001:db8::/32", "until": unix_now() + 3600}
        ]);
    });
    let ok = h.ask("ot-good", "hi").await;
    assert_eq!(ok.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_blocked_for_failing_auth_keeps_its_valid_keys() {
    let h = start_with(|s| {
        s["blocked_ips"] = json!([
            {"cidr": "127.0.0.1", "until": unix_now() + 3600, "mode": "unauthenticated"}
        ]);
    });
    let ok = h.ask("ot-good", "hi").await;
    assert_eq!(ok.status, 200);
    for key in [Some("ot-unknown"), None] {
        let r = post(h.addr, CHAT, key, chat(CANARY, json!({}))).await;
        assert_eq!(r.status, 403);
        assert_eq!(r.json()["error"]["code"], "ip_blocked");
    }
    assert_eq!(h.upstream().requests(), 1);
    // Elsewhere an unknown key is the usual 401.
    reload(&h, 2, |s| {
        s["blocked_ips"] = json!([
            {"cidr": "2001:db8::/32", "until": unix_now() + 3600, "mode": "unauthenticated"}
        ]);
    });
    let r = h.ask("ot-unknown", "hi").await;
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"]["code"], "invalid_api_key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_source_ip_scope() {
    let h = start_with(|s| {
        key_mut(s, "key_good")["allowed_ips"] = json!(["10.0.0.0/8", "2001:db8::/32"]);
        key_mut(s, "key_poor")["allowed_ips"] = json!(["127.0.0.1", "::1/128"]);
    });
    let r = h.ask("ot-good", CANARY).await;
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["error"]["code"], "key_ip_not_allowed");
    h.wait_records(1).await;
    let recs = h.records();
    // The record names the key and org so the control plane can raise a key-risk event.
    assert_eq!(recs[0].key_id, "key_good");
    assert_eq!(recs[0].org_id, "org_rich");
    assert_eq!(recs[0].source_ip, "127.0.0.1");
    assert_eq!(recs[0].error_code, "key_ip_not_allowed");
    assert_eq!(h.upstream().requests(), 0);
    h.assert_no_canary(&recs, &[&r]);

    // Inside its scope, the key passes admission (then fails on balance, a later phase).
    let poor = h.ask("ot-poor", "hi").await;
    assert_eq!(poor.json()["error"]["code"], "insufficient_balance");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_before_refuses_until_the_time() {
    let h = start_with(|s| {
        key_mut(s, "key_good")["not_before"] = json!(unix_now() + 600);
        key_mut(s, "key_embed")["not_before"] = json!(unix_now() - 1);
    });
    let r = h.ask("ot-good", CANARY).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"]["code"], "key_not_yet_valid");
    let ok = h.embed("ot-embed-only", "x").await;
    assert_eq!(ok.status, 200);
    h.wait_records(2).await;
    let recs = h.records();
    h.assert_no_canary(&recs, &[&r]);
}

const NEW_SECRET: &str = "1111111111111111111111111111111111111111111111111111111111111111";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_rotation_accepts_each_key_under_its_own_version_only() {
    // The standard config, with the key secret rotated: version 2 current, 1 previous.
    let rotated = |c: &mut Value| {
        c["key_hash_secret_hex"] = json!(NEW_SECRET);
        c["key_hash_secret_version"] = json!(2);
        c["previous_key_hash_secrets"] = json!([{"version": 1, "secret_hex": SECRET_HEX}]);
    };
    let new_hash = |k: &str| onetoken_gateway::hash_key(&hex::decode(NEW_SECRET).unwrap(), k);
    let h = Gateway::custom(rotated, |s| {
        // key_good: hashed under the old secret, version 1 (the default).
        // key_poor: re-issued under the new secret.
        let poor = key_mut(s, "key_poor");
        poor["hash"] = json!(new_hash("ot-poor"));
        poor["secret_version"] = json!(2);
        // key_off claims version 2 but was hashed under the old secret: never matches.
        key_mut(s, "key_off")["secret_version"] = json!(2);
        org_mut(s, "org_off")["status"] = json!("active");
    });
    let old = h.ask("ot-good", "hi").await;
    assert_eq!(old.status, 200, "old-secret key still accepted");
    let new = h.ask("ot-poor", "hi").await;
    assert_eq!(
        new.json()["error"]["code"],
        "insufficient_balance",
        "new-secret key authenticated"
    );
    let mismatch = h.ask("ot-off", "hi").await;
    assert_eq!(mismatch.status, 401);
    assert_eq!(mismatch.json()["error"]["code"], "invalid_api_key");

    // The same version twice, or bad hex, is a configuration error.
    for bad in [
        json!({"key_hash_secret_hex": "00", "previous_key_hash_secrets": [{"version": 1, "secret_hex": "01"}]}),
        json!({"key_hash_secret_hex": "00", "previous_key_hash_secrets": [{"version": 0, "secret_hex": "zz"}]}),
        json!({"key_hash_secret_hex": "00", "previous_key_hash_secrets": [{"version": 0, "secret": "01"}]}),
    ] {
        assert!(
            EngineConfig::from_json(bad.to_string().as_bytes()).is_err(),
            "{bad}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn price_factor_applies_to_every_part_rounding_up() {
    let h = start_with(|s| {
        org_mut(s, "org_rich")["price_factor_ppm"] = json!(900_000);
    });
    let r = h.chat("one two three", json!({"max_tokens": 10})).await;
    assert_eq!(r.status, 200);
    h.wait_records(1).await;
    let rec = h.records().remove(0);
    let prices = Prices {
        input: 500_000_000,
        output: 1_500_000_000,
        cached_input: 250_000_000,
    };
    let usage = Usage {
        prompt: u64::from(rec.prompt_tokens),
        completion: u64::from(rec.completion_tokens),
        cached: 0,
    };
    assert_eq!(rec.cost, usage_cost_at(usage, prices, 900_000));
    // 7 prompt tokens: 7 * 5e8 * 0.9 / 1e6 = 3150; 8 output: 8 * 1.5e9 * 0.9 / 1e6 = 10800.
    assert_eq!((rec.prompt_tokens, rec.completion_tokens), (7, 8));
    assert_eq!(rec.cost, 3150 + 10_800);
    let spend = h.engine.org_spend();
    assert!(spend.contains(&("org_rich".to_owned(), rec.cost, 0)));
    assert_eq!(
        h.engine
            .key_spend()
            .iter()
            .find(|k| k.0 == "key_good")
            .unwrap()
            .1,
        rec.cost
    );
}

fn header<'a>(r: &'a Reply, name: &str) -> &'a str {
    r.headers
        .get(name)
        .unwrap_or_else(|| panic!("missing {name}"))
        .to_str()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpm_limit_refuses_with_headers_and_records_limited() {
    let h = start_with(|s| {
        key_mut(s, "key_good")["limits"] = json!({"rpm": 3});
    });
    for _ in 0..3 {
        let ok = h.ask("ot-good", "hi").await;
        assert_eq!(ok.status, 200);
    }
    let r = h.ask("ot-good", CANARY).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["error"]["code"], "rate_limited");
    assert_eq!(r.json()["error"]["type"], "rate_limit_error");
    // rpm 3: one request every 20 s refills.
    let retry: u64 = header(&r, "retry-after").parse().unwrap();
    assert!((19..=20).contains(&retry), "{retry}");
    assert_eq!(header(&r, "x-ratelimit-limit-requests"), "3");
    assert_eq!(header(&r, "x-ratelimit-remaining-requests"), "0");
    assert!(header(&r, "x-ratelimit-reset-requests").ends_with('s'));
    assert!(r.headers.get("x-ratelimit-limit-tokens").is_none());
    assert_eq!(h.upstream().requests(), 3);
    h.wait_records(4).await;
    let recs = h.records();
    assert_eq!(
        recs.iter().map(|r| r.rate_limit).collect::<Vec<_>>(),
        ["pass", "pass", "pass", "limited"]
    );
    assert_eq!(recs[3].error_code, "rate_limited");
    assert_eq!(recs[3].status, 429);
    assert_eq!(recs[3].cost, 0);
    // A limited request holds nothing.
    h.assert_nothing_reserved();
    h.assert_no_canary(&recs, &[&r]);
    // Another key of the same org is not affected.
    let other = h.embed("ot-embed-only", "x").await;
    assert_eq!(other.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn org_rpm_covers_all_its_keys() {
    let h = start_with(|s| {
        org_mut(s, "org_rich")["limits"] = json!({"rpm": 2});
    });
    let embed = json!({"model": "demo-embed", "input": "x"});
    assert_eq!(h.ask("ot-good", "a").await.status, 200);
    assert_eq!(
        post(
            h.addr,
            "/v1/embeddings",
            Some("ot-embed-only"),
            embed.clone()
        )
        .await
        .status,
        200
    );
    let r = post(h.addr, "/v1/embeddings", Some("ot-embed-only"), embed).await;
    assert_eq!(r.status, 429);
    assert_eq!(header(&r, "x-ratelimit-limit-requests"), "2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tpm_admits_on_the_estimate_and_corrects_at_settle() {
    // Estimate = prompt estimate (4 + 1 tokens) + max_tokens. tpm 100.
    let h = start_with(|s| {
        key_mut(s, "key_good")["limits"] = json!({"tpm": 100});
    });
    // 5 + 80 = 85 fits; the upstream really uses 5 + 8 = 13, so 72 come back at settle.
    let a = h.chat("hi", json!({"max_tokens": 80})).await;
    assert_eq!(a.status, 200);
    // 13 used, 87 left: another 85 fits only because of the correction.
    let b = h.chat("hi", json!({"max_tokens": 80})).await;
    assert_eq!(b.status, 200, "{}", b.text());
    // 26 used, 74 left: 85 does not fit.
    let c = h.chat("hi", json!({"max_tokens": 80})).await;
    assert_eq!(c.status, 429);
    assert_eq!(c.json()["error"]["code"], "rate_limited");
    assert_eq!(header(&c, "x-ratelimit-limit-tokens"), "100");
    let remaining: u64 = header(&c, "x-ratelimit-remaining-tokens").parse().unwrap();
    assert!((73..=74).contains(&remaining), "{remaining}");
    // A small request still fits.
    let d = h.chat("hi", json!({"max_tokens": 10})).await;
    assert_eq!(d.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_limit_counts_open_streams_and_frees_on_end() {
    let h = start_with(|s| {
        key_mut(s, "key_good")["limits"] = json!({"concurrency": 2});
    });
    let slow = chat(
        "hi",
        json!({"stream": true, "mock": {"chunks": 3, "delay_ms": 300}}),
    );
    let s1 = open(h.addr, chat_request("ot-good", slow.clone())).await;
    let s2 = open(h.addr, chat_request("ot-good", slow.clone())).await;
    assert_eq!((s1.status().as_u16(), s2.status().as_u16()), (200, 200));
    let r = h.ask("ot-good", CANARY).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["error"]["code"], "concurrency_limited");
    assert_eq!(header(&r, "retry-after"), "1");
    // A stream the client abandons frees its slot too.
    drop(s1);
    use http_body_util::BodyExt;
    let _ = s2.into_body().collect().await.unwrap();
    h.wait_records(3).await;
    let ok = h.ask("ot-good", "hi").await;
    assert_eq!(ok.status, 200);
    h.wait_records(4).await;
    let recs = h.records();
    assert_eq!(recs.iter().filter(|r| r.rate_limit == "limited").count(), 1);
    h.assert_no_canary(&recs, &[&r]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_clients_never_exceed_rpm_or_concurrency() {
    let h = Arc::new(start_with(|s| {
        key_mut(s, "key_good")["limits"] = json!({"rpm": 20});
        org_mut(s, "org_rich")["limits"] = json!({"concurrency": 4});
    }));
    let started = Instant::now();
    let tasks: Vec<_> = (0..60)
        .map(|_| {
            let h = h.clone();
            tokio::spawn(async move {
                let body = chat("hi", json!({"mock": {"latency_ms": 30}}));
                h.chat_as("ot-good", body).await
            })
        })
        .collect();
    let mut by_code = std::collections::BTreeMap::<String, usize>::new();
    for t in tasks {
        let r = t.await.unwrap();
        let code = if r.status == 200 {
            "ok".to_owned()
        } else {
            r.json()["error"]["code"].as_str().unwrap().to_owned()
        };
        *by_code.entry(code).or_default() += 1;
    }
    let elapsed = started.elapsed();
    let ok = by_code.get("ok").copied().unwrap_or(0);
    // rpm 20 refills one every 3 s: all within one burst of at most 20 (+1 if slow).
    let max_ok = 20 + usize::from(elapsed >= Duration::from_secs(3));
    assert!(ok <= max_ok && ok > 0, "{by_code:?}");
    assert_eq!(
        by_code.values().sum::<usize>(),
        60,
        "every request got an answer: {by_code:?}"
    );
    assert!(by_code
        .keys()
        .all(|k| ["ok", "rate_limited", "concurrency_limited"].contains(&k.as_str())));
    assert!(by_code.contains_key("concurrency_limited"), "{by_code:?}");
    assert_eq!(h.upstream().requests() as usize, ok);
    h.wait_records(60).await;
    let recs = h.records();
    assert_eq!(
        recs.iter().filter(|r| r.rate_limit == "limited").count(),
        60 - ok
    );
    // Every slot was given back and nothing stays reserved.
    for _ in 0..5 {
        let again = h.embed("ot-embed-only", "x").await;
        assert_eq!(again.status, 200);
    }
    h.assert_nothing_reserved();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_survive_a_snapshot_swap_and_new_limits_apply_at_once() {
    let limit = |rpm: u32| {
        move |s: &mut Value| {
            key_mut(s, "key_good")["limits"] = json!({"rpm": rpm});
        }
    };
    let h = start_with(limit(4));
    for _ in 0..4 {
        assert_eq!(h.ask("ot-good", "a").await.status, 200);
    }
    // Same limit, new snapshot: the four already taken still count.
    reload(&h, 2, limit(4));
    assert_eq!(h.ask("ot-good", "a").await.status, 429);
    // Raised: admitted at once (4 of 600 used).
    reload(&h, 3, limit(600));
    assert_eq!(h.ask("ot-good", "a").await.status, 200);
    // Lowered below what was used: refused at once.
    reload(&h, 4, limit(2));
    let r = h.ask("ot-good", "a").await;
    assert_eq!(r.status, 429);
    assert_eq!(header(&r, "x-ratelimit-limit-requests"), "2");
    // Removed: no limit.
    reload(&h, 5, |_| {});
    assert_eq!(h.ask("ot-good", "a").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budgets_refuse_with_retry_after_until_the_period_resets() {
    let day = today();
    let now = unix_now();
    let h = start_with(|s| {
        // The key has 1_000_000 left today per the ledger.
        let k = key_mut(s, "key_good");
        k["limits"] = json!({"budget_day": 5_000_000});
        k["usage"] = json!({"day": day, "month": 0, "spent_day": 4_000_000, "spent_month": 0, "spent_mark": 0});
    });
    // max_tokens 4096 at 1.5e9/M = 6_144_000 > 1_000_000 left: refused.
    let r = h.ask("ot-good", CANARY).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["error"]["code"], "budget_exceeded");
    let retry: i64 = header(&r, "retry-after").parse().unwrap();
    let to_midnight = (day + 1) * 86_400 - now;
    assert!(
        (to_midnight - 5..=to_midnight).contains(&retry),
        "{retry} vs {to_midnight}"
    );
    // A small request fits (10 * 1.5e9/1e6 = 15_000 + prompt).
    let ok = h.chat("hi", json!({"max_tokens": 10})).await;
    assert_eq!(ok.status, 200);
    h.wait_records(2).await;
    let recs = h.records();
    assert_eq!(recs[0].rate_limit, "limited");
    h.assert_no_canary(&recs, &[&r]);

    // A usage from an earlier day is stale: only the engine's own spend since the day
    // changed counts (the ledger's 999_999_999 of yesterday does not).
    reload(&h, 2, |s| {
        let k = key_mut(s, "key_good");
        k["limits"] = json!({"budget_day": 10_000});
        k["usage"] = json!({"day": day - 1, "month": 0, "spent_day": 999_999_999, "spent_month": 0, "spent_mark": 0});
    });
    // Reserve 1 * 1500 + 5 * 500 = 4000 <= 10_000; the upstream then bills 14_500.
    let small = chat("hi", json!({"max_tokens": 1}));
    assert_eq!(h.chat_as("ot-good", small.clone()).await.status, 200);
    let again = h.chat_as("ot-good", small.clone()).await;
    assert_eq!(
        again.json()["error"]["code"],
        "budget_exceeded",
        "own spend counts"
    );

    // Org month budget.
    reload(&h, 3, |s| {
        org_mut(s, "org_rich")["limits"] = json!({"budget_month": 1});
    });
    let m = h.chat_as("ot-good", small).await;
    assert_eq!(m.json()["error"]["code"], "budget_exceeded");
    let retry: i64 = header(&m, "retry-after").parse().unwrap();
    assert!(retry > 0 && retry <= 31 * 86_400);
}

#[test]
fn full_contract_snapshot_loads_with_every_admission_field() {
    let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/contract/snapshot_full.json");
    let json = std::fs::read(path).unwrap();
    let spool = tempdir::Dir::new();
    let engine = Engine::new(engine_config(spool.path())).unwrap();
    assert_eq!(engine.load_snapshot(&json).unwrap(), 2);

    // An invalid admission value drops its entry (reported by id and reason) and the
    // rest of the snapshot still loads.
    let base: Value = serde_json::from_slice(&json).unwrap();
    let mut version = 2;
    for (pointer, value, dropped) in [
        (
            "/keys/0/allowed_ips",
            json!(["10.0.0.0/99"]),
            ("key", "key_demo", "allowed_ips", "invalid_cidr"),
        ),
        (
            "/blocked_ips",
            json!([{"cidr": "nope", "until": 1}]),
            ("blocked_ip", "0", "cidr", "invalid_cidr"),
        ),
        (
            "/orgs/0/guard",
            json!({"mode": "flag", "categories": ["gossip"]}),
            ("guard", "org_demo", "guard.categories", "unknown_category"),
        ),
    ] {
        version += 1;
        let mut v = base.clone();
        v["version"] = json!(version);
        *v.pointer_mut(pointer).unwrap() = value;
        assert_eq!(
            engine.load_snapshot(v.to_string().as_bytes()).unwrap(),
            version
        );
        let got: Vec<_> = engine
            .snapshot_dropped()
            .into_iter()
            .map(|d| (d.kind, d.id, d.field, d.reason))
            .collect();
        let (kind, id, field, reason) = dropped;
        assert_eq!(got, vec![(kind, id.to_owned(), field, reason)], "{pointer}");
    }
    // A document that does not parse is refused whole, naming the place.
    for (pointer, value, needle) in [
        ("/orgs/0/guard", json!({"mode": "sometimes"}), "sometimes"),
        ("/orgs/0/limits", json!({"rpm": 1, "burst": 2}), "burst"),
        ("/keys/0/usage", json!({"today": 1}), "today"),
        (
            "/blocked_ips",
            json!([{"cidr": "1.2.3.4", "until": 1, "why": "x"}]),
            "why",
        ),
    ] {
        let mut v = base.clone();
        v["version"] = json!(9);
        *v.pointer_mut(pointer).unwrap() = value;
        let err = engine.load_snapshot(v.to_string().as_bytes()).unwrap_err();
        assert!(err.to_string().contains(needle), "{pointer}: {err}");
    }
    assert_eq!(engine.stats().snapshot_version, version);
}

/// A bad entry (here a model whose provider is missing and a route to no model) is left
/// out, and the revocation and org disable that arrive in the same snapshot still apply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_entry_does_not_hold_back_a_revocation() {
    let h = Gateway::start();
    assert_eq!(h.ask("ot-good", "hi").await.status, 200);
    reload(&h, 2, |s| {
        s["models"].as_array_mut().unwrap().push(json!({
            "name": "ghost", "kind": "chat", "provider_id": "prov_gone", "upstream_model": "x",
            "input_price": 0, "output_price": 0, "cached_input_price": 0, "max_output_tokens": 1
        }));
        s["routes"] = json!([{"name": "nobody"}]);
        key_mut(s, "key_good")["status"] = json!("revoked");
        org_mut(s, "org_poor")["status"] = json!("disabled");
    });
    let r = h.ask("ot-good", "hi").await;
    assert_eq!(r.json()["error"]["code"], "key_revoked");
    let r = h.ask("ot-poor", "hi").await;
    assert_eq!(r.json()["error"]["code"], "org_disabled");
    let dropped: Vec<_> = h
        .engine
        .snapshot_dropped()
        .into_iter()
        .map(|d| (d.kind, d.id, d.reason))
        .collect();
    assert_eq!(
        dropped,
        vec![
            ("model", "ghost".to_owned(), "unknown_provider"),
            ("route", "nobody".to_owned(), "unknown_model"),
        ]
    );
}

/// Luhn-valid test card and a mainland mobile number, inside canary text.
const CARD: &str = "4111 1111 1111 1111";
const PHONE: &str = "13800138000";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guard_block_names_only_the_categories() {
    let h = start_with(|s| {
        org_mut(s, "org_rich")["guard"] = json!({"mode": "block", "categories": null});
        org_mut(s, "org_rich")["limits"] = json!({"rpm": 1000});
    });
    let text = format!("{CANARY} pay with {CARD} or call {PHONE}");
    let r = h.ask("ot-good", &text).await;
    assert_eq!(r.status, 400);
    let err = r.json()["error"].clone();
    assert_eq!(err["code"], "sensitive_content_blocked");
    let msg = err["message"].as_str().unwrap();
    assert!(msg.contains("(categories: bank_card,phone)"), "{msg}");
    assert!(!r.text().contains("4111") && !r.text().contains(PHONE));
    // Content parts and embedding input are scanned too.
    let parts = json!({"model": "demo-chat", "messages": [{"role": "user", "content": [{"type": "text", "text": text}]}]});
    assert_eq!(h.chat_as("ot-good", parts).await.status, 400);
    let embed = json!({"model": "demo-embed", "input": [text]});
    let e = post(h.addr, "/v1/embeddings", Some("ot-embed-only"), embed).await;
    assert_eq!(e.json()["error"]["code"], "sensitive_content_blocked");
    assert_eq!(h.upstream().requests(), 0);
    // Clean text passes.
    let ok = h.ask("ot-good", "call me tomorrow").await;
    assert_eq!(ok.status, 200);
    h.wait_records(4).await;
    let recs = h.records();
    for rec in &recs {
        let line = serde_json::to_string(rec).unwrap();
        assert!(!line.contains("4111") && !line.contains(PHONE), "{line}");
    }
    assert_eq!(recs.iter().filter(|r| r.status == 400).count(), 3);
    assert!(
        recs.iter().all(|r| r.guard_flags.is_empty()),
        "blocked: the error says it"
    );
    h.assert_no_canary(&recs, &[&r, &e]);
    // A blocked request held nothing.
    h.assert_nothing_reserved();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guard_flag_forwards_and_scans_only_the_chosen_categories() {
    let h = start_with(|s| {
        org_mut(s, "org_rich")["guard"] = json!({"mode": "flag", "categories": ["phone"]});
    });
    let text = format!("{CANARY} {CARD} {PHONE}");
    let r = h.ask("ot-good", &text).await;
    assert_eq!(r.status, 200, "flag mode forwards");
    assert_eq!(h.upstream().requests(), 1);
    h.wait_records(1).await;
    let recs = h.records();
    assert_eq!(recs[0].error_code, "");
    assert_eq!(recs[0].guard_flags, "phone:1", "the card was not asked for");
    h.assert_no_canary(&recs, &[&r]);
    for rec in &recs {
        let line = serde_json::to_string(rec).unwrap();
        assert!(!line.contains("4111") && !line.contains(PHONE), "{line}");
    }
}

/// Each client API's required fields and integer limits, checked after parsing and
/// before anything is reserved or sent: 400 naming the parameter (Anthropic's shape on
/// `/v1/messages`), no value from the request echoed, nothing forwarded or held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_are_refused_before_anything_is_reserved_or_sent() {
    let h = Gateway::start();
    let user = json!([{"role": "user", "content": CANARY}]);
    // A valid chat request but for `field`, which the answer must name.
    let chat_field = |field: &'static str, value: Value| {
        let mut body = json!({"model": "demo-chat", "messages": user});
        body[field] = value;
        (CHAT, body, field)
    };
    let cases: Vec<(&str, Value, &str)> = vec![
        (CHAT, json!({"model": "demo-chat"}), "messages"),
        (
            CHAT,
            json!({"model": "demo-chat", "messages": CANARY}),
            "messages",
        ),
        (
            CHAT,
            json!({"model": "demo-chat", "messages": []}),
            "messages",
        ),
        (
            CHAT,
            json!({"model": "demo-chat", "messages": [{"content": CANARY}]}),
            "messages",
        ),
        (CHAT, json!({"messages": user}), "model"),
        (CHAT, json!({"model": 7, "messages": user}), "model"),
        chat_field("stream", json!("yes")),
        chat_field("max_tokens", json!(-1)),
        chat_field("max_tokens", json!(0)),
        chat_field("max_tokens", json!(2.5)),
        chat_field("max_completion_tokens", json!("9")),
        chat_field("n", json!(0)),
        chat_field("n", json!(1.5)),
        ("/v1/embeddings", json!({"model": "demo-embed"}), "input"),
        (
            "/v1/embeddings",
            json!({"model": "demo-embed", "input": []}),
            "input",
        ),
        (
            "/v1/messages",
            json!({"model": "demo-chat", "messages": user}),
            "max_tokens",
        ),
        (
            "/v1/messages",
            json!({"model": "demo-chat", "max_tokens": 5}),
            "messages",
        ),
        (
            "/v1/messages",
            json!({"model": "demo-chat", "max_tokens": -5, "messages": user}),
            "max_tokens",
        ),
        ("/v1/responses", json!({"model": "demo-chat"}), "input"),
        (
            "/v1/responses",
            json!({"model": "demo-chat", "input": CANARY, "max_output_tokens": 0}),
            "max_output_tokens",
        ),
    ];
    let mut replies = Vec::new();
    for (path, body, param) in &cases {
        let r = post(h.addr, path, Some("ot-good"), body.clone()).await;
        assert_eq!(r.status, 400, "{path} {param}: {}", r.text());
        let v = r.json();
        if *path == "/v1/messages" {
            assert_eq!(v["type"], "error");
            assert_eq!(v["error"]["type"], "invalid_request_error");
            assert!(v["error"]["message"].as_str().unwrap().contains(param));
        } else {
            assert_eq!(v["error"]["type"], "invalid_request_error", "{param}");
            assert_eq!(v["error"]["param"], *param);
            assert_eq!(v["error"]["code"], "invalid_request");
        }
        replies.push(r);
    }
    assert_eq!(h.upstream().requests(), 0, "nothing was forwarded");
    assert!(h
        .engine
        .org_spend()
        .iter()
        .all(|(_, spent, reserved)| (*spent, *reserved) == (0, 0)));
    let records = h.records();
    assert_eq!(records.len(), cases.len());
    assert!(records
        .iter()
        .all(|r| r.status == 400 && r.error_code == "invalid_request" && r.cost == 0));
    h.assert_no_canary(&records, &replies.iter().collect::<Vec<_>>());
}

/// `n` choices are reserved as n outputs, and the output cap the reservation assumed is
/// what the upstream is asked for (added when the client set none).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_choices_are_reserved_and_the_output_cap_is_forwarded() {
    // demo-chat: 4096 output tokens at 1.5e9/M = 6_144_000 per choice.
    let h = Gateway::with_balance(10_000_000);
    let r = h.chat("hi", json!({"n": 8})).await;
    assert_eq!(r.status, 402, "8 choices do not fit: {}", r.text());
    assert_eq!(h.upstream().requests(), 0);

    let r = h.ask("ot-good", "hi").await;
    assert_eq!(r.status, 200);
    let sent = h.upstream().state.last_body.lock().clone().unwrap();
    assert_eq!(sent["max_completion_tokens"], 4096);
    assert!(sent.get("max_tokens").is_none());

    let r = h.chat("hi", json!({"max_tokens": 100_000})).await;
    assert_eq!(r.status, 200);
    let sent = h.upstream().state.last_body.lock().clone().unwrap();
    assert_eq!(
        sent["max_tokens"], 4096,
        "capped at the deployment's output cap"
    );
    assert!(sent.get("max_completion_tokens").is_none());

    let r = h.chat("hi", json!({"n": 2, "max_tokens": 10})).await;
    assert_eq!(r.status, 200);
    let sent = h.upstream().state.last_body.lock().clone().unwrap();
    assert_eq!(
        (sent["n"].clone(), sent["max_tokens"].clone()),
        (json!(2), json!(10))
    );
}

/// Every upstream request carries the hop marker, and a request that carries it is
/// refused first thing: 508 `loop_detected`, recorded with that code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relayed_request_is_refused_with_loop_detected() {
    let h = Gateway::start();
    let mut req = chat_request("ot-good", chat("hi", json!({})));
    req.headers_mut()
        .insert("x-onetoken-hop", http::HeaderValue::from_static("1"));
    let r = call(h.addr, req).await;
    assert_eq!(r.status, 508);
    assert_eq!(r.json()["error"]["code"], "loop_detected");
    assert_eq!(r.json()["error"]["type"], "invalid_request_error");
    assert_eq!(h.upstream().requests(), 0);
    let records = h.records();
    assert_eq!(records.len(), 1);
    assert_eq!(
        (records[0].status, records[0].error_code),
        (508, "loop_detected")
    );
}

/// A tenant provider whose base URL is the gateway itself, with one of the org's own
/// keys and a zero price: the second hop is refused, the first request gets a clean
/// error, and nothing recurses (two records in all, one upstream attempt).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_pointing_back_at_the_gateway_stops_at_the_second_hop() {
    let h = Gateway::start();
    let gateway = h.addr;
    reload(&h, 2, |s| {
        s["providers"].as_array_mut().unwrap().push(json!({
            "id": "prov_loop", "name": "loop", "protocol": "openai",
            "base_url": format!("http://{gateway}/v1"), "api_key": "ot-good",
            "connect_timeout_ms": 1000, "first_byte_timeout_ms": 3000, "idle_timeout_ms": 3000
        }));
        s["models"].as_array_mut().unwrap().push(json!({
            "name": "loop-chat", "kind": "chat", "provider_id": "prov_loop",
            "upstream_model": "loop-chat", "org_id": "org_rich",
            "input_price": 0, "output_price": 0, "cached_input_price": 0, "max_output_tokens": 64
        }));
    });
    let body = json!({"model": "loop-chat", "messages": [{"role": "user", "content": "hi"}]});
    let r = h.chat_as("ot-good", body).await;
    assert_eq!(r.status, 508, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "loop_detected");
    h.wait_records(2).await;
    let records = h.records();
    assert_eq!(records.len(), 2, "no recursion");
    let codes: Vec<_> = records
        .iter()
        .map(|r| (r.status, r.error_code, r.attempts))
        .collect();
    assert!(codes.contains(&(508, "loop_detected", 0)), "{codes:?}");
    assert!(
        codes.contains(&(508, "upstream_error", 1)),
        "not retried: {codes:?}"
    );
}

/// A request that reserves nothing (a zero-priced deployment) takes one of the org's
/// free in-flight slots; past the cap it is refused with 429 until one is released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn free_requests_in_flight_are_capped_per_org() {
    use onetoken_gateway::billing::UNPRICED_IN_FLIGHT_PER_ORG;
    let h = start_with(|s| {
        let free = json!({
            "name": "free-chat", "kind": "chat", "provider_id": "prov_test", "upstream_model": "m",
            "input_price": 0, "output_price": 0, "cached_input_price": 0, "max_output_tokens": 16
        });
        s["models"].as_array_mut().unwrap().push(free);
    });
    let body = json!({"model": "free-chat", "stream": true,
                      "messages": [{"role": "user", "content": "hi"}],
                      "mock": {"chunks": 2, "delay_ms": 3000}});
    // Hold every slot with a slow stream (headers arrive at once, the body later).
    let mut held = Vec::new();
    for _ in 0..UNPRICED_IN_FLIGHT_PER_ORG {
        let resp = open(h.addr, chat_request("ot-good", body.clone())).await;
        assert_eq!(resp.status(), 200);
        held.push(resp);
    }
    let r = h.chat_as("ot-good", body.clone()).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["error"]["code"], "concurrency_limited");
    assert_eq!(header(&r, "retry-after"), "1");
    // Priced requests of the same org are bounded by money, not by these slots.
    let paid = h.ask("ot-good", "hi").await;
    assert_eq!(paid.status, 200);
    drop(held);
    let free = json!({"model": "free-chat", "messages": [{"role": "user", "content": "hi"}]});
    let released = wait_for(WAIT, || async {
        h.chat_as("ot-good", free.clone()).await.status == 200
    })
    .await;
    assert!(released, "slots not released");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_served_by_other_gateways_is_told_so_not_called_invalid() {
    // This gateway serves a dedicated pool: `ot-good` is its org's; `ot-away` belongs to
    // an org of another pool and `ot-shared` to an org on the shared gateways.
    let h = start_with(|s| {
        s["elsewhere_keys"] = json!([
            {"hash": key_hash("ot-away")},
            {"hash": key_hash("ot-shared"), "shared": true, "secret_version": 1},
            // A key listed in both is served (the control plane never sends that).
            {"hash": key_hash("ot-good")}
        ]);
    });
    let away = h.ask("ot-away", CANARY).await;
    assert_eq!(away.status, 403);
    let err = &away.json()["error"];
    assert_eq!(err["code"], "wrong_gateway_pool");
    assert_eq!(err["type"], "permission_error");
    assert!(err["message"]
        .as_str()
        .unwrap()
        .contains("dedicated gateway pool"));
    let shared = h.ask("ot-shared", "hi").await;
    assert_eq!(shared.status, 403);
    assert!(shared.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("shared gateways"));
    assert_eq!(
        h.ask("ot-unknown", "hi").await.json()["error"]["code"],
        "invalid_api_key"
    );
    assert_eq!(h.ask("ot-good", "hi").await.status, 200);
    h.wait_records(4).await;
    let recs = h.records();
    let refused: Vec<_> = recs
        .iter()
        .filter(|r| r.error_code == "wrong_gateway_pool")
        .collect();
    // Nothing of the other org is known here: the records carry no key or org.
    assert_eq!(refused.len(), 2);
    assert!(refused
        .iter()
        .all(|r| r.key_id.is_empty() && r.org_id.is_empty()));
    assert_eq!(h.upstream().requests(), 1);
    h.assert_no_canary(&recs, &[&away]);

    // A hash that does not parse is dropped and reported; the rest still serves.
    let dropped = onetoken_gateway::validate_snapshot(
        json!({"version": 1, "orgs": [], "keys": [], "providers": [], "models": [],
               "elsewhere_keys": [{"hash": "zz"}]})
        .to_string()
        .as_bytes(),
    )
    .unwrap();
    assert_eq!(dropped.len(), 1);
    assert_eq!(
        (dropped[0].kind, dropped[0].reason),
        ("elsewhere_key", "invalid_hash")
    );
}
