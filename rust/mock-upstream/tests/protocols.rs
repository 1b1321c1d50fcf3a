//! The mock's other protocols as a client of each sees them: Anthropic Messages, Gemini,
//! the Responses API and Azure deployment paths, with tool calls and the usual controls.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use onetoken_mock_upstream::{MockDefaults, MockServer};
use serde_json::{json, Value};

struct Reply {
    status: StatusCode,
    content_type: String,
    text: String,
    cut: bool,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap()
    }
    /// (event name, data) of an SSE body; CRLF and LF framing both accepted.
    fn events(&self) -> Vec<(Option<String>, Value)> {
        self.text
            .replace("\r\n", "\n")
            .split("\n\n")
            .filter(|e| !e.is_empty())
            .map(|e| {
                let name = e
                    .lines()
                    .find_map(|l| l.strip_prefix("event: "))
                    .map(str::to_owned);
                let data = e.lines().find_map(|l| l.strip_prefix("data: ")).unwrap();
                (name, serde_json::from_str(data).unwrap())
            })
            .collect()
    }
}

async fn post(server: &MockServer, path: &str, headers: &[(&str, &str)], body: Value) -> Reply {
    let stream = tokio::net::TcpStream::connect(server.addr()).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut b = Request::builder()
        .method("POST")
        .uri(path)
        .header("host", "mock");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let resp = sender
        .send_request(b.body(Full::new(Bytes::from(body.to_string()))).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let content_type = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let mut text = Vec::new();
    let mut body = resp.into_body();
    let mut cut = false;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => text.extend_from_slice(&f.into_data().unwrap_or_default()),
            Err(_) => {
                cut = true;
                break;
            }
        }
    }
    Reply {
        status,
        content_type,
        text: String::from_utf8(text).unwrap(),
        cut,
    }
}

const V: &[(&str, &str)] = &[("anthropic-version", "2023-06-01")];

fn server() -> MockServer {
    MockServer::start("127.0.0.1:0", MockDefaults::default()).unwrap()
}

#[tokio::test]
async fn anthropic_messages_json_stream_tools_and_errors() {
    let s = server();
    let body = json!({"model": "c", "max_tokens": 5, "system": "be brief",
                      "messages": [{"role": "user", "content": "hi there"}]});
    let missing = post(&s, "/v1/messages", &[], body.clone()).await;
    assert_eq!(missing.status, 400, "anthropic-version is required");
    let r = post(&s, "/v1/messages", V, body.clone()).await;
    let v = r.json();
    assert_eq!(v["type"], "message");
    assert_eq!(v["content"][0]["text"], "tok ".repeat(8));
    assert_eq!(v["stop_reason"], "end_turn");
    // 2 + 4 for the message, 2 for the system text.
    assert_eq!(v["usage"]["input_tokens"], 8);
    assert_eq!(v["usage"]["output_tokens"], 8);
    let mut sb = body.clone();
    sb["stream"] = json!(true);
    let r = post(&s, "/v1/messages", V, sb.clone()).await;
    assert_eq!(r.content_type, "text/event-stream");
    let names: Vec<String> = r.events().into_iter().map(|e| e.0.unwrap()).collect();
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
    let events = post(&s, "/v1/messages", V, sb.clone()).await.events();
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
    let cut = post(&s, "/v1/messages", V, sb.clone()).await;
    assert!(cut.cut);
    sb["mock"] = json!({"status": 529});
    let e = post(&s, "/v1/messages", V, sb).await;
    assert_eq!(e.status.as_u16(), 529);
    assert_eq!(e.json()["error"]["type"], "overloaded_error");
}

#[tokio::test]
async fn gemini_generate_and_stream_with_usage_metadata() {
    let s = server();
    let body = json!({"contents": [{"role": "user", "parts": [{"text": "hi there"}]}],
                      "mock": {"chunks": 3}});
    let r = post(&s, "/v1beta/models/g:generateContent", &[], body.clone()).await;
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
        &[],
        body.clone(),
    )
    .await;
    assert!(r.text.contains("\r\n\r\n"), "CRLF framing");
    let events = r.events();
    assert_eq!(events.len(), 3);
    assert_eq!(events[2].1["candidates"][0]["finishReason"], "STOP");
    assert!(events[1].1["candidates"][0].get("finishReason").is_none());
    let no_sse = post(
        &s,
        "/v1beta/models/g:streamGenerateContent",
        &[],
        body.clone(),
    )
    .await;
    assert_eq!(no_sse.status, 404);
    let mut tb = body;
    tb["mock"] = json!({"tool_call": true});
    tb["tools"] = json!([{"functionDeclarations": [{"name": "find"}]}]);
    let v = post(&s, "/v1beta/models/g:generateContent", &[], tb)
        .await
        .json();
    assert_eq!(
        v["candidates"][0]["content"]["parts"][0]["functionCall"]["name"],
        "find"
    );
}

#[tokio::test]
async fn responses_api_json_and_events() {
    let s = server();
    let r = post(
        &s,
        "/v1/responses",
        &[],
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
        &[],
        json!({"model": "m", "input": "hi", "stream": true}),
    )
    .await;
    let events = r.events();
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
        &[],
        json!({"model": "m", "input": "hi", "mock": {"tool_call": true}}),
    )
    .await;
    assert_eq!(t.json()["output"][0]["type"], "function_call");
}

#[tokio::test]
async fn azure_deployment_paths_need_an_api_version() {
    let s = server();
    let body = json!({"messages": [{"role": "user", "content": "hi"}]});
    let no_version = post(
        &s,
        "/openai/deployments/dep/chat/completions",
        &[],
        body.clone(),
    )
    .await;
    assert_eq!(no_version.status, 400);
    let r = post(
        &s,
        "/openai/deployments/dep/chat/completions?api-version=2024-10-21",
        &[],
        body,
    )
    .await;
    assert_eq!(r.json()["object"], "chat.completion");
    let e = post(
        &s,
        "/openai/deployments/dep/embeddings?api-version=2024-10-21",
        &[],
        json!({"input": "x"}),
    )
    .await;
    assert_eq!(e.json()["object"], "list");
    let tool = post(
        &s,
        "/v1/chat/completions",
        &[],
        json!({"messages": [{"role": "user", "content": "hi"}], "mock": {"tool_call": true}}),
    )
    .await;
    assert_eq!(tool.json()["choices"][0]["finish_reason"], "tool_calls");
}
