//! The other upstream protocols the fake provider speaks: Anthropic Messages, Gemini
//! `generateContent` / `streamGenerateContent?alt=sse`, the OpenAI Responses API, Azure
//! OpenAI deployment paths, and tool calls for every one of them (docs/mock-upstream.md).
//!
//! These replies are built with `serde_json::Value`: they are not the benchmark baseline
//! (the OpenAI chat path in `handler.rs` is), so clarity wins over bytes here.

use std::collections::VecDeque;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use http::{HeaderMap, Response, StatusCode};
use serde_json::{json, Value};

use crate::body::{MockBody, Piece};
use crate::handler::{
    error_response, json_response, split_words, unix_now, word_count, Controls, Plan, TOKEN,
};
use crate::json::Usage;
use crate::MockDefaults;

/// Arguments of the tool call the mock makes: fixed, or carrying the echoed text.
fn tool_arguments(plan: &Plan, echo: &str) -> Value {
    if plan.echo {
        json!({"text": echo})
    } else {
        json!({"city": "Paris", "unit": "celsius"})
    }
}

/// The JSON text of the arguments in two pieces, so clients must join partial JSON.
fn halves(args: &str) -> (String, String) {
    let mut mid = args.len() / 2;
    while !args.is_char_boundary(mid) {
        mid -= 1;
    }
    (args[..mid].to_owned(), args[mid..].to_owned())
}

/// Words of every text in a request (message contents, parts, system, instructions) plus
/// 4 per message or input item: the documented prompt estimate.
fn text_words(v: &Value) -> u64 {
    match v {
        Value::String(s) => word_count(s),
        Value::Array(a) => a.iter().map(text_words).sum(),
        Value::Object(o) => ["text", "content", "parts"]
            .iter()
            .filter_map(|k| o.get(*k))
            .map(text_words)
            .sum(),
        _ => 0,
    }
}

fn messages_prompt(items: Option<&Value>) -> u64 {
    items
        .and_then(Value::as_array)
        .map_or(0, |a| a.iter().map(|m| 4 + text_words(m)).sum())
}

/// Text of the last user message or item.
fn last_user_text(items: Option<&Value>) -> String {
    let Some(items) = items.and_then(Value::as_array) else {
        return String::new();
    };
    let Some(m) = items
        .iter()
        .rev()
        .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
    else {
        return String::new();
    };
    fn collect(v: &Value, out: &mut String) {
        match v {
            Value::String(s) => out.push_str(s),
            Value::Array(a) => a.iter().for_each(|x| collect(x, out)),
            Value::Object(o) => {
                for k in ["text", "content", "parts"] {
                    if let Some(x) = o.get(k) {
                        collect(x, out);
                    }
                }
            }
            _ => {}
        }
    }
    let mut out = String::new();
    collect(m, &mut out);
    out
}

/// Name of the first tool the request declares, in any protocol's shape.
fn first_tool_name(req: &Value) -> String {
    let tools = req.get("tools").and_then(Value::as_array);
    for t in tools.into_iter().flatten() {
        for p in ["/function/name", "/name", "/functionDeclarations/0/name"] {
            if let Some(n) = t.pointer(p).and_then(Value::as_str) {
                return n.to_owned();
            }
        }
    }
    "get_weather".to_owned()
}

/// The request and its plan, once the plan's latency (time to first byte) has passed.
async fn planned(
    defaults: &MockDefaults,
    body: &[u8],
) -> Result<(Value, Plan), Box<Response<MockBody>>> {
    let (req, plan) = parse(defaults, body)?;
    plan.wait_latency().await;
    Ok((req, plan))
}

/// A vendor chat request's turn: the text to echo (its last user message), the status to
/// answer and the usage to report, from its `[messages, system prompt]` fields; `Err`:
/// the vendor's error reply the plan asks for.
fn turn(
    req: &Value,
    plan: &Plan,
    [messages, system]: [&str; 2],
    error: fn(&Plan, &str) -> Response<MockBody>,
) -> Result<(String, StatusCode, Usage), Box<Response<MockBody>>> {
    let echo = last_user_text(req.get(messages));
    if plan.status >= 400 {
        return Err(Box::new(error(plan, &echo)));
    }
    let prompt = messages_prompt(req.get(messages)) + req.get(system).map_or(0, text_words);
    Ok((echo, with_status(plan.status), usage_of(plan, prompt)))
}

/// Parse the body and its `"mock"` controls (unknown controls refused).
fn parse(defaults: &MockDefaults, body: &[u8]) -> Result<(Value, Plan), Box<Response<MockBody>>> {
    let req: Value = serde_json::from_slice(body).map_err(|_| {
        Box::new(error_response(
            StatusCode::BAD_REQUEST,
            "request body is not valid JSON",
            "invalid_request_error",
            Some("invalid_json"),
        ))
    })?;
    let controls = match req.get("mock") {
        None => None,
        Some(c) => Some(serde_json::from_value::<Controls>(c.clone()).map_err(|_| {
            Box::new(error_response(
                StatusCode::BAD_REQUEST,
                "request body does not match the expected schema",
                "invalid_request_error",
                Some("invalid_request"),
            ))
        })?),
    };
    Ok((req, Plan::new(defaults, controls)))
}

fn texts<'a>(plan: &Plan, echo: &'a str) -> Vec<&'a str> {
    if plan.echo {
        split_words(echo, plan.chunks)
    } else {
        vec![TOKEN; plan.chunks as usize]
    }
}

fn sse_response(
    status: StatusCode,
    pieces: VecDeque<Piece>,
    delay: Duration,
    cut: bool,
) -> Response<MockBody> {
    let mut resp = Response::new(MockBody::framed(pieces, delay, cut));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    resp.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

fn piece(bytes: String, paced: bool) -> Piece {
    Piece {
        bytes: Bytes::from(bytes),
        paced,
    }
}

fn usage_of(plan: &Plan, prompt: u64) -> Usage {
    Usage {
        prompt: plan.prompt_tokens.unwrap_or(prompt),
        completion: u64::from(plan.chunks),
        cached: plan.cached_tokens,
    }
}

fn with_status(status: u16) -> StatusCode {
    StatusCode::from_u16(status).unwrap_or(StatusCode::OK)
}

fn error_message(plan: &Plan, echo: &str) -> String {
    if plan.echo {
        format!("mock upstream error: {echo}")
    } else {
        format!("mock upstream error (status {})", plan.status)
    }
}

// ---------------------------------------------------------------- OpenAI chat tool call

/// A chat completion (or stream) whose answer is one tool call.
pub(crate) fn openai_tool_call(
    id: u64,
    body: &[u8],
    plan: &Plan,
    usage: Usage,
    stream: bool,
    include_usage: bool,
) -> Response<MockBody> {
    let req: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let model = req
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("mock-gpt");
    let echo = last_user_text(req.get("messages"));
    let name = first_tool_name(&req);
    let args = tool_arguments(plan, &echo).to_string();
    let call_id = format!("call_mock{id}");
    let usage_json = json!({"prompt_tokens": usage.prompt, "completion_tokens": usage.completion,
        "total_tokens": usage.prompt + usage.completion,
        "prompt_tokens_details": {"cached_tokens": usage.cached}});
    let status = with_status(plan.status);
    if !stream {
        let mut out = json!({
            "id": format!("chatcmpl-mock{id}"), "object": "chat.completion", "created": unix_now(),
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": null, "refusal": null,
                "tool_calls": [{"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}]},
                "logprobs": null, "finish_reason": "tool_calls"}],
        });
        if plan.usage {
            out["usage"] = usage_json;
        }
        return json_response(status, Bytes::from(out.to_string()));
    }
    let chunk = |delta: Value, finish: Value| {
        let mut c = json!({"id": format!("chatcmpl-mock{id}"), "object": "chat.completion.chunk",
            "created": unix_now(), "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]});
        if include_usage {
            c["usage"] = Value::Null;
        }
        format!("data: {c}\n\n")
    };
    let (a, b) = halves(&args);
    let mut pieces = VecDeque::new();
    pieces.push_back(piece(
        chunk(
            json!({"role": "assistant", "content": null, "tool_calls": [{"index": 0, "id": call_id, "type": "function",
                "function": {"name": name, "arguments": ""}}]}),
            Value::Null,
        ),
        true,
    ));
    for part in [a, b] {
        pieces.push_back(piece(
            chunk(
                json!({"tool_calls": [{"index": 0, "function": {"arguments": part}}]}),
                Value::Null,
            ),
            true,
        ));
    }
    let cut = plan.cut_after.is_some();
    if let Some(n) = plan.cut_after {
        pieces.truncate(n as usize);
    } else {
        pieces.push_back(piece(chunk(json!({}), Value::from("tool_calls")), false));
        if include_usage && plan.usage {
            let c = json!({"id": format!("chatcmpl-mock{id}"), "object": "chat.completion.chunk",
                "created": unix_now(), "model": model, "choices": [], "usage": usage_json});
            pieces.push_back(piece(format!("data: {c}\n\n"), false));
        }
        pieces.push_back(piece("data: [DONE]\n\n".to_owned(), false));
    }
    sse_response(status, pieces, plan.delay, cut)
}

// ---------------------------------------------------------------- Anthropic Messages

/// How the vendors name an error status: (HTTP status, Anthropic error type, Gemini
/// status). Any other status is `api_error` / `INTERNAL`.
const ERROR_NAMES: &[(u16, &str, &str)] = &[
    (400, "invalid_request_error", "INVALID_ARGUMENT"),
    (401, "authentication_error", "UNAUTHENTICATED"),
    (403, "permission_error", "PERMISSION_DENIED"),
    (404, "not_found_error", "NOT_FOUND"),
    (429, "rate_limit_error", "RESOURCE_EXHAUSTED"),
    (503, "api_error", "UNAVAILABLE"),
    (529, "overloaded_error", "INTERNAL"),
];

/// The plan's error status and its (Anthropic, Gemini) names.
fn vendor_error(plan: &Plan) -> (StatusCode, &'static str, &'static str) {
    let status = StatusCode::from_u16(plan.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let (anthropic, gemini) = ERROR_NAMES
        .iter()
        .find(|e| e.0 == plan.status)
        .map_or(("api_error", "INTERNAL"), |e| (e.1, e.2));
    (status, anthropic, gemini)
}

fn anthropic_error(plan: &Plan, echo: &str) -> Response<MockBody> {
    let (status, kind, _) = vendor_error(plan);
    let body =
        json!({"type": "error", "error": {"type": kind, "message": error_message(plan, echo)}});
    json_response(status, Bytes::from(body.to_string()))
}

/// `POST /v1/messages`. Requires `anthropic-version`, as the real API does.
pub(crate) async fn anthropic(
    defaults: &MockDefaults,
    id: u64,
    headers: &HeaderMap,
    body: &[u8],
) -> Response<MockBody> {
    if !headers.contains_key("anthropic-version") {
        let body = json!({"type": "error", "error": {"type": "invalid_request_error",
            "message": "anthropic-version header is required"}});
        return json_response(StatusCode::BAD_REQUEST, Bytes::from(body.to_string()));
    }
    let (req, plan) = match planned(defaults, body).await {
        Ok(x) => x,
        Err(resp) => return *resp,
    };
    let (echo, status, u) = match turn(&req, &plan, ["messages", "system"], anthropic_error) {
        Ok(turn) => turn,
        Err(resp) => return *resp,
    };
    let model = req
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("mock-claude");
    let usage = json!({"input_tokens": u.prompt.saturating_sub(u.cached),
        "cache_creation_input_tokens": 0, "cache_read_input_tokens": u.cached,
        "output_tokens": u.completion});
    let name = first_tool_name(&req);
    let args = tool_arguments(&plan, &echo);
    let tool_id = format!("toolu_mock{id}");
    let stop = if plan.tool_call {
        "tool_use"
    } else {
        "end_turn"
    };
    let msg_id = format!("msg_mock{id}");
    if req.get("stream").and_then(Value::as_bool) != Some(true) {
        let content = if plan.tool_call {
            json!([{"type": "tool_use", "id": tool_id, "name": name, "input": args}])
        } else {
            let text: String = texts(&plan, &echo).concat();
            json!([{"type": "text", "text": text}])
        };
        let mut out = json!({"id": msg_id, "type": "message", "role": "assistant", "model": model,
            "content": content, "stop_reason": stop, "stop_sequence": null});
        if plan.usage {
            out["usage"] = usage;
        }
        return json_response(status, Bytes::from(out.to_string()));
    }
    let ev = |name: &str, data: Value| format!("event: {name}\ndata: {data}\n\n");
    let mut start = json!({"type": "message_start", "message": {"id": msg_id, "type": "message",
        "role": "assistant", "model": model, "content": [], "stop_reason": null, "stop_sequence": null}});
    if plan.usage {
        start["message"]["usage"] = json!({"input_tokens": u.prompt.saturating_sub(u.cached),
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": u.cached, "output_tokens": 1});
    }
    let mut head = VecDeque::new();
    head.push_back(piece(ev("message_start", start), false));
    let mut body_pieces = Vec::new();
    if plan.tool_call {
        head.push_back(piece(
            ev(
                "content_block_start",
                json!({"type": "content_block_start", "index": 0,
                "content_block": {"type": "tool_use", "id": tool_id, "name": name, "input": {}}}),
            ),
            false,
        ));
        let (a, b) = halves(&args.to_string());
        for part in [a, b] {
            body_pieces.push(ev(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 0,
                "delta": {"type": "input_json_delta", "partial_json": part}}),
            ));
        }
    } else {
        head.push_back(piece(
            ev(
                "content_block_start",
                json!({"type": "content_block_start", "index": 0,
                "content_block": {"type": "text", "text": ""}}),
            ),
            false,
        ));
        head.push_back(piece(ev("ping", json!({"type": "ping"})), false));
        for t in texts(&plan, &echo) {
            body_pieces.push(ev(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 0,
                "delta": {"type": "text_delta", "text": t}}),
            ));
        }
    }
    let cut = plan.cut_after.is_some();
    let sent = plan
        .cut_after
        .map_or(body_pieces.len(), |n| (n as usize).min(body_pieces.len()));
    let mut pieces = head;
    for p in body_pieces.into_iter().take(sent) {
        pieces.push_back(piece(p, true));
    }
    if !cut {
        pieces.push_back(piece(
            ev(
                "content_block_stop",
                json!({"type": "content_block_stop", "index": 0}),
            ),
            false,
        ));
        let mut delta =
            json!({"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": null}});
        if plan.usage {
            delta["usage"] = json!({"output_tokens": u.completion});
        }
        pieces.push_back(piece(ev("message_delta", delta), false));
        pieces.push_back(piece(
            ev("message_stop", json!({"type": "message_stop"})),
            false,
        ));
    }
    sse_response(status, pieces, plan.delay, cut)
}

// ---------------------------------------------------------------- Gemini

fn gemini_error(plan: &Plan, echo: &str) -> Response<MockBody> {
    let (status, _, s) = vendor_error(plan);
    let body =
        json!({"error": {"code": plan.status, "message": error_message(plan, echo), "status": s}});
    json_response(status, Bytes::from(body.to_string()))
}

/// `POST /v1beta/models/{model}:generateContent` and `:streamGenerateContent?alt=sse`.
pub(crate) async fn gemini(
    defaults: &MockDefaults,
    id: u64,
    model: &str,
    stream: bool,
    body: &[u8],
) -> Response<MockBody> {
    let (req, plan) = match planned(defaults, body).await {
        Ok(x) => x,
        Err(resp) => return *resp,
    };
    let (echo, status, u) = match turn(&req, &plan, ["contents", "systemInstruction"], gemini_error)
    {
        Ok(turn) => turn,
        Err(resp) => return *resp,
    };
    let usage = |done: u64| {
        let mut m = json!({"promptTokenCount": u.prompt, "candidatesTokenCount": done,
            "totalTokenCount": u.prompt + done});
        if u.cached > 0 {
            m["cachedContentTokenCount"] = Value::from(u.cached);
        }
        m
    };
    let name = first_tool_name(&req);
    let args = tool_arguments(&plan, &echo);
    let response = |parts: Value, finish: Option<&str>, done: u64| {
        let mut cand = json!({"content": {"parts": parts, "role": "model"}, "index": 0});
        if let Some(f) = finish {
            cand["finishReason"] = Value::from(f);
        }
        let mut r =
            json!({"candidates": [cand], "modelVersion": model, "responseId": format!("mock{id}")});
        if plan.usage {
            r["usageMetadata"] = usage(done);
        }
        r
    };
    if !stream {
        let parts = if plan.tool_call {
            json!([{"functionCall": {"name": name, "args": args}}])
        } else {
            json!([{"text": texts(&plan, &echo).concat()}])
        };
        let out = response(parts, Some("STOP"), u.completion);
        return json_response(status, Bytes::from(out.to_string()));
    }
    // Gemini frames its SSE with CRLF line ends and sends no terminal event: the stream
    // ends with the connection, after a chunk that carries the finish reason.
    let chunks: Vec<Value> = if plan.tool_call {
        vec![json!([{"functionCall": {"name": name, "args": args}}])]
    } else {
        texts(&plan, &echo)
            .into_iter()
            .map(|t| json!([{"text": t}]))
            .collect()
    };
    let n = chunks.len();
    let sent = plan.cut_after.map_or(n, |c| (c as usize).min(n));
    let mut pieces = VecDeque::new();
    for (i, parts) in chunks.into_iter().take(sent).enumerate() {
        let last = i + 1 == n && plan.cut_after.is_none();
        let done = if last { u.completion } else { i as u64 + 1 };
        let r = response(parts, last.then_some("STOP"), done);
        pieces.push_back(piece(format!("data: {r}\r\n\r\n"), true));
    }
    if n == 0 && plan.cut_after.is_none() {
        let r = response(json!([{"text": ""}]), Some("STOP"), u.completion);
        pieces.push_back(piece(format!("data: {r}\r\n\r\n"), true));
    }
    sse_response(status, pieces, plan.delay, plan.cut_after.is_some())
}

// ---------------------------------------------------------------- OpenAI Responses API

/// An `output_text` content part as OpenAI sends it: `annotations` and `logprobs` are
/// required members, empty when there are none.
fn output_text(text: &str) -> Value {
    json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []})
}

/// `POST /v1/responses` (and Azure's `/openai/responses`).
pub(crate) async fn responses(defaults: &MockDefaults, id: u64, body: &[u8]) -> Response<MockBody> {
    let (req, plan) = match planned(defaults, body).await {
        Ok(x) => x,
        Err(resp) => return *resp,
    };
    let input = req.get("input");
    let echo = match input {
        Some(Value::String(s)) => s.clone(),
        other => last_user_text(other),
    };
    if plan.status >= 400 {
        return crate::handler::status_error(plan.status, plan.echo.then_some(echo.as_str()));
    }
    let status = with_status(plan.status);
    let model = req
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("mock-gpt");
    let prompt = match input {
        Some(Value::String(s)) => 4 + word_count(s),
        other => messages_prompt(other),
    } + req.get("instructions").map_or(0, text_words);
    let u = usage_of(&plan, prompt);
    let resp_id = format!("resp_mock{id}");
    let item_id = format!("msg_mock{id}");
    let name = first_tool_name(&req);
    let args = tool_arguments(&plan, &echo).to_string();
    let text: String = texts(&plan, &echo).concat();
    let item = |done: bool| {
        if plan.tool_call {
            json!({"type": "function_call", "id": format!("fc_mock{id}"), "call_id": format!("call_mock{id}"),
                "name": name, "arguments": if done { args.as_str() } else { "" },
                "status": if done { "completed" } else { "in_progress" }})
        } else {
            json!({"type": "message", "id": item_id, "role": "assistant",
                "status": if done { "completed" } else { "in_progress" },
                "content": if done { json!([output_text(&text)]) } else { json!([]) }})
        }
    };
    let response = |state: &str, output: Value, with_usage: bool| {
        let mut r = json!({"id": resp_id, "object": "response", "created_at": unix_now(), "status": state,
            "model": model, "output": output, "error": null, "incomplete_details": null,
            "instructions": null, "metadata": {}, "parallel_tool_calls": true, "temperature": 1.0,
            "tool_choice": "auto", "tools": [], "top_p": 1.0});
        if with_usage && plan.usage {
            // The fake provider writes nothing to a prompt cache.
            r["usage"] = json!({"input_tokens": u.prompt,
                "input_tokens_details": {"cached_tokens": u.cached, "cache_write_tokens": 0},
                "output_tokens": u.completion, "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": u.prompt + u.completion});
        }
        r
    };
    if req.get("stream").and_then(Value::as_bool) != Some(true) {
        let out = response("completed", json!([item(true)]), true);
        return json_response(status, Bytes::from(out.to_string()));
    }
    let mut seq = 0u64;
    let mut ev = |name: &str, mut data: Value| {
        data["type"] = Value::from(name);
        data["sequence_number"] = Value::from(seq);
        seq += 1;
        format!("event: {name}\ndata: {data}\n\n")
    };
    let mut pieces = VecDeque::new();
    pieces.push_back(piece(
        ev(
            "response.created",
            json!({"response": response("in_progress", json!([]), false)}),
        ),
        false,
    ));
    pieces.push_back(piece(
        ev(
            "response.in_progress",
            json!({"response": response("in_progress", json!([]), false)}),
        ),
        false,
    ));
    pieces.push_back(piece(
        ev(
            "response.output_item.added",
            json!({"output_index": 0, "item": item(false)}),
        ),
        false,
    ));
    let mut deltas = Vec::new();
    if plan.tool_call {
        let (a, b) = halves(&args);
        for part in [a, b] {
            deltas.push(ev(
                "response.function_call_arguments.delta",
                json!({"item_id": format!("fc_mock{id}"),
                "output_index": 0, "delta": part}),
            ));
        }
    } else {
        pieces.push_back(piece(
            ev(
                "response.content_part.added",
                json!({"item_id": item_id, "output_index": 0,
            "content_index": 0, "part": output_text("")}),
            ),
            false,
        ));
        for t in texts(&plan, &echo) {
            deltas.push(ev(
                "response.output_text.delta",
                json!({"item_id": item_id, "output_index": 0,
                "content_index": 0, "delta": t, "logprobs": []}),
            ));
        }
    }
    let cut = plan.cut_after.is_some();
    let sent = plan
        .cut_after
        .map_or(deltas.len(), |n| (n as usize).min(deltas.len()));
    for d in deltas.into_iter().take(sent) {
        pieces.push_back(piece(d, true));
    }
    if !cut {
        if plan.tool_call {
            pieces.push_back(piece(
                ev(
                    "response.function_call_arguments.done",
                    json!({"item_id": format!("fc_mock{id}"),
                "output_index": 0, "arguments": args, "name": name}),
                ),
                false,
            ));
        } else {
            pieces.push_back(piece(
                ev(
                    "response.output_text.done",
                    json!({"item_id": item_id, "output_index": 0,
                "content_index": 0, "text": text, "logprobs": []}),
                ),
                false,
            ));
            pieces.push_back(piece(
                ev(
                    "response.content_part.done",
                    json!({"item_id": item_id, "output_index": 0,
                "content_index": 0, "part": output_text(&text)}),
                ),
                false,
            ));
        }
        pieces.push_back(piece(
            ev(
                "response.output_item.done",
                json!({"output_index": 0, "item": item(true)}),
            ),
            false,
        ));
        pieces.push_back(piece(
            ev(
                "response.completed",
                json!({"response": response("completed", json!([item(true)]), true)}),
            ),
            false,
        ));
    }
    sse_response(status, pieces, plan.delay, cut)
}
