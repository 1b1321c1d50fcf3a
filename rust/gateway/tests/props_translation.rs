//! Properties of request admission and protocol translation, through a running gateway in
//! front of the bundled mock (which speaks every upstream protocol):
//! - generated OpenAI chat requests, whole and streamed, to Anthropic, Gemini and OpenAI
//!   deployments come back as OpenAI answers with the text and the usage numbers the
//!   upstream reported, and the call record carries the same numbers;
//! - arbitrary bytes on every client API get a 4xx in the API's error shape, never a 5xx,
//!   and the error never quotes the request;
//! - arbitrary JSON objects for a translated model never make the gateway fail (500).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod harness;

use std::cell::Cell;

use bytes::Bytes;
use harness::*;
use onetoken_mock_upstream::MockServer;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{json, Map, Value};

const MODELS: [&str; 3] = ["m-anthropic", "m-gemini", "m-openai"];
const PATHS: [&str; 4] = [
    "/v1/chat/completions",
    "/v1/messages",
    "/v1/responses",
    "/v1/embeddings",
];
const KEY: &[(&str, &str)] = &[
    ("authorization", "Bearer ot-a"),
    ("anthropic-version", "2023-06-01"),
];

/// A gateway with one deployment per upstream protocol, all served by one mock.
struct World {
    rt: tokio::runtime::Runtime,
    fleet: Gateway,
    /// Calls made so far (each leaves exactly one record).
    calls: Cell<u64>,
    _mock: MockServer,
}

impl World {
    fn start() -> World {
        let mock = mock();
        let addr = mock.addr();
        let snap = snapshot(
            1,
            vec![
                provider(
                    "prov_a",
                    "anthropic",
                    format!("http://{addr}/v1"),
                    json!({"api_version": "2023-06-01", "vendor": "anthropic"}),
                ),
                provider(
                    "prov_g",
                    "gemini",
                    format!("http://{addr}/v1beta"),
                    json!({}),
                ),
                openai("prov_o", addr, json!({})),
            ],
            vec![
                deployment("m-anthropic", "prov_a", "up-a", 1, 1, json!({})),
                deployment("m-gemini", "prov_g", "up-g", 1, 1, json!({})),
                deployment("m-openai", "prov_o", "mock-gpt", 1, 1, json!({})),
            ],
            json!({"routing": {"backoff_ms": 1}}),
            json!({}),
            json!({}),
        );
        World {
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
            fleet: Gateway::serving(snap),
            calls: Cell::new(0),
            _mock: mock,
        }
    }

    fn post(&self, path: &str, body: Bytes) -> Reply {
        self.calls.set(self.calls.get() + 1);
        self.rt
            .block_on(send_bytes(self.fleet.addr, path, KEY, body))
    }

    /// The record of the last call (earlier ones, left by a failed case, are dropped).
    fn last_record(&self) -> onetoken_gateway::CallRecord {
        let mut recs = self.rt.block_on(self.fleet.take_records(self.calls.get()));
        recs.pop().expect("a record of the call")
    }
}

fn config(cases: u32) -> Config {
    Config {
        cases,
        // Each case is a network round trip: shrink a failure, but not for long.
        max_shrink_iters: 200,
        // No source file to keep regressions next to: a failure prints its input.
        failure_persistence: None,
        ..Config::default()
    }
}

/// Text of a message: any printable characters, quotes and escapes included.
fn text() -> impl Strategy<Value = String> {
    "\\PC{0,40}"
}

fn content() -> impl Strategy<Value = Value> {
    prop_oneof![
        3 => text().prop_map(Value::String),
        1 => prop::collection::vec(text(), 1..3).prop_map(|parts| {
            Value::Array(parts.into_iter().map(|t| json!({"type": "text", "text": t})).collect())
        }),
    ]
}

fn messages() -> impl Strategy<Value = Vec<Value>> {
    let earlier = prop::collection::vec(
        (
            prop::sample::select(vec!["system", "user", "assistant"]),
            content(),
        ),
        0..4,
    );
    (earlier, content()).prop_map(|(earlier, last)| {
        let mut out: Vec<Value> = earlier
            .into_iter()
            .map(|(role, c)| json!({"role": role, "content": c}))
            .collect();
        out.push(json!({"role": "user", "content": last}));
        out
    })
}

/// Sampling options a client may add, each one present or not.
fn options() -> impl Strategy<Value = Map<String, Value>> {
    (
        proptest::option::of(0.0f64..2.0),
        proptest::option::of(0.0f64..1.0),
        proptest::option::of(1u64..2000),
        proptest::option::of(prop_oneof![
            text().prop_map(Value::String),
            prop::collection::vec(text(), 1..3).prop_map(|v| json!(v)),
        ]),
        proptest::option::of("[a-z0-9-]{1,16}"),
    )
        .prop_map(|(temperature, top_p, max_tokens, stop, user)| {
            let mut o = Map::new();
            if let Some(t) = temperature {
                o.insert("temperature".into(), json!(t));
            }
            if let Some(p) = top_p {
                o.insert("top_p".into(), json!(p));
            }
            if let Some(m) = max_tokens {
                o.insert("max_tokens".into(), json!(m));
            }
            if let Some(s) = stop {
                o.insert("stop".into(), s);
            }
            if let Some(u) = user {
                o.insert("user".into(), json!(u));
            }
            o
        })
}

#[derive(Debug, Clone)]
struct ChatCase {
    model: &'static str,
    stream: bool,
    messages: Vec<Value>,
    options: Map<String, Value>,
    chunks: u64,
    prompt: u64,
    cached: u64,
}

fn chat_case() -> impl Strategy<Value = ChatCase> {
    (
        prop::sample::select(MODELS.to_vec()),
        any::<bool>(),
        messages(),
        options(),
        1u64..6,
        1u64..1_000_000,
        0u64..=100,
    )
        .prop_map(
            |(model, stream, messages, options, chunks, prompt, cached_pct)| ChatCase {
                model,
                stream,
                messages,
                options,
                chunks,
                prompt,
                cached: prompt * cached_pct / 100,
            },
        )
}

/// Text and usage of an OpenAI chat answer, whole or streamed.
fn answer(r: &Reply, stream: bool) -> (String, Value) {
    if !stream {
        let v = r.json();
        let text = v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or("")
            .to_owned();
        return (text, v["usage"].clone());
    }
    let events = r.events();
    assert_eq!(events.last().unwrap().1, json!("[DONE]"), "{}", r.text());
    let mut text = String::new();
    let mut usage = Value::Null;
    for (_, chunk) in &events[..events.len() - 1] {
        if let Some(c) = chunk["choices"][0]["delta"]["content"].as_str() {
            text.push_str(c);
        }
        if !chunk["usage"].is_null() {
            usage = chunk["usage"].clone();
        }
    }
    (text, usage)
}

#[test]
fn translated_chat_keeps_the_text_and_the_usage_numbers() {
    let world = World::start();
    let mut runner = TestRunner::new(config(256));
    runner
        .run(&chat_case(), |case| {
            let mut body = case.options.clone();
            body.insert("model".into(), json!(case.model));
            body.insert("messages".into(), json!(case.messages));
            body.insert(
                "mock".into(),
                json!({"chunks": case.chunks, "prompt_tokens": case.prompt, "cached_tokens": case.cached}),
            );
            if case.stream {
                body.insert("stream".into(), json!(true));
                body.insert("stream_options".into(), json!({"include_usage": true}));
            }
            // The mock answers at most max_tokens tokens, as a real model does.
            let max_tokens = case.options.get("max_tokens").and_then(Value::as_u64);
            let chunks = max_tokens.map_or(case.chunks, |cap| case.chunks.min(cap));
            let r = world.post(PATHS[0], Bytes::from(Value::Object(body).to_string()));
            prop_assert_eq!(r.status, 200, "{}", r.text());
            let (text, usage) = answer(&r, case.stream);
            prop_assert_eq!(text, "tok ".repeat(chunks as usize));
            prop_assert_eq!(usage["prompt_tokens"].as_u64(), Some(case.prompt), "{}", usage);
            prop_assert_eq!(usage["completion_tokens"].as_u64(), Some(chunks), "{}", usage);
            prop_assert_eq!(
                usage["total_tokens"].as_u64(),
                Some(case.prompt + chunks),
                "{}",
                usage
            );
            let cached = usage
                .pointer("/prompt_tokens_details/cached_tokens")
                .and_then(Value::as_u64)
                .unwrap_or(0);
            prop_assert_eq!(cached, case.cached, "{}", usage);
            let rec = world.last_record();
            prop_assert_eq!(
                (u64::from(rec.prompt_tokens), u64::from(rec.completion_tokens), u64::from(rec.cached_tokens)),
                (case.prompt, chunks, case.cached)
            );
            prop_assert_eq!(rec.status, 200);
            Ok(())
        })
        .unwrap();
}

/// Bodies a client may send by mistake or on purpose: random bytes, cut JSON, JSON that
/// is not an object, objects without a usable model, and wrong types. `tag` is a marker
/// placed in the body that the error must not quote.
fn bad_body(tag: String) -> impl Strategy<Value = Vec<u8>> {
    let t = tag.clone();
    let valid =
        json!({"model": "m-openai", "messages": [{"role": "user", "content": tag}]}).to_string();
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..200),
        (0..valid.len()).prop_map(move |cut| valid.as_bytes()[..cut].to_vec()),
        prop_oneof![
            Just(json!(null)),
            Just(json!([1, 2])),
            Just(json!(t.clone())),
            Just(json!(12.5)),
            Just(json!({"messages": [{"role": "user", "content": t.clone()}]})),
            Just(json!({"model": format!("no-such-{t}"), "messages": []})),
            Just(json!({"model": 7, "messages": t.clone()})),
            Just(json!({"model": ["m-openai"], "input": t.clone()})),
            Just(json!({"model": null})),
        ]
        .prop_map(|v| v.to_string().into_bytes()),
    ]
}

#[test]
fn arbitrary_bytes_get_a_4xx_in_the_error_shape_without_echo() {
    let world = World::start();
    let mut runner = TestRunner::new(config(512));
    let case = ("[a-z]{12}", prop::sample::select(PATHS.to_vec()))
        .prop_flat_map(|(tag, path)| (Just(tag.clone()), Just(path), bad_body(tag)));
    runner
        .run(&case, |(tag, path, body)| {
            let r = world.post(path, Bytes::from(body));
            prop_assert!(
                r.status.is_client_error(),
                "{} {}: {}",
                path,
                r.status,
                r.text()
            );
            let v: Value = serde_json::from_str(&r.text()).unwrap();
            let err = &v["error"];
            prop_assert!(
                err["message"].is_string() && err["type"].is_string(),
                "{}",
                r.text()
            );
            if path == "/v1/messages" {
                prop_assert_eq!(&v["type"], "error");
            } else {
                prop_assert!(
                    err.get("param").is_some() && err.get("code").is_some(),
                    "{}",
                    r.text()
                );
            }
            prop_assert!(
                !r.text().contains(&tag),
                "the error quotes the request: {}",
                r.text()
            );
            let rec = world.last_record();
            prop_assert_eq!(rec.status, r.status.as_u16());
            Ok(())
        })
        .unwrap();
}

/// Any JSON value, strings included up to a few levels deep.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        text().prop_map(Value::String),
        prop::sample::select(vec![
            "user",
            "assistant",
            "system",
            "tool",
            "text",
            "image_url"
        ])
        .prop_map(|s| json!(s)),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(field_name(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Field names of the chat and Messages shapes, so that generated objects reach the
/// translation code rather than only its "unknown field" path.
fn field_name() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(vec![
            "messages", "role", "content", "type", "text", "tool_calls", "function", "name",
            "arguments", "tools", "tool_choice", "system", "max_tokens", "stop", "stream",
            "stream_options", "include_usage", "image_url", "url", "tool_call_id", "id",
            "parameters", "input", "temperature", "response_format",
        ])
        .prop_map(str::to_owned),
        1 => "[a-z_]{1,10}",
    ]
}

#[test]
fn arbitrary_json_for_translated_models_never_fails_the_gateway() {
    let world = World::start();
    let mut runner = TestRunner::new(config(512));
    let case = (
        prop::collection::btree_map(field_name(), any_json(), 0..8),
        prop::sample::select(MODELS.to_vec()),
        prop::sample::select(vec![PATHS[0], PATHS[1]]),
    );
    runner
        .run(&case, |(fields, model, path)| {
            let mut body: Map<String, Value> = fields.into_iter().collect();
            // The mock refuses unknown controls; they are not what is tested here.
            body.remove("mock");
            body.insert("model".into(), json!(model));
            let r = world.post(path, Bytes::from(Value::Object(body).to_string()));
            prop_assert!(
                r.status != 500 && r.status != 501,
                "{} {}: {}",
                path,
                r.status,
                r.text()
            );
            let _ = world.last_record();
            Ok(())
        })
        .unwrap();
    // Still serving.
    let r = world.post(
        PATHS[0],
        Bytes::from(chat_body("m-anthropic", "hi", json!({})).to_string()),
    );
    assert_eq!(r.status, 200, "{}", r.text());
}
