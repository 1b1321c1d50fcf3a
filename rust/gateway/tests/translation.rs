//! Protocol specs: OpenAI chat clients on Anthropic and Gemini upstreams, Anthropic
//! Messages clients on OpenAI-compatible and Anthropic upstreams, Azure deployment URLs,
//! and the Responses API, streaming and not, with tool calls, usage and failures. The
//! shapes asserted are the ones the official openai and anthropic SDKs read.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod harness;

use harness::*;
use onetoken_mock_upstream::MockServer;
use serde_json::{json, Value};

const IN_PRICE: i64 = 2_000_000_000;
const OUT_PRICE: i64 = 6_000_000_000;
const TEXT: &str = "tok tok tok tok tok tok tok tok ";
const ANTHROPIC: &[(&str, &str)] = &[("x-api-key", "ot-a"), ("anthropic-version", "2023-06-01")];

fn cost(prompt: u64, completion: u64) -> i64 {
    let c = |t: u64, p: i64| ((i128::from(t) * i128::from(p) + 999_999) / 1_000_000) as i64;
    c(prompt, IN_PRICE) + c(completion, OUT_PRICE)
}

/// One model "m" served by `protocol` on `up`, plus "m-openai" on an OpenAI mock.
fn fleet_for(protocol: &str, up: &MockServer, openai_up: &MockServer) -> Gateway {
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
    let snap = snapshot(
        1,
        vec![
            provider("prov_x", protocol, base, extra),
            openai("prov_o", openai_up.addr(), json!({})),
        ],
        vec![
            deployment("m", "prov_x", "up-model", IN_PRICE, OUT_PRICE, json!({})),
            deployment(
                "m-openai",
                "prov_o",
                "mock-gpt",
                IN_PRICE,
                OUT_PRICE,
                json!({}),
            ),
        ],
        json!({"routing": {"backoff_ms": 1}}),
        json!({}),
        json!({}),
    );
    Gateway::serving(snap)
}

fn tools() -> Value {
    json!([{"type": "function", "function": {"name": "lookup_city", "description": "d",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "additionalProperties": false}}}])
}

/// The chat chunks of an OpenAI stream: role first, then deltas; `[DONE]` last.
fn chat_stream(r: &Reply) -> (String, Vec<Value>, Option<Value>, Vec<Value>) {
    let events = r.events();
    assert_eq!(
        events.last().unwrap().1,
        Value::String("[DONE]".into()),
        "{}",
        r.text()
    );
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| e.1.clone())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let mut text = String::new();
    let mut finish = Vec::new();
    let mut tool_deltas = Vec::new();
    let mut usage = None;
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert!(c["id"].as_str().unwrap().starts_with("chatcmpl-"));
        if let Some(ch) = c["choices"].as_array().unwrap().first() {
            text.push_str(ch["delta"]["content"].as_str().unwrap_or(""));
            if let Some(tc) = ch["delta"]["tool_calls"].as_array() {
                tool_deltas.extend(tc.iter().cloned());
            }
            if !ch["finish_reason"].is_null() {
                finish.push(ch["finish_reason"].clone());
            }
        }
        if !c["usage"].is_null() {
            usage = Some(c["usage"].clone());
        }
    }
    (text, finish, usage, tool_deltas)
}

/// Join OpenAI tool-call deltas as the SDK does: by index, `function` on every delta.
fn joined_tool(deltas: &[Value]) -> (String, String, Value) {
    let first = &deltas[0];
    assert_eq!(first["index"], 0);
    assert_eq!(first["type"], "function");
    let mut args = String::new();
    for d in deltas {
        assert!(
            d["function"].is_object(),
            "every tool delta carries `function`"
        );
        args.push_str(d["function"]["arguments"].as_str().unwrap_or(""));
    }
    (
        first["id"].as_str().unwrap().to_owned(),
        first["function"]["name"].as_str().unwrap().to_owned(),
        serde_json::from_str(&args).unwrap(),
    )
}

async fn openai_client_on(protocol: &str) {
    let (up, o) = (mock(), mock());
    let fleet = fleet_for(protocol, &up, &o);
    // Whole reply.
    let r = post_chat(
        fleet.addr,
        chat_body("m", "hi there", json!({"max_tokens": 50})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["message"]["content"], TEXT);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["usage"]["prompt_tokens"], 6);
    assert_eq!(v["usage"]["completion_tokens"], 8);
    assert_eq!(v["usage"]["total_tokens"], 14);
    // Stream with usage asked for.
    let r = post_chat(
        fleet.addr,
        chat_body(
            "m",
            "hi there",
            json!({"stream": true, "stream_options": {"include_usage": true}}),
        ),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["content-type"], "text/event-stream");
    let (text, finish, usage, _) = chat_stream(&r);
    assert_eq!(text, TEXT);
    assert_eq!(finish, [json!("stop")]);
    let usage = usage.unwrap();
    assert_eq!(
        (
            usage["prompt_tokens"].as_u64(),
            usage["completion_tokens"].as_u64()
        ),
        (Some(6), Some(8))
    );
    // Stream without usage: no usage chunk reaches the client, billing still has it.
    let r = post_chat(
        fleet.addr,
        chat_body("m", "hi there", json!({"stream": true})),
    )
    .await;
    let (text, _, usage, _) = chat_stream(&r);
    assert_eq!((text.as_str(), usage), (TEXT, None));
    // Tool calls, whole and streamed.
    let body = chat_body(
        "m",
        "weather?",
        json!({"tools": tools(), "mock": {"tool_call": true}}),
    );
    let r = post_chat(fleet.addr, body.clone()).await;
    let v = r.json();
    let call = &v["choices"][0]["message"]["tool_calls"][0];
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(call["type"], "function");
    assert_eq!(call["function"]["name"], "lookup_city");
    let args: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args, json!({"city": "Paris", "unit": "celsius"}));
    let mut stream_body = body;
    stream_body["stream"] = json!(true);
    let r = post_chat(fleet.addr, stream_body).await;
    let (text, finish, _, deltas) = chat_stream(&r);
    assert_eq!(text, "");
    assert_eq!(finish, [json!("tool_calls")]);
    let (id, name, args) = joined_tool(&deltas);
    assert!(!id.is_empty());
    assert_eq!(name, "lookup_city");
    assert_eq!(args, json!({"city": "Paris", "unit": "celsius"}));
    // Billing: upstream usage at the deployment's prices, for each of the five calls.
    let recs = fleet.take_records(5).await;
    for rec in &recs {
        assert_eq!(
            (rec.status, rec.usage_source, rec.provider.as_str()),
            (200, "upstream", "prov_x"),
            "{rec:?}"
        );
        assert_eq!(rec.model_served, "up-model");
    }
    assert_eq!(recs[0].cost, cost(6, 8));
    assert_eq!(recs[1].cost, cost(6, 8));
    assert_eq!(recs[1].streamed, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_client_on_an_anthropic_upstream() {
    openai_client_on("anthropic").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_client_on_a_gemini_upstream() {
    openai_client_on("gemini").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_client_on_azure_deployment_urls() {
    openai_client_on("azure").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn translated_failures_keep_upstream_bodies_out() {
    for protocol in ["anthropic", "gemini"] {
        let (up, o) = (mock(), mock());
        let fleet = fleet_for(protocol, &up, &o);
        // An upstream error echoing the prompt: our own error, upstream status kept.
        let r = post_chat(
            fleet.addr,
            chat_body("m", CANARY, json!({"mock": {"status": 400, "echo": true}})),
        )
        .await;
        assert_eq!(r.status, 400, "{protocol}");
        assert_eq!(r.json()["error"]["code"], "upstream_error");
        // A stream cut after two deltas: those two, then the gateway's error event.
        let s = cut_stream(fleet.addr, "m").await;
        let events = s.events();
        let last = &events.last().unwrap().1;
        assert_eq!(
            last["error"]["code"],
            "upstream_stream_cut",
            "{protocol}: {}",
            s.text()
        );
        let text: String = events
            .iter()
            .filter_map(|e| e.1["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(text, "tok tok ", "{protocol}");
        let recs = fleet.take_records(2).await;
        assert_eq!((recs[0].cost, recs[0].usage_source), (0, "none"));
        assert_eq!(
            (recs[1].error_code, recs[1].usage_source),
            ("upstream_stream_cut", "estimated")
        );
        assert!(recs[1].cost > 0, "what was relayed is charged");
        fleet.assert_no_canary(&recs, &[&r, &s]);
    }
}

/// Anthropic stream events, each named (the SDK skips unnamed events).
fn anthropic_events(r: &Reply) -> Vec<(String, Value)> {
    r.events()
        .into_iter()
        .map(|(name, data)| {
            let name = name.unwrap_or_else(|| panic!("unnamed event in {}", r.text()));
            assert_eq!(data["type"], name.as_str());
            (name, data)
        })
        .collect()
}

async fn anthropic_client_on(protocol: &str) {
    let (up, o) = (mock(), mock());
    let fleet = fleet_for(protocol, &up, &o);
    let model = if protocol == "openai" {
        "m-openai"
    } else {
        "m"
    };
    let body = json!({"model": model, "max_tokens": 64, "system": "be brief",
                      "messages": [{"role": "user", "content": "hi there"}]});
    let r = send(fleet.addr, "/v1/messages", ANTHROPIC, body.clone()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(
        (v["type"].as_str(), v["role"].as_str()),
        (Some("message"), Some("assistant"))
    );
    assert_eq!(v["content"][0], json!({"type": "text", "text": TEXT}));
    assert_eq!(v["stop_reason"], "end_turn");
    assert!(v["usage"]["input_tokens"].as_u64().unwrap() > 0);
    assert_eq!(v["usage"]["output_tokens"], 8);
    // Streamed.
    let mut sb = body.clone();
    sb["stream"] = json!(true);
    let r = send(fleet.addr, "/v1/messages", ANTHROPIC, sb).await;
    let events = anthropic_events(&r);
    let names: Vec<&str> = events
        .iter()
        .map(|e| e.0.as_str())
        .filter(|n| *n != "ping")
        .collect();
    assert_eq!(names[0], "message_start");
    assert_eq!(names[1], "content_block_start");
    assert_eq!(
        &names[names.len() - 3..],
        ["content_block_stop", "message_delta", "message_stop"]
    );
    let text: String = events
        .iter()
        .filter_map(|e| e.1["delta"]["text"].as_str())
        .collect();
    assert_eq!(text, TEXT);
    let delta = &events.iter().find(|e| e.0 == "message_delta").unwrap().1;
    assert_eq!(delta["delta"]["stop_reason"], "end_turn");
    assert_eq!(delta["usage"]["output_tokens"], 8);
    // Tool use, streamed: a tool_use block whose partial JSON joins into the input.
    let mut tb = body;
    tb["stream"] = json!(true);
    tb["tools"] =
        json!([{"name": "lookup_city", "description": "d", "input_schema": {"type": "object"}}]);
    tb["mock"] = json!({"tool_call": true});
    let r = send(fleet.addr, "/v1/messages", ANTHROPIC, tb.clone()).await;
    let events = anthropic_events(&r);
    let start = events
        .iter()
        .find(|e| e.1["content_block"]["type"] == "tool_use")
        .unwrap();
    assert_eq!(start.1["content_block"]["name"], "lookup_city");
    let index = start.1["index"].clone();
    let json_text: String = events
        .iter()
        .filter(|e| e.1["index"] == index)
        .filter_map(|e| e.1["delta"]["partial_json"].as_str())
        .collect();
    assert_eq!(
        serde_json::from_str::<Value>(&json_text).unwrap(),
        json!({"city": "Paris", "unit": "celsius"})
    );
    let delta = &events.iter().find(|e| e.0 == "message_delta").unwrap().1;
    assert_eq!(delta["delta"]["stop_reason"], "tool_use");
    // Tool use, whole.
    tb["stream"] = json!(false);
    let v = send(fleet.addr, "/v1/messages", ANTHROPIC, tb).await.json();
    let block = v["content"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["type"] == "tool_use")
        .unwrap()
        .clone();
    assert_eq!(block["input"], json!({"city": "Paris", "unit": "celsius"}));
    assert_eq!(v["stop_reason"], "tool_use");
    let recs = fleet.take_records(4).await;
    for rec in &recs {
        assert_eq!(
            (rec.status, rec.usage_source, rec.path),
            (200, "upstream", "/v1/messages"),
            "{rec:?}"
        );
        assert_eq!(rec.completion_tokens, 8);
        assert!(rec.cost > 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_client_on_an_openai_upstream() {
    anthropic_client_on("openai").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_client_passed_through_to_an_anthropic_upstream() {
    anthropic_client_on("anthropic").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_client_on_a_gemini_upstream() {
    anthropic_client_on("gemini").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_clients_get_anthropic_shaped_errors_and_models() {
    let (up, o) = (mock(), mock());
    let fleet = fleet_for("anthropic", &up, &o);
    let body =
        json!({"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": CANARY}]});
    // (headers, body, status, error type)
    type Case = (Vec<(&'static str, &'static str)>, Value, u16, &'static str);
    let cases: Vec<Case> = vec![
        (
            vec![("anthropic-version", "2023-06-01")],
            body.clone(),
            401,
            "authentication_error",
        ),
        (
            ANTHROPIC.to_vec(),
            json!({"model": "nope", "max_tokens": 1, "messages": [{"role": "user", "content": "x"}]}),
            404,
            "not_found_error",
        ),
        (ANTHROPIC.to_vec(), json!([1]), 400, "invalid_request_error"),
        (
            ANTHROPIC.to_vec(),
            {
                let mut b = body.clone();
                b["mock"] = json!({"status": 529, "echo": true});
                b
            },
            529,
            "overloaded_error",
        ),
    ];
    let mut replies = Vec::new();
    for (headers, body, status, kind) in cases {
        let r = send(fleet.addr, "/v1/messages", &headers, body).await;
        assert_eq!(r.status.as_u16(), status, "{}", r.text());
        let v = r.json();
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], kind);
        assert!(v["error"]["message"].is_string());
        replies.push(r);
    }
    let m = get(fleet.addr, "/v1/models", ANTHROPIC).await.json();
    assert_eq!(m["data"][0]["type"], "model");
    assert_eq!(m["has_more"], false);
    let recs = fleet.take_records(4).await;
    let refs: Vec<&Reply> = replies.iter().collect();
    fleet.assert_no_canary(&recs, &refs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_error_event_mid_stream_never_reaches_the_client() {
    let scripted = Scripted::start(1);
    let snap = snapshot(
        1,
        vec![provider(
            "prov_x",
            "anthropic",
            format!("http://{}/v1", scripted.addr),
            json!({}),
        )],
        vec![deployment(
            "m",
            "prov_x",
            "claude-x",
            IN_PRICE,
            OUT_PRICE,
            json!({}),
        )],
        json!({}),
        json!({}),
        json!({}),
    );
    let fleet = Gateway::serving(snap);
    let body = json!({"model": "m", "max_tokens": 10, "stream": true,
                      "messages": [{"role": "user", "content": "hi"}]});
    let a = send(fleet.addr, "/v1/messages", ANTHROPIC, body.clone()).await;
    let last = a.events().last().unwrap().clone();
    assert_eq!(last.0.as_deref(), Some("error"));
    assert_eq!(last.1["error"]["type"], "api_error");
    let mut chat_req = chat_body("m", "hi", json!({"stream": true}));
    chat_req["max_tokens"] = json!(10);
    let o = post_chat(fleet.addr, chat_req).await;
    assert_eq!(
        o.events().last().unwrap().1["error"]["code"],
        "upstream_stream_cut"
    );
    let recs = fleet.take_records(2).await;
    for rec in &recs {
        assert_eq!(
            (rec.error_code, rec.usage_source),
            ("upstream_stream_cut", "estimated")
        );
    }
    fleet.assert_no_canary(&recs, &[&a, &o]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_api_is_passed_through_and_metered() {
    let (up, o) = (mock(), mock());
    let fleet = fleet_for("anthropic", &up, &o);
    let r = send_a(
        fleet.addr,
        "/v1/responses",
        json!({"model": "m-openai", "input": "hi there"}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["object"], "response");
    assert_eq!(v["output"][0]["content"][0]["text"], TEXT);
    let r = send_a(
        fleet.addr,
        "/v1/responses",
        json!({"model": "m-openai", "input": "hi there", "stream": true}),
    )
    .await;
    let events = r.events();
    assert_eq!(events[0].0.as_deref(), Some("response.created"));
    assert_eq!(
        events.last().unwrap().0.as_deref(),
        Some("response.completed")
    );
    let text: String = events
        .iter()
        .filter(|e| e.1["type"] == "response.output_text.delta")
        .filter_map(|e| e.1["delta"].as_str())
        .collect();
    assert_eq!(text, TEXT);
    // A cut Responses stream is estimated from the relayed deltas.
    let c = send_a(
        fleet.addr,
        "/v1/responses",
        json!({"model": "m-openai", "input": "hi there", "stream": true, "mock": {"cut_after": 3}}),
    )
    .await;
    assert_eq!(
        c.events().last().unwrap().1["error"]["code"],
        "upstream_stream_cut"
    );
    // A model only an Anthropic provider serves cannot answer the Responses API.
    let n = send_a(
        fleet.addr,
        "/v1/responses",
        json!({"model": "m", "input": "hi"}),
    )
    .await;
    assert_eq!(n.status, 404);
    let recs = fleet.take_records(4).await;
    for rec in &recs[..2] {
        assert_eq!((rec.path, rec.usage_source), ("/v1/responses", "upstream"));
        assert_eq!((rec.prompt_tokens, rec.completion_tokens), (6, 8));
        assert_eq!(rec.cost, cost(6, 8));
    }
    let relayed = 3 * onetoken_gateway::tokens::count("tok ") as u32;
    assert_eq!(
        (recs[2].usage_source, recs[2].completion_tokens),
        ("estimated", relayed)
    );
    assert_eq!(recs[3].error_code, "model_not_found");
}
