//! Only what is needed reaches a provider (policy clause VIII.1): whatever a client sends
//! beside its body (its key, User-Agent, cookies, forwarding and tracing headers, vendor
//! headers of its own), an upstream request carries only the headers the gateway writes
//! itself: the provider's credential and version header, the body's type and length, the
//! stream `accept`, and the hop marker against loops (docs/gateway-spec.md "What
//! providers receive"). Checked on every client API and every upstream protocol, streaming
//! and not, translated or passed through.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod harness;

use std::collections::BTreeSet;

use harness::*;
use onetoken_mock_upstream::MockServer;
use serde_json::{json, Value};

/// Headers a client may send that must never travel on: (name, value). The key itself is
/// added per API (`authorization` or `x-api-key`).
const CLIENT_HEADERS: &[(&str, &str)] = &[
    ("user-agent", "canary-agent/7.1 client-9d2f"),
    ("x-forwarded-for", "203.0.113.77"),
    ("x-real-ip", "203.0.113.77"),
    ("forwarded", "for=203.0.113.77;proto=https"),
    ("cookie", "session=canary-cookie-41b8"),
    ("origin", "https://canary-origin.example"),
    ("referer", "https://canary-origin.example/page"),
    ("accept-language", "canary-lang"),
    (
        "traceparent",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    ),
    ("tracestate", "canary=trace"),
    ("baggage", "canary=baggage"),
    ("openai-organization", "org-canary-5e1a"),
    ("openai-project", "proj-canary-5e1a"),
    ("x-stainless-lang", "canary-lang"),
    ("anthropic-beta", "canary-beta-2025"),
    ("x-canary-custom", "canary-custom-77c0"),
];

/// What distinguishes the client's request: none of it may appear in any upstream value.
const CLIENT_MARKS: &[&str] = &["ot-a", "canary", "203.0.113.77", "4bf92f3577b34da6"];

/// The upstream credential of every provider in the harness snapshots.
const UPSTREAM_KEY: &str = "sk-up";

/// The headers an upstream request may carry for `protocol`, with the credential header.
fn allowed(protocol: &str) -> (BTreeSet<&'static str>, &'static str) {
    let credential = match protocol {
        "openai" => "authorization",
        "azure" => "api-key",
        "anthropic" => "x-api-key",
        "gemini" => "x-goog-api-key",
        _ => unreachable!(),
    };
    let mut names = BTreeSet::from([
        "host",
        "content-type",
        "content-length",
        "accept",
        "x-onetoken-hop",
        credential,
    ]);
    if protocol == "anthropic" {
        names.insert("anthropic-version");
    }
    (names, credential)
}

fn fleet_for(protocol: &str, up: &MockServer) -> Gateway {
    let base = match protocol {
        "anthropic" | "openai" => format!("http://{}/v1", up.addr()),
        "gemini" => format!("http://{}/v1beta", up.addr()),
        _ => format!("http://{}", up.addr()),
    };
    let extra = match protocol {
        "anthropic" => json!({"api_version": "2023-06-01", "vendor": "anthropic"}),
        "azure" => json!({"api_version": "2024-10-21", "vendor": "openai"}),
        _ => json!({}),
    };
    let mut embed = deployment("e", "prov_x", "mock-embed", 1, 0, json!({}));
    embed["kind"] = json!("embedding");
    let snap = snapshot(
        1,
        vec![provider("prov_x", protocol, base, extra)],
        vec![
            deployment("m", "prov_x", "mock-gpt", 1, 1, json!({})),
            embed,
        ],
        json!({"routing": {"backoff_ms": 1, "max_attempts": 1}}),
        json!({}),
        json!({}),
    );
    Gateway::serving(snap)
}

/// (client API path, its key header, body) for each request kind a client can make.
fn requests() -> Vec<(&'static str, (&'static str, &'static str), Value)> {
    let bearer = ("authorization", "Bearer ot-a");
    let anthropic_key = ("x-api-key", "ot-a");
    let chat = |stream: bool| json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": stream});
    let messages = |stream: bool| {
        json!({"model": "m", "max_tokens": 16, "stream": stream,
               "messages": [{"role": "user", "content": "hi"}]})
    };
    let responses = |stream: bool| json!({"model": "m", "input": "hi", "stream": stream});
    vec![
        ("/v1/chat/completions", bearer, chat(false)),
        ("/v1/chat/completions", bearer, chat(true)),
        ("/v1/messages", anthropic_key, messages(false)),
        ("/v1/messages", anthropic_key, messages(true)),
        ("/v1/responses", bearer, responses(false)),
        ("/v1/responses", bearer, responses(true)),
        (
            "/v1/embeddings",
            bearer,
            json!({"model": "e", "input": "hi"}),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_client_header_reaches_any_upstream() {
    let mut forwarded = 0;
    let mut served = Vec::new();
    for protocol in ["openai", "azure", "anthropic", "gemini"] {
        let up = mock();
        up.record_headers();
        let fleet = fleet_for(protocol, &up);
        let (names, credential) = allowed(protocol);
        for (path, key, body) in requests() {
            let mut headers: Vec<(&str, &str)> = CLIENT_HEADERS.to_vec();
            headers.push(key);
            if path == "/v1/messages" {
                headers.push(("anthropic-version", "2023-06-01"));
            }
            let r = send(fleet.addr, path, &headers, body).await;
            let seen = up.take_headers();
            // A pair the gateway does not translate is refused before any upstream call.
            if r.status != 200 {
                assert!(
                    seen.is_empty(),
                    "{protocol} {path}: {} and still forwarded",
                    r.status
                );
                continue;
            }
            served.push(format!("{protocol} {path}"));
            assert!(
                !seen.is_empty(),
                "{protocol} {path}: served without an upstream call"
            );
            for request in &seen {
                forwarded += 1;
                let got: BTreeSet<&str> = request.iter().map(|(n, _)| n.as_str()).collect();
                assert!(
                    got.is_subset(&names),
                    "{protocol} {path}: extra headers {:?}",
                    got.difference(&names).collect::<Vec<_>>()
                );
                for (name, value) in request {
                    for mark in CLIENT_MARKS {
                        assert!(
                            !value.contains(mark),
                            "{protocol} {path}: {name} carries client data"
                        );
                    }
                }
                let cred = request.iter().find(|(n, _)| n == credential).unwrap();
                let expected = if protocol == "openai" {
                    format!("Bearer {UPSTREAM_KEY}")
                } else {
                    UPSTREAM_KEY.to_owned()
                };
                assert_eq!(cred.1, expected, "{protocol} {path}");
            }
        }
    }
    // Every protocol served chat and Messages clients, streaming and not; the check is
    // not vacuous.
    for protocol in ["openai", "azure", "anthropic", "gemini"] {
        for path in ["/v1/chat/completions", "/v1/messages"] {
            let n = served
                .iter()
                .filter(|s| **s == format!("{protocol} {path}"))
                .count();
            assert_eq!(n, 2, "{protocol} {path}: {served:?}");
        }
    }
    assert!(
        served.iter().any(|s| s.ends_with("/v1/responses")),
        "{served:?}"
    );
    assert!(
        served.iter().any(|s| s.ends_with("/v1/embeddings")),
        "{served:?}"
    );
    assert!(forwarded >= 16, "{forwarded}");
}
