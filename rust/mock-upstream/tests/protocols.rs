//! The mock's other protocols as a client of each sees them: Anthropic Messages, Gemini,
//! the Responses API and Azure deployment paths, with tool calls and the usual controls.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod client;

use client::*;
use serde_json::{json, Value};

const V: &[(&str, &str)] = &[("anthropic-version", "2023-06-01")];

#[tokio::test]
async fn anthropic_messages_json_stream_tools_and_errors() {
    let s = start();
    let body = json!({"model": "c", "max_tokens": 5, "system": "be brief",
                      "messages": [{"role": "user", "content": "hi there"}]});
    let missing = post(&s, "/v1/messages", body.clone()).await;
    assert_eq!(missing.status, 400, "anthropic-version is required");
    let r = post_with(&s, "/v1/messages", V, body.clone()).await;
    let v = r.json();
    assert_eq!(v["type"], "message");
    assert_eq!(v["content"][0]["text"], "tok ".repeat(8));
    assert_eq!(v["stop_reason"], "end_turn");
    // 2 + 4 for the message, 2 for the system text.
    assert_eq!(v["usage"]["input_tokens"], 8);
    assert_eq!(v["usage"]["output_tokens"], 8);
    let mut sb = body.clone();
    sb["stream"] = json!(true);
    let r = post_with(&s, "/v1/messages", V, sb.clone()).await;
    assert_eq!(r.content_type, "text/event-stream");
    let names: Vec<String> = r.named_events().into_iter().map(|e| e.0.unwrap()).collect();
    assert_eq!(names.first().unwrap(), "message_start");
    assert_eq!(
        names.iter().filter(|n| *n == "content_block_delta").count(),
        8
    );
    assert_eq!(
        &names[names.len() - 3..],
        ["content_block_stop", "message_delta", "message_stop"]
    );
    sb["mock"] = json!({"tool_call": true});
    sb["tools"] = json!([{"name": "find", "input_schema": {"type": "object"}}]);
    let events = post_with(&s, "/v1/messages", V, sb.clone())
        .await
        .named_events();
    assert_eq!(events[1].1["content_block"]["type"], "tool_use");
    assert_eq!(events[1].1["content_block"]["name"], "find");
    let json_text: String = events
        .iter()
        .filter_map(|e| e.1["delta"]["partial_json"].as_str())
        .collect();
    assert_eq!(
        serde_json::from_str::<Value>(&json_text).unwrap()["city"],
        "Paris"
    );
    sb["mock"] = json!({"cut_after": 3});
    let cut = post_with(&s, "/v1/messages", V, sb.clone()).await;
    assert!(cut.body_error);
    sb["mock"] = json!({"status": 529});
    let e = post_with(&s, "/v1/messages", V, sb).await;
    assert_eq!(e.status.as_u16(), 529);
    assert_eq!(e.json()["error"]["type"], "overloaded_error");
}

#[tokio::test]
async fn gemini_generate_and_stream_with_usage_metadata() {
    let s = start();
    let body = json!({"contents": [{"role": "user", "parts": [{"text": "hi there"}]}],
                      "mock": {"chunks": 3}});
    let r = post(&s, "/v1beta/models/g:generateContent", body.clone()).await;
    let v = r.json();
    assert_eq!(
        v["candidates"][0]["content"]["parts"][0]["text"],
        "tok tok tok "
    );
    assert_eq!(v["candidates"][0]["finishReason"], "STOP");
    assert_eq!(v["usageMetadata"]["promptTokenCount"], 6);
    assert_eq!(v["usageMetadata"]["candidatesTokenCount"], 3);
    let r = post(
        &s,
        "/v1beta/models/g:streamGenerateContent?alt=sse",
        body.clone(),
    )
    .await;
    assert!(r.text().contains("\r\n\r\n"), "CRLF framing");
    let events = r.named_events();
    assert_eq!(events.len(), 3);
    assert_eq!(events[2].1["candidates"][0]["finishReason"], "STOP");
    assert!(events[1].1["candidates"][0].get("finishReason").is_none());
    let no_sse = post(&s, "/v1beta/models/g:streamGenerateContent", body.clone()).await;
    assert_eq!(no_sse.status, 404);
    let mut tb = body;
    tb["mock"] = json!({"tool_call": true});
    tb["tools"] = json!([{"functionDeclarations": [{"name": "find"}]}]);
    let v = post(&s, "/v1beta/models/g:generateContent", tb)
        .await
        .json();
    assert_eq!(
        v["candidates"][0]["content"]["parts"][0]["functionCall"]["name"],
        "find"
    );
}

#[tokio::test]
async fn responses_api_json_and_events() {
    let s = start();
    let r = post(
        &s,
        "/v1/responses",
        json!({"model": "m", "input": "hi there"}),
    )
    .await;
    let v = r.json();
    assert_eq!(v["object"], "response");
    assert_eq!(v["output"][0]["content"][0]["text"], "tok ".repeat(8));
    assert_eq!(
        (
            v["usage"]["input_tokens"].as_u64(),
            v["usage"]["output_tokens"].as_u64()
        ),
        (Some(6), Some(8))
    );
    let r = post(
        &s,
        "/v1/responses",
        json!({"model": "m", "input": "hi", "stream": true}),
    )
    .await;
    let events = r.named_events();
    for (i, (name, data)) in events.iter().enumerate() {
        assert_eq!(data["type"], name.as_deref().unwrap());
        assert_eq!(data["sequence_number"], i);
    }
    assert_eq!(
        events.last().unwrap().1["response"]["usage"]["output_tokens"],
        8
    );
    let t = post(
        &s,
        "/v1/responses",
        json!({"model": "m", "input": "hi", "mock": {"tool_call": true}}),
    )
    .await;
    assert_eq!(t.json()["output"][0]["type"], "function_call");
}

#[tokio::test]
async fn azure_deployment_paths_need_an_api_version() {
    let s = start();
    let body = json!({"messages": [{"role": "user", "content": "hi"}]});
    let no_version = post(&s, "/openai/deployments/dep/chat/completions", body.clone()).await;
    assert_eq!(no_version.status, 400);
    let r = post(
        &s,
        "/openai/deployments/dep/chat/completions?api-version=2024-10-21",
        body,
    )
    .await;
    assert_eq!(r.json()["object"], "chat.completion");
    let e = post(
        &s,
        "/openai/deployments/dep/embeddings?api-version=2024-10-21",
        json!({"input": "x"}),
    )
    .await;
    assert_eq!(e.json()["object"], "list");
    let tool = post(
        &s,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "hi"}], "mock": {"tool_call": true}}),
    )
    .await;
    assert_eq!(tool.json()["choices"][0]["finish_reason"], "tool_calls");
}
