//! Snapshot builders: the specs' one (orgs rich, poor and disabled behind one upstream) and
//! the pieces of the routing snapshots (providers, deployments, orgs `org_a` and `org_b`).

use std::net::SocketAddr;

use serde_json::{json, Value};

use super::{key_hash, merge};

/// The specs' snapshot: its providers reach `upstream`.
pub fn spec_snapshot(version: u64, upstream: SocketAddr, rich_balance: i64) -> Value {
    let key = |k: &str, id: &str, org: &str, status: &str, expires: Value, allowed: Value| {
        json!({"hash": key_hash(k), "key_id": id, "display": "ot-…", "org_id": org, "account_id": "acc_1",
               "status": status, "expires_at": expires, "allowed_models": allowed})
    };
    json!({
        "version": version,
        "orgs": [
            {"id": "org_rich", "status": "active", "balance": rich_balance, "spent_mark": 0},
            {"id": "org_poor", "status": "active", "balance": 10, "spent_mark": 0},
            {"id": "org_off", "status": "disabled", "balance": 1_000_000_000, "spent_mark": 0}
        ],
        "keys": [
            key("ot-good", "key_good", "org_rich", "active", Value::Null, Value::Null),
            key("ot-revoked", "key_revoked", "org_rich", "revoked", Value::Null, Value::Null),
            key("ot-expired", "key_expired", "org_rich", "active", json!(1), Value::Null),
            key("ot-poor", "key_poor", "org_poor", "active", Value::Null, Value::Null),
            key("ot-off", "key_off", "org_off", "active", Value::Null, Value::Null),
            key("ot-embed-only", "key_embed", "org_rich", "active", Value::Null, json!(["demo-embed"]))
        ],
        "providers": [{
            "id": "prov_test", "name": "test", "protocol": "openai",
            "base_url": format!("http://{upstream}/v1"), "api_key": "sk-upstream",
            "connect_timeout_ms": 1000, "first_byte_timeout_ms": 3000, "idle_timeout_ms": 3000
        }],
        "models": [
            {"name": "demo-chat", "kind": "chat", "provider_id": "prov_test", "upstream_model": "mock-gpt",
             "input_price": 500_000_000, "output_price": 1_500_000_000, "cached_input_price": 250_000_000, "max_output_tokens": 4096},
            {"name": "demo-embed", "kind": "embedding", "provider_id": "prov_test", "upstream_model": "mock-embed",
             "input_price": 20_000_000, "output_price": 0, "cached_input_price": 0, "max_output_tokens": 0}
        ]
    })
}

/// A provider entry. `base` is the full base URL.
pub fn provider(id: &str, protocol: &str, base: String, extra: Value) -> Value {
    let mut p = json!({
        "id": id, "name": id, "protocol": protocol, "base_url": base, "api_key": "sk-up",
        "connect_timeout_ms": 500, "first_byte_timeout_ms": 3000, "idle_timeout_ms": 3000,
    });
    merge(&mut p, extra);
    p
}

pub fn openai(id: &str, addr: SocketAddr, extra: Value) -> Value {
    provider(id, "openai", format!("http://{addr}/v1"), extra)
}

/// A chat deployment. Prices: nano-units per million tokens.
pub fn deployment(
    name: &str,
    provider_id: &str,
    upstream: &str,
    input: i64,
    output: i64,
    extra: Value,
) -> Value {
    let mut m = json!({
        "name": name, "kind": "chat", "provider_id": provider_id, "upstream_model": upstream,
        "input_price": input, "output_price": output, "cached_input_price": 0, "max_output_tokens": 1000,
    });
    merge(&mut m, extra);
    m
}

/// A snapshot: org `org_a` (key `ot-a`, `key_a`) and org `org_b` (key `ot-b`); `extra`
/// is merged at the top level (routes, routing), `org_policy`/`key_policy` apply to
/// org_a and its key.
pub fn snapshot(
    version: u64,
    providers: Vec<Value>,
    models: Vec<Value>,
    extra: Value,
    org_policy: Value,
    key_policy: Value,
) -> Value {
    let mut s = json!({
        "version": version,
        "orgs": [
            {"id": "org_a", "status": "active", "balance": 1_000_000_000_000i64, "spent_mark": 0, "policy": org_policy},
            {"id": "org_b", "status": "active", "balance": 1_000_000_000_000i64, "spent_mark": 0},
        ],
        "keys": [
            {"hash": key_hash("ot-a"), "key_id": "key_a", "display": "ot-…", "org_id": "org_a", "account_id": "acc_a",
             "status": "active", "expires_at": null, "allowed_models": null, "policy": key_policy},
            {"hash": key_hash("ot-b"), "key_id": "key_b", "display": "ot-…", "org_id": "org_b", "account_id": "acc_b",
             "status": "active", "expires_at": null, "allowed_models": null},
        ],
        "providers": providers,
        "models": models,
    });
    merge(&mut s, extra);
    s
}
