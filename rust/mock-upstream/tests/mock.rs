//! The mock upstream as its clients see it: a real server on port 0, real HTTP clients.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod client;

use std::time::{Duration, Instant};

use client::*;
use http::StatusCode;
use onetoken_mock_upstream::{MockDefaults, MockServer};
use serde_json::{json, Value};

/// A chat request (system and user message) with `extra` fields set.
fn chat(extra: Value) -> Value {
    let mut body = json!({
        "model": "mock-gpt",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hello there world"}
        ]
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

/// POST [`chat`] with `extra` to the chat path.
async fn post_chat(server: &MockServer, extra: Value) -> Reply {
    post(server, "/v1/chat/completions", chat(extra)).await
}

#[tokio::test]
async fn json_reply_has_openai_shape_and_documented_usage() {
    let server = start();
    let reply = post_chat(&server, json!({})).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.content_type, "application/json");
    let v = reply.json();
    assert_eq!(v["object"], "chat.completion");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert!(v["created"].as_u64().unwrap() > 1_600_000_000);
    assert_eq!(v["model"], "mock-gpt");
    assert_eq!(v["choices"][0]["index"], 0);
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["message"]["content"], "tok ".repeat(8));
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    // "be brief" (2) + "hello there world" (3) + 4 per message (8).
    assert_eq!(v["usage"]["prompt_tokens"], 13);
    assert_eq!(v["usage"]["completion_tokens"], 8);
    assert_eq!(v["usage"]["total_tokens"], 21);
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
}

#[tokio::test]
async fn controls_override_usage_and_chunks() {
    let server = start();
    let body = chat(json!({"mock": {"chunks": 3, "prompt_tokens": 100, "cached_tokens": 40}}));
    let v = post(&server, "/v1/chat/completions", body).await.json();
    assert_eq!(v["choices"][0]["message"]["content"], "tok tok tok ");
    assert_eq!(v["usage"]["prompt_tokens"], 100);
    assert_eq!(v["usage"]["completion_tokens"], 3);
    assert_eq!(v["usage"]["total_tokens"], 103);
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 40);

    let v = post_chat(&server, json!({"mock": {"usage": false}}))
        .await
        .json();
    assert!(v.get("usage").is_none());
}

#[tokio::test]
async fn content_parts_count_as_words() {
    let server = start();
    let body = json!({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "one two"}, {"type": "image_url", "image_url": {"url": "x"}},
        {"type": "text", "text": "three"}]}], "mock": {"echo": true}});
    let v = post(&server, "/v1/chat/completions", body).await.json();
    assert_eq!(v["usage"]["prompt_tokens"], 3 + 4);
    assert_eq!(v["choices"][0]["message"]["content"], "one twothree");
    assert_eq!(v["model"], "m");
}

#[tokio::test]
async fn stream_with_usage_follows_openai_order() {
    let server = start();
    let body = chat(json!({"stream": true, "stream_options": {"include_usage": true}}));
    let reply = post(&server, "/v1/chat/completions", body).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.content_type, "text/event-stream");
    assert!(!reply.body_error);
    let events = reply.events();
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks = reply.chunk_events();
    assert_eq!(chunks.len(), 8 + 1);
    let ids: Vec<_> = chunks.iter().map(|c| c["id"].clone()).collect();
    assert!(ids.iter().all(|id| *id == ids[0]), "one id per stream");
    for (i, c) in chunks[..8].iter().enumerate() {
        assert_eq!(c["object"], "chat.completion.chunk");
        let choice = &c["choices"][0];
        assert_eq!(choice["delta"]["content"], "tok ");
        assert_eq!(
            choice["delta"].get("role").is_some(),
            i == 0,
            "role only in the first delta"
        );
        let finish = if i == 7 { json!("stop") } else { Value::Null };
        assert_eq!(choice["finish_reason"], finish);
        assert!(c["usage"].is_null());
    }
    let last = &chunks[8];
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"]["prompt_tokens"], 13);
    assert_eq!(last["usage"]["completion_tokens"], 8);
    assert_eq!(last["usage"]["total_tokens"], 21);
}

#[tokio::test]
async fn stream_usage_only_when_asked_and_enabled() {
    let server = start();
    for extra in [
        json!({"stream": true}),
        json!({"stream": true, "stream_options": {"include_usage": false}}),
        json!({"stream": true, "stream_options": {"include_usage": true}, "mock": {"usage": false}}),
    ] {
        let reply = post_chat(&server, extra.clone()).await;
        let chunks = reply.chunk_events();
        assert_eq!(chunks.len(), 8, "{extra}");
        assert!(chunks
            .iter()
            .all(|c| c["choices"].as_array().unwrap().len() == 1));
        assert_eq!(reply.events().last().unwrap(), "[DONE]");
    }
}

#[tokio::test]
async fn stream_chunks_arrive_one_by_one_with_delay() {
    let server = start();
    let body = chat(json!({"stream": true, "mock": {"chunks": 4, "delay_ms": 40}}));
    let reply = post(&server, "/v1/chat/completions", body).await;
    // Each chunk is its own frame, released after its pause: none is held back and batched.
    let content_frames: Vec<_> = reply
        .frames
        .iter()
        .filter(|(_, b)| b.windows(7).any(|w| w == b"content"))
        .collect();
    assert_eq!(content_frames.len(), 4);
    let first = content_frames[0].0 - reply.started;
    assert!(
        first >= Duration::from_millis(40),
        "first chunk after its delay: {first:?}"
    );
    for pair in content_frames.windows(2) {
        let gap = pair[1].0 - pair[0].0;
        assert!(gap >= Duration::from_millis(30), "gap {gap:?}");
    }
}

#[tokio::test]
async fn latency_delays_the_headers() {
    let server = start();
    let t0 = Instant::now();
    let reply = post_chat(&server, json!({"mock": {"latency_ms": 80}})).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(t0.elapsed() >= Duration::from_millis(80));
}

#[tokio::test]
async fn server_defaults_apply_and_requests_override_them() {
    let defaults = MockDefaults {
        chunks: 2,
        delay_ms: 0,
        latency_ms: 0,
    };
    let server = MockServer::start("127.0.0.1:0", defaults).unwrap();
    let v = post_chat(&server, json!({})).await.json();
    assert_eq!(v["choices"][0]["message"]["content"], "tok tok ");
    let v = post_chat(&server, json!({"mock": {"chunks": 1}}))
        .await
        .json();
    assert_eq!(v["choices"][0]["message"]["content"], "tok ");
}

#[tokio::test]
async fn cut_after_drops_the_connection_mid_stream() {
    let server = start();
    for h2 in [false, true] {
        let body = chat(
            json!({"stream": true, "stream_options": {"include_usage": true},
            "mock": {"chunks": 6, "cut_after": 3, "delay_ms": 5}}),
        );
        let reply = send(
            &server,
            "POST",
            "/v1/chat/completions",
            &[],
            Some(serde_json::to_vec(&body).unwrap()),
            h2,
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK);
        assert!(
            reply.body_error,
            "the body must end in an error, not a clean end (h2={h2})"
        );
        let text = String::from_utf8(reply.body()).unwrap();
        assert!(!text.contains("[DONE]"));
        assert_eq!(reply.chunk_events().len(), 3, "h2={h2}");
    }
}

#[tokio::test]
async fn cut_after_truncates_a_json_reply() {
    let server = start();
    let reply = post_chat(&server, json!({"mock": {"cut_after": 0}})).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(reply.body_error);
    assert!(serde_json::from_slice::<Value>(&reply.body()).is_err());
}

#[tokio::test]
async fn echo_returns_the_last_user_message_whole() {
    let server = start();
    let canary = "CANARY-7f3a9e";
    let text = format!("please repeat {canary} back to me");
    let body = json!({"model": "m", "stream": true, "messages": [
        {"role": "user", "content": "an earlier question"},
        {"role": "assistant", "content": "an answer"},
        {"role": "user", "content": text}], "mock": {"echo": true, "chunks": 3}});
    let reply = post(&server, "/v1/chat/completions", body).await;
    let chunks = reply.chunk_events();
    let deltas: Vec<String> = chunks
        .iter()
        .map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(deltas.len(), 3);
    assert_eq!(deltas.concat(), text);
    assert!(
        deltas.iter().any(|d| d.contains(canary)),
        "canary travels in one chunk"
    );

    let body = json!({"messages": [{"role": "user", "content": text}], "mock": {"echo": true}});
    let v = post(&server, "/v1/chat/completions", body).await.json();
    assert_eq!(v["choices"][0]["message"]["content"], text);
}

#[tokio::test]
async fn status_answers_with_an_openai_error_that_can_echo() {
    let server = start();
    let reply = post_chat(&server, json!({"mock": {"status": 429}})).await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    let v = reply.json();
    assert_eq!(v["error"]["type"], "rate_limit_error");
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");
    assert!(v["error"]["param"].is_null());

    let body = json!({"messages": [{"role": "user", "content": "secret CANARY-42"}],
        "stream": true, "mock": {"status": 503, "echo": true}});
    let reply = post(&server, "/v1/chat/completions", body).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    let v = reply.json();
    assert_eq!(v["error"]["type"], "server_error");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("CANARY-42"));
}

#[tokio::test]
async fn bad_requests_get_openai_errors() {
    let server = start();
    let reply = send(
        &server,
        "POST",
        "/v1/chat/completions",
        &[],
        Some(b"{not json".to_vec()),
        false,
    )
    .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.json()["error"]["code"], "invalid_json");

    let reply = post(
        &server,
        "/v1/chat/completions",
        json!({"mock": {"chunkz": 3}}),
    )
    .await;
    assert_eq!(
        reply.status,
        StatusCode::BAD_REQUEST,
        "misspelt control is refused"
    );
    assert_eq!(reply.json()["error"]["code"], "invalid_request");

    let reply = post(&server, "/v1/nowhere", json!({})).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_eq!(reply.json()["error"]["code"], "not_found");

    let reply = send(&server, "GET", "/v1/chat/completions", &[], None, false).await;
    assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn embeddings_one_vector_per_input() {
    let server = start();
    let reply = post(
        &server,
        "/v1/embeddings",
        json!({"model": "mock-embed", "input": ["a b", "c", "a b"]}),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    let v = reply.json();
    assert_eq!(v["object"], "list");
    assert_eq!(v["model"], "mock-embed");
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 3);
    for (i, d) in data.iter().enumerate() {
        assert_eq!(d["object"], "embedding");
        assert_eq!(d["index"], i);
        assert_eq!(d["embedding"].as_array().unwrap().len(), 8);
    }
    assert_eq!(data[0]["embedding"], data[2]["embedding"]);
    assert_ne!(data[0]["embedding"], data[1]["embedding"]);
    // Words: 2 + 1 + 2.
    assert_eq!(v["usage"]["prompt_tokens"], 5);
    assert_eq!(v["usage"]["total_tokens"], 5);

    let v = post(
        &server,
        "/v1/embeddings",
        json!({"input": "x", "encoding_format": "base64"}),
    )
    .await
    .json();
    let b64 = v["data"][0]["embedding"].as_str().unwrap();
    assert_eq!(
        b64.len(),
        44,
        "8 little-endian f32 = 32 bytes = 44 base64 characters"
    );

    let v = post(
        &server,
        "/v1/embeddings",
        json!({"input": [[1, 2, 3], [4]]}),
    )
    .await
    .json();
    assert_eq!(v["data"].as_array().unwrap().len(), 2);
    assert_eq!(v["usage"]["prompt_tokens"], 4);

    let reply = post(
        &server,
        "/v1/embeddings",
        json!({"input": "x", "mock": {"status": 400}}),
    )
    .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn models_and_health() {
    let server = start();
    let v = send(&server, "GET", "/v1/models", &[], None, false)
        .await
        .json();
    let ids: Vec<_> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].clone())
        .collect();
    assert_eq!(ids, vec![json!("mock-gpt"), json!("mock-embed")]);
    let reply = send(&server, "GET", "/healthz", &[], None, false).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["status"], "ok");
}

#[tokio::test]
async fn http2_prior_knowledge_is_served() {
    let server = start();
    let body = serde_json::to_vec(&chat(json!({"stream": true}))).unwrap();
    let reply = send(
        &server,
        "POST",
        "/v1/chat/completions",
        &[],
        Some(body),
        true,
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.chunk_events().len(), 8);
}

#[tokio::test]
async fn request_count_skips_health_probes() {
    let server = start();
    send(&server, "GET", "/healthz", &[], None, false).await;
    assert_eq!(server.request_count(), 0);
    post_chat(&server, json!({})).await;
    send(&server, "GET", "/v1/models", &[], None, false).await;
    post_chat(&server, json!({"mock": {"status": 500}})).await;
    assert_eq!(server.request_count(), 3);
}

#[test]
fn start_binds_synchronously_and_stop_is_idempotent() {
    let server = start();
    let addr = server.addr();
    assert_ne!(addr.port(), 0);
    // A second bind of the same address fails at once, with the address in the message.
    let err = MockServer::start(&addr.to_string(), MockDefaults::default()).unwrap_err();
    assert!(err.contains(&addr.to_string()), "{err}");
    assert!(std::net::TcpStream::connect(addr).is_ok());
    server.stop();
    server.stop();
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "port closed after stop"
    );
}

#[test]
fn bad_listen_address_is_an_error() {
    assert!(MockServer::start("not an address", MockDefaults::default()).is_err());
}

#[test]
fn server_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<MockServer>();
}

#[test]
fn serve_blocking_returns_when_shutdown_completes() {
    let result =
        onetoken_mock_upstream::serve_blocking("127.0.0.1:0", MockDefaults::default(), async {});
    assert!(result.is_ok());
    let err = onetoken_mock_upstream::serve_blocking("bad", MockDefaults::default(), async {});
    assert!(err.is_err());
}
