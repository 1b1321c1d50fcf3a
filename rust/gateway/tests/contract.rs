//! The shared fixtures in tests/contract/ parse and agree with the Rust side.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod harness;

use harness::{assert_unknown_fields_refused, fixture};
use onetoken_gateway::{hash_key, Engine, EngineConfig, Error, SnapshotDoc};
use serde_json::Value;

/// An engine on the contract's engine config.
fn contract_engine() -> Engine {
    Engine::new(EngineConfig::from_json(&fixture("engine_config.json")).unwrap()).unwrap()
}

#[test]
fn key_hash_vectors() {
    let v: Value = serde_json::from_slice(&fixture("key_hash_vectors.json")).unwrap();
    let vectors = v["vectors"].as_array().unwrap();
    assert!(!vectors.is_empty());
    for t in vectors {
        let secret = hex::decode(t["secret_hex"].as_str().unwrap()).unwrap();
        assert_eq!(
            hash_key(&secret, t["key"].as_str().unwrap()),
            t["hash_hex"].as_str().unwrap()
        );
    }
}

#[test]
fn engine_config_fixture_parses() {
    let cfg = EngineConfig::from_json(&fixture("engine_config.json")).unwrap();
    assert_eq!(cfg.listen, "127.0.0.1:0");
    assert_eq!(cfg.worker_threads, 2);
    assert!(cfg.tls.is_none());
    assert_eq!(cfg.max_body_bytes, 4_194_304);
}

#[test]
fn engine_config_rejects_unknown_fields_by_name() {
    let mut v: Value = serde_json::from_slice(&fixture("engine_config.json")).unwrap();
    v["listen_adress"] = Value::from("x");
    let err = EngineConfig::from_json(v.to_string().as_bytes()).unwrap_err();
    assert!(
        matches!(&err, Error::Config(m) if m.contains("listen_adress")),
        "{err}"
    );
}

#[test]
fn engine_config_defaults_optional_fields() {
    let cfg = EngineConfig::from_json(br#"{"key_hash_secret_hex": "00ff"}"#).unwrap();
    assert_eq!(cfg.spool_dir, "./.onetoken/spool");
    assert!(EngineConfig::from_json(br#"{"key_hash_secret_hex": "zz"}"#).is_err());
}

#[test]
fn snapshot_fixture_parses_and_loads() {
    let doc: SnapshotDoc = serde_json::from_slice(&fixture("snapshot.json")).unwrap();
    assert_eq!(doc.version, 1);
    let engine = contract_engine();
    assert_eq!(engine.load_snapshot(&fixture("snapshot.json")).unwrap(), 1);
    assert_eq!(engine.stats().snapshot_version, 1);
    // Not newer: ignored, the current version is returned.
    assert_eq!(engine.load_snapshot(&fixture("snapshot.json")).unwrap(), 1);
}

#[test]
fn snapshot_with_unknown_field_is_rejected_naming_it() {
    let engine = contract_engine();
    assert_unknown_fields_refused(
        &engine,
        "snapshot.json",
        5,
        &["", "/orgs/0", "/keys/0", "/providers/0", "/models/0"],
    );
    assert_eq!(
        engine.stats().snapshot_version,
        0,
        "a rejected snapshot changes nothing"
    );
}

#[test]
fn snapshot_references_are_checked_and_the_entry_dropped() {
    let engine = contract_engine();
    let mut v: Value = serde_json::from_slice(&fixture("snapshot.json")).unwrap();
    v["models"][0]["provider_id"] = Value::from("nope");
    assert_eq!(engine.load_snapshot(v.to_string().as_bytes()).unwrap(), 1);
    let dropped = engine.snapshot_dropped();
    assert_eq!(dropped.len(), 1);
    assert_eq!(
        (dropped[0].kind, dropped[0].reason),
        ("model", "unknown_provider")
    );
    let mut v: Value = serde_json::from_slice(&fixture("snapshot.json")).unwrap();
    v["version"] = Value::from(2);
    v["keys"][0]["org_id"] = Value::from("nope");
    assert_eq!(engine.load_snapshot(v.to_string().as_bytes()).unwrap(), 2);
    let dropped = engine.snapshot_dropped();
    assert_eq!(dropped.len(), 1);
    assert_eq!(
        (dropped[0].kind, dropped[0].field, dropped[0].reason),
        ("key", "org_id", "unknown_org")
    );
    // An application of an unknown org is left out, and so is a key naming it: the key
    // is refused rather than served without its application's limits.
    let mut v: Value = serde_json::from_slice(&fixture("snapshot.json")).unwrap();
    v["version"] = Value::from(3);
    v["applications"] = serde_json::json!([{"id": "app_x", "org_id": "nope"}]);
    v["keys"][0]["application_id"] = Value::from("app_x");
    assert_eq!(engine.load_snapshot(v.to_string().as_bytes()).unwrap(), 3);
    let dropped: Vec<_> = engine
        .snapshot_dropped()
        .into_iter()
        .map(|d| (d.kind, d.field, d.reason))
        .collect();
    assert_eq!(
        dropped,
        [
            ("application", "org_id", "unknown_org"),
            ("key", "application_id", "unknown_application"),
        ]
    );
}

#[test]
fn record_fields_are_the_call_log_columns() {
    let columns: Vec<&str> = onetoken_gateway::journal_reader::COLUMNS
        .iter()
        .map(|c| c.0)
        .collect();
    let record = serde_json::to_value(onetoken_gateway::CallRecord::default()).unwrap();
    let fields: Vec<&str> = record
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let mut sorted_columns = columns.clone();
    sorted_columns.sort_unstable();
    let mut sorted_fields = fields.clone();
    sorted_fields.sort_unstable();
    assert_eq!(sorted_fields, sorted_columns);
    // And in the same order: the journal line lists them as the struct declares them.
    let line = serde_json::to_string(&onetoken_gateway::CallRecord::default()).unwrap();
    let at: Vec<usize> = columns
        .iter()
        .map(|c| line.find(&format!("\"{c}\":")).unwrap())
        .collect();
    assert!(at.windows(2).all(|w| w[0] < w[1]), "{line}");
}

#[test]
fn every_call_log_column_is_documented_in_plain_words() {
    // The doc comments become docs/analytics.md and the ClickHouse column comments, read
    // by people querying the table, not by rustdoc.
    let names: Vec<&str> = onetoken_gateway::journal_reader::COLUMN_DOCS
        .iter()
        .map(|d| d.0)
        .collect();
    let columns: Vec<&str> = onetoken_gateway::journal_reader::COLUMNS
        .iter()
        .map(|c| c.0)
        .collect();
    assert_eq!(names, columns);
    for (name, doc) in onetoken_gateway::journal_reader::COLUMN_DOCS {
        assert!(!doc.trim().is_empty(), "{name} has no doc comment");
        assert!(
            !doc.contains("[`"),
            "{name}: a doc link means nothing outside rustdoc"
        );
    }
}

#[test]
fn bind_errors_are_immediate_and_start_twice_is_a_state_error() {
    let cfg = EngineConfig::from_json(&fixture("engine_config.json")).unwrap();
    let engine = Engine::new(cfg.clone()).unwrap();
    let addr = engine.start().unwrap();
    assert_eq!(engine.address(), Some(addr));
    assert!(matches!(engine.start(), Err(Error::State(_))));
    let mut taken = cfg;
    taken.listen = addr.to_string();
    let other = Engine::new(taken).unwrap();
    assert!(matches!(other.start(), Err(Error::Bind(_))));
    engine.stop(std::time::Duration::from_millis(100));
    assert!(matches!(engine.start(), Err(Error::State(_))));
}

#[test]
fn full_snapshot_fixture_parses_with_every_admission_field() {
    let doc: SnapshotDoc = serde_json::from_slice(&fixture("snapshot_full.json")).unwrap();
    let org = &doc.orgs[0];
    assert_eq!(org.price_factor_ppm, 900_000);
    assert_eq!(org.limits.rpm, Some(6000));
    assert_eq!(org.limits.budget_month, None);
    assert_eq!(org.usage.month, 202_611);
    let key = &doc.keys[0];
    assert_eq!(key.secret_version, 1);
    assert_eq!(key.allowed_ips.as_ref().unwrap().len(), 2);
    assert_eq!(key.limits.concurrency, Some(20));
    assert_eq!(doc.blocked_ips[0].until, 4_102_444_800);
    assert!(doc.elsewhere_keys[0].shared);
    assert_eq!(key.application_id.as_deref(), Some("app_demo"));
    let app = &doc.applications[0];
    assert_eq!(
        (app.id.as_str(), app.org_id.as_str()),
        ("app_demo", "org_demo")
    );
    assert_eq!(app.limits.budget_month, Some(20_000_000_000));
    assert_eq!(app.usage.spent_month, 1000);

    // The minimal fixture takes the documented defaults.
    let min: SnapshotDoc = serde_json::from_slice(&fixture("snapshot.json")).unwrap();
    assert_eq!(min.orgs[0].price_factor_ppm, 1_000_000);
    assert!(min.orgs[0].limits.rpm.is_none() && min.orgs[0].limits.budget_day.is_none());
    assert_eq!(min.keys[0].secret_version, 1);
    assert!(min.keys[0].allowed_ips.is_none() && min.keys[0].not_before.is_none());
    assert!(min.blocked_ips.is_empty());
    assert!(min.elsewhere_keys.is_empty());
    assert!(min.applications.is_empty() && min.keys[0].application_id.is_none());
}

#[test]
fn admission_objects_reject_unknown_fields_by_name() {
    let engine = contract_engine();
    assert_unknown_fields_refused(
        &engine,
        "snapshot_full.json",
        50,
        &[
            "/orgs/0/limits",
            "/orgs/0/usage",
            "/orgs/0/guard",
            "/keys/0/limits",
            "/keys/0/usage",
            "/blocked_ips/0",
            "/elsewhere_keys/0",
            "/applications/0",
            "/applications/0/limits",
            "/applications/0/usage",
        ],
    );
}

#[test]
fn engine_config_accepts_previous_key_hash_secrets() {
    let mut v: Value = serde_json::from_slice(&fixture("engine_config.json")).unwrap();
    v["key_hash_secret_version"] = Value::from(3);
    v["previous_key_hash_secrets"] = serde_json::json!([{"version": 2, "secret_hex": "00ff"}]);
    let cfg = EngineConfig::from_json(v.to_string().as_bytes()).unwrap();
    assert_eq!(cfg.key_hash_secret_version, 3);
    assert_eq!(cfg.previous_key_hash_secrets[0].version, 2);
    v["previous_key_hash_secrets"] = serde_json::json!([{"version": 3, "secret_hex": "00ff"}]);
    assert!(EngineConfig::from_json(v.to_string().as_bytes()).is_err());
}
