//! Anthropic Messages: the client API at `/v1/messages` (with Anthropic-shaped errors),
//! and the upstream protocol of Anthropic providers.

use std::collections::{HashMap, VecDeque};

use bytes::Bytes;
use http::StatusCode;
use serde_json::{json, Map, Value};

use super::{
    array_items, joined_text, parse_event, stop_sequences, string_at, tool_call_args, value_tokens,
    Event, Reply, Stop, StreamIds, ToolCall, CHAT_FIELDS,
};
use crate::billing::Usage;
use crate::error::ApiError;
use crate::sse::StreamMeter;
use crate::tokens;

/// Tokens each message adds beyond its content (role and framing), as for chat.
const PER_MESSAGE_TOKENS: u64 = 4;

pub(crate) fn stop_from(s: &str) -> Stop {
    match s {
        "max_tokens" | "model_context_window_exceeded" => Stop::Length,
        "stop_sequence" => Stop::Sequence,
        "tool_use" => Stop::ToolUse,
        "refusal" => Stop::ContentFilter,
        _ => Stop::End,
    }
}

pub(crate) fn stop_name(s: Stop) -> &'static str {
    match s {
        Stop::End => "end_turn",
        Stop::Length => "max_tokens",
        Stop::Sequence => "stop_sequence",
        Stop::ToolUse => "tool_use",
        Stop::ContentFilter => "refusal",
    }
}

/// Anthropic counts cache reads and writes apart from `input_tokens`; the neutral usage
/// counts every prompt token, cached ones included.
fn usage_from(v: &Value) -> Option<Usage> {
    let o = v.as_object()?;
    let n = |k: &str| o.get(k).and_then(Value::as_u64).unwrap_or(0);
    let cached = n("cache_read_input_tokens");
    Some(Usage {
        prompt: n("input_tokens") + cached + n("cache_creation_input_tokens"),
        completion: n("output_tokens"),
        cached,
    })
}

fn usage_json(u: Usage) -> Value {
    json!({
        "input_tokens": u.prompt.saturating_sub(u.cached),
        "output_tokens": u.completion,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": u.cached,
    })
}

/// Prompt tokens of a Messages request: system, every content block, 4 per message.
pub(crate) fn estimate_prompt(doc: &Map<String, Value>) -> u64 {
    let mut n = doc.get("system").map_or(0, value_tokens);
    for m in array_items(doc.get("messages")) {
        n += PER_MESSAGE_TOKENS + m.get("content").map_or(0, value_tokens);
    }
    n
}

/// Fields of the Messages request the translation knows.
const MESSAGES_FIELDS: &[&str] = &[
    "model",
    "messages",
    "system",
    "max_tokens",
    "metadata",
    "stop_sequences",
    "stream",
    "temperature",
    "top_k",
    "top_p",
    "tools",
    "tool_choice",
    "thinking",
    "service_tier",
    "container",
    "mcp_servers",
    "context_management",
];

pub(crate) fn copy_extensions(
    doc: &Map<String, Value>,
    known: &[&str],
    out: &mut Map<String, Value>,
) {
    for (k, v) in doc {
        if !known.contains(&k.as_str()) {
            out.insert(k.clone(), v.clone());
        }
    }
}

/// An OpenAI `image_url` part as an Anthropic image source.
fn image_source(url: &str) -> Value {
    if let Some(rest) = url.strip_prefix("data:") {
        if let Some((meta, data)) = rest.split_once(',') {
            let media = meta.strip_suffix(";base64").unwrap_or(meta);
            return json!({"type": "base64", "media_type": media, "data": data});
        }
    }
    json!({"type": "url", "url": url})
}

fn chat_content_blocks(content: &Value) -> Vec<Value> {
    match content {
        Value::String(s) if !s.is_empty() => vec![json!({"type": "text", "text": s})],
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| match p.get("type").and_then(Value::as_str) {
                Some("text") => Some(json!({"type": "text", "text": p.get("text").cloned().unwrap_or(Value::from(""))})),
                Some("image_url") => p
                    .pointer("/image_url/url")
                    .and_then(Value::as_str)
                    .map(|u| json!({"type": "image", "source": image_source(u)})),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// OpenAI chat request → Anthropic Messages request.
pub(crate) fn from_chat_request(
    doc: &Map<String, Value>,
    upstream_model: &str,
    stream: bool,
    max_out: u64,
) -> Value {
    let mut system = Vec::new();
    // Consecutive messages of one role are merged: tool results of parallel calls must
    // travel in one user turn.
    let mut messages: Vec<(String, Vec<Value>)> = Vec::new();
    let mut push = |role: &str, blocks: Vec<Value>| {
        if blocks.is_empty() {
            return;
        }
        match messages.last_mut() {
            Some((r, b)) if r == role => b.extend(blocks),
            _ => messages.push((role.to_owned(), blocks)),
        }
    };
    for m in array_items(doc.get("messages")) {
        let content = m.get("content").unwrap_or(&Value::Null);
        match m.get("role").and_then(Value::as_str) {
            Some("system") | Some("developer") => system.push(joined_text(content)),
            Some("assistant") => {
                let mut blocks = chat_content_blocks(content);
                for tc in array_items(m.get("tool_calls")) {
                    let args = tool_call_args(tc);
                    blocks.push(json!({
                        "type": "tool_use",
                        "id": tc.get("id").cloned().unwrap_or(Value::from("")),
                        "name": tc.pointer("/function/name").cloned().unwrap_or(Value::from("")),
                        "input": args,
                    }));
                }
                push("assistant", blocks);
            }
            Some("tool") | Some("function") => push(
                "user",
                vec![json!({
                    "type": "tool_result",
                    "tool_use_id": m.get("tool_call_id").cloned().unwrap_or(Value::from("")),
                    "content": joined_text(content),
                })],
            ),
            _ => push("user", chat_content_blocks(content)),
        }
    }
    let mut out = Map::new();
    out.insert("model".into(), Value::from(upstream_model));
    out.insert("max_tokens".into(), Value::from(max_out.max(1)));
    if !system.is_empty() {
        out.insert("system".into(), Value::from(system.join("\n")));
    }
    out.insert(
        "messages".into(),
        Value::Array(
            messages
                .into_iter()
                .map(|(role, content)| json!({"role": role, "content": content}))
                .collect(),
        ),
    );
    for k in ["temperature", "top_p"] {
        if let Some(v) = doc.get(k) {
            out.insert(k.into(), v.clone());
        }
    }
    if let Some(stop) = stop_sequences(doc) {
        out.insert("stop_sequences".into(), stop);
    }
    if let Some(Value::Array(tools)) = doc.get("tools") {
        let tools: Vec<Value> = tools
            .iter()
            .filter_map(|t| t.get("function"))
            .map(|f| tool_definition(f, "parameters", "input_schema"))
            .collect();
        if !tools.is_empty() {
            out.insert("tools".into(), Value::Array(tools));
        }
    }
    let mut choice = match doc.get("tool_choice") {
        Some(Value::String(s)) if s == "required" => Some(json!({"type": "any"})),
        Some(Value::String(s)) if s == "none" => Some(json!({"type": "none"})),
        Some(Value::String(_)) => Some(json!({"type": "auto"})),
        Some(Value::Object(o)) => o
            .get("function")
            .and_then(|f| f.get("name"))
            .map(|n| json!({"type": "tool", "name": n})),
        _ => None,
    };
    if doc.get("parallel_tool_calls") == Some(&Value::Bool(false)) {
        let c = choice.get_or_insert_with(|| json!({"type": "auto"}));
        c["disable_parallel_tool_use"] = Value::Bool(true);
    }
    if let Some(c) = choice {
        out.insert("tool_choice".into(), c);
    }
    if let Some(u) = doc.get("user").and_then(Value::as_str) {
        out.insert("metadata".into(), json!({"user_id": u}));
    }
    if stream {
        out.insert("stream".into(), Value::Bool(true));
    }
    copy_extensions(doc, CHAT_FIELDS, &mut out);
    Value::Object(out)
}

/// Anthropic Messages request → OpenAI chat request (for OpenAI-compatible upstreams).
pub(crate) fn to_chat_request(
    doc: &Map<String, Value>,
    upstream_model: &str,
    stream: bool,
) -> Value {
    let mut messages = Vec::new();
    if let Some(s) = doc.get("system") {
        let text = joined_text(s);
        if !text.is_empty() {
            messages.push(json!({"role": "system", "content": text}));
        }
    }
    for m in array_items(doc.get("messages")) {
        let role = m.get("role").and_then(Value::as_str).unwrap_or("user");
        let content = m.get("content").unwrap_or(&Value::Null);
        let blocks: Vec<Value> = match content {
            Value::String(s) => vec![json!({"type": "text", "text": s})],
            Value::Array(a) => a.clone(),
            _ => Vec::new(),
        };
        let mut parts = Vec::new();
        let mut tool_calls = Vec::new();
        for b in &blocks {
            match b.get("type").and_then(Value::as_str) {
                Some("text") => parts.push(json!({"type": "text", "text": b.get("text").cloned().unwrap_or(Value::from(""))})),
                Some("image") => {
                    let src = b.get("source");
                    let url = match src.and_then(|s| s.get("type")).and_then(Value::as_str) {
                        Some("base64") => format!(
                            "data:{};base64,{}",
                            src.and_then(|s| s.get("media_type")).and_then(Value::as_str).unwrap_or("image/png"),
                            src.and_then(|s| s.get("data")).and_then(Value::as_str).unwrap_or("")
                        ),
                        _ => src
                            .and_then(|s| s.get("url"))
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_owned(),
                    };
                    parts.push(json!({"type": "image_url", "image_url": {"url": url}}));
                }
                Some("tool_use") => tool_calls.push(json!({
                    "id": b.get("id").cloned().unwrap_or(Value::from("")),
                    "type": "function",
                    "function": {
                        "name": b.get("name").cloned().unwrap_or(Value::from("")),
                        "arguments": b.get("input").map_or_else(|| "{}".to_owned(), Value::to_string),
                    },
                })),
                Some("tool_result") => messages.push(json!({
                    "role": "tool",
                    "tool_call_id": b.get("tool_use_id").cloned().unwrap_or(Value::from("")),
                    "content": b.get("content").map(joined_text).unwrap_or_default(),
                })),
                _ => {}
            }
        }
        if role == "assistant" {
            let text = parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join("");
            let mut msg = json!({"role": "assistant", "content": if text.is_empty() && !tool_calls.is_empty() { Value::Null } else { Value::from(text) }});
            if !tool_calls.is_empty() {
                msg["tool_calls"] = Value::Array(tool_calls);
            }
            messages.push(msg);
        } else if !parts.is_empty() {
            let all_text = parts
                .iter()
                .all(|p| p.get("type").and_then(Value::as_str) == Some("text"));
            let content = if all_text {
                Value::from(
                    parts
                        .iter()
                        .filter_map(|p| p.get("text").and_then(Value::as_str))
                        .collect::<Vec<_>>()
                        .join("\n"),
                )
            } else {
                Value::Array(parts)
            };
            messages.push(json!({"role": "user", "content": content}));
        }
    }
    let mut out = Map::new();
    out.insert("model".into(), Value::from(upstream_model));
    out.insert("messages".into(), Value::Array(messages));
    if let Some(v) = doc.get("max_tokens") {
        out.insert("max_tokens".into(), v.clone());
    }
    for k in ["temperature", "top_p"] {
        if let Some(v) = doc.get(k) {
            out.insert(k.into(), v.clone());
        }
    }
    if let Some(s) = doc.get("stop_sequences") {
        out.insert("stop".into(), s.clone());
    }
    if let Some(Value::Array(tools)) = doc.get("tools") {
        let tools: Vec<Value> = tools
            .iter()
            // Server tools (web search, code execution) have no OpenAI counterpart.
            .filter(|t| t.get("input_schema").is_some())
            .map(|t| {
                let f = tool_definition(t, "input_schema", "parameters");
                json!({"type": "function", "function": f})
            })
            .collect();
        if !tools.is_empty() {
            out.insert("tools".into(), Value::Array(tools));
        }
    }
    if let Some(c) = doc.get("tool_choice") {
        let mapped = match c.get("type").and_then(Value::as_str) {
            Some("any") => Some(Value::from("required")),
            Some("none") => Some(Value::from("none")),
            Some("tool") => c
                .get("name")
                .map(|n| json!({"type": "function", "function": {"name": n}})),
            Some("auto") => Some(Value::from("auto")),
            _ => None,
        };
        if let Some(m) = mapped {
            out.insert("tool_choice".into(), m);
        }
        if c.get("disable_parallel_tool_use") == Some(&Value::Bool(true)) {
            out.insert("parallel_tool_calls".into(), Value::Bool(false));
        }
    }
    if let Some(u) = doc.get("metadata").and_then(|m| m.get("user_id")) {
        out.insert("user".into(), u.clone());
    }
    if stream {
        out.insert("stream".into(), Value::Bool(true));
        out.insert("stream_options".into(), json!({"include_usage": true}));
    }
    copy_extensions(doc, MESSAGES_FIELDS, &mut out);
    Value::Object(out)
}

/// A whole Messages answer in neutral form.
pub(crate) fn decode_reply(body: &[u8]) -> Option<Reply> {
    let v: Value = serde_json::from_slice(body).ok()?;
    if v.get("type").and_then(Value::as_str) != Some("message") {
        return None;
    }
    let mut reply = Reply {
        model: string_at(&v, "model"),
        stop: v.get("stop_reason").and_then(Value::as_str).map(stop_from),
        usage: v.get("usage").and_then(usage_from),
        ..Reply::default()
    };
    for b in array_items(v.get("content")) {
        match b.get("type").and_then(Value::as_str) {
            Some("text") => reply
                .text
                .push_str(b.get("text").and_then(Value::as_str).unwrap_or("")),
            Some("tool_use") => reply.tool_calls.push(ToolCall {
                id: b.get("id").and_then(Value::as_str).unwrap_or("").to_owned(),
                name: string_at(b, "name"),
                arguments: b
                    .get("input")
                    .map_or_else(|| "{}".to_owned(), Value::to_string),
            }),
            _ => {}
        }
    }
    Some(reply)
}

fn tool_input(arguments: &str) -> Value {
    serde_json::from_str::<Value>(arguments)
        .ok()
        .filter(Value::is_object)
        .unwrap_or_else(|| json!({}))
}

/// A Messages answer as the anthropic SDK parses it.
pub(crate) fn encode_reply(r: &Reply, request_id: &str) -> Vec<u8> {
    let mut content = Vec::new();
    if !r.text.is_empty() || r.tool_calls.is_empty() {
        content.push(json!({"type": "text", "text": r.text}));
    }
    for t in &r.tool_calls {
        content.push(json!({"type": "tool_use", "id": t.id, "name": t.name, "input": tool_input(&t.arguments)}));
    }
    json!({
        "id": format!("msg_{request_id}"),
        "type": "message",
        "role": "assistant",
        "model": r.model,
        "content": content,
        "stop_reason": stop_name(r.stop.unwrap_or(Stop::End)),
        "stop_sequence": null,
        "usage": usage_json(r.usage.unwrap_or_default()),
    })
    .to_string()
    .into_bytes()
}

/// Anthropic stream events in, neutral events out.
#[derive(Debug, Default)]
pub(crate) struct Decoder {
    /// Prompt usage from `message_start`, completed by `message_delta`.
    start_usage: Option<Usage>,
    /// Content block index → tool call index.
    tools: HashMap<u64, usize>,
}

impl Decoder {
    pub(crate) fn decode(&mut self, event: &[u8], out: &mut Vec<Event>) {
        let (_, Some(data)) = parse_event(event) else {
            return;
        };
        let Ok(v) = serde_json::from_slice::<Value>(&data) else {
            return;
        };
        match v.get("type").and_then(Value::as_str) {
            Some("message_start") => {
                self.start_usage = v.pointer("/message/usage").and_then(usage_from);
            }
            Some("content_block_start") => {
                let index = v.get("index").and_then(Value::as_u64).unwrap_or(0);
                let Some(block) = v.get("content_block") else {
                    return;
                };
                match block.get("type").and_then(Value::as_str) {
                    Some("tool_use") => {
                        let n = self.tools.len();
                        self.tools.insert(index, n);
                        out.push(Event::ToolStart {
                            index: n,
                            id: string_at(block, "id"),
                            name: string_at(block, "name"),
                        });
                    }
                    Some("text") => {
                        if let Some(t) = block.get("text").and_then(Value::as_str) {
                            if !t.is_empty() {
                                out.push(Event::Text(t.to_owned()));
                            }
                        }
                    }
                    _ => {}
                }
            }
            Some("content_block_delta") => {
                let index = v.get("index").and_then(Value::as_u64).unwrap_or(0);
                let Some(delta) = v.get("delta") else { return };
                match delta.get("type").and_then(Value::as_str) {
                    Some("text_delta") => {
                        if let Some(t) = delta.get("text").and_then(Value::as_str) {
                            out.push(Event::Text(t.to_owned()));
                        }
                    }
                    Some("input_json_delta") => {
                        if let (Some(&n), Some(p)) = (
                            self.tools.get(&index),
                            delta.get("partial_json").and_then(Value::as_str),
                        ) {
                            if !p.is_empty() {
                                out.push(Event::ToolArgs {
                                    index: n,
                                    args: p.to_owned(),
                                });
                            }
                        }
                    }
                    _ => {}
                }
            }
            Some("message_delta") => {
                if let Some(s) = v.pointer("/delta/stop_reason").and_then(Value::as_str) {
                    out.push(Event::Finish(stop_from(s)));
                }
                if let Some(mut u) = v.get("usage").and_then(usage_from) {
                    // Delta usage carries output tokens; prompt counts may be absent.
                    if u.prompt == 0 {
                        if let Some(s) = self.start_usage {
                            u.prompt = s.prompt;
                            u.cached = s.cached;
                        }
                    }
                    out.push(Event::Usage(u));
                }
            }
            Some("message_stop") => out.push(Event::Done),
            // `error` events are dropped: an upstream error body never reaches the client.
            _ => {}
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Block {
    Text,
    Tool,
}

/// Neutral events in, Anthropic stream events out (every event named, as the anthropic
/// SDK skips unnamed ones; blocks opened, filled and closed in order; `message_delta`
/// with the stop reason and final usage, then `message_stop`).
pub(crate) struct Encoder {
    ids: StreamIds,
    started: bool,
    open: Option<(usize, Block)>,
    next_block: usize,
    tool_blocks: HashMap<usize, usize>,
    stop: Option<Stop>,
    usage: Option<Usage>,
}

fn sse(name: &str, v: &Value) -> Bytes {
    Bytes::from(format!("event: {name}\ndata: {v}\n\n"))
}

impl Encoder {
    pub(crate) fn new(ids: StreamIds) -> Self {
        Encoder {
            ids,
            started: false,
            open: None,
            next_block: 0,
            tool_blocks: HashMap::new(),
            stop: None,
            usage: None,
        }
    }

    fn start(&mut self, out: &mut VecDeque<Bytes>) {
        if self.started {
            return;
        }
        self.started = true;
        out.push_back(sse(
            "message_start",
            &json!({"type": "message_start", "message": {
                "id": format!("msg_{}", self.ids.id), "type": "message", "role": "assistant",
                "model": self.ids.model, "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": 0, "output_tokens": 0}}}),
        ));
    }

    fn close(&mut self, out: &mut VecDeque<Bytes>) {
        if let Some((index, _)) = self.open.take() {
            out.push_back(sse(
                "content_block_stop",
                &json!({"type": "content_block_stop", "index": index}),
            ));
        }
    }

    fn open(&mut self, kind: Block, block: Value, out: &mut VecDeque<Bytes>) -> usize {
        self.close(out);
        let index = self.next_block;
        self.next_block += 1;
        self.open = Some((index, kind));
        out.push_back(sse(
            "content_block_start",
            &json!({"type": "content_block_start", "index": index, "content_block": block}),
        ));
        index
    }

    pub(crate) fn encode(&mut self, ev: &Event, out: &mut VecDeque<Bytes>) {
        self.start(out);
        match ev {
            Event::Text(t) => {
                let index = match self.open {
                    Some((i, Block::Text)) => i,
                    _ => self.open(Block::Text, json!({"type": "text", "text": ""}), out),
                };
                out.push_back(sse(
                    "content_block_delta",
                    &json!({"type": "content_block_delta", "index": index,
                            "delta": {"type": "text_delta", "text": t}}),
                ));
            }
            Event::ToolStart { index, id, name } => {
                let block = self.open(
                    Block::Tool,
                    json!({"type": "tool_use", "id": id, "name": name, "input": {}}),
                    out,
                );
                self.tool_blocks.insert(*index, block);
            }
            Event::ToolArgs { index, args } => {
                let block = match self.tool_blocks.get(index) {
                    Some(b) => *b,
                    None => {
                        let b = self.open(
                            Block::Tool,
                            json!({"type": "tool_use", "id": "", "name": "", "input": {}}),
                            out,
                        );
                        self.tool_blocks.insert(*index, b);
                        b
                    }
                };
                out.push_back(sse(
                    "content_block_delta",
                    &json!({"type": "content_block_delta", "index": block,
                            "delta": {"type": "input_json_delta", "partial_json": args}}),
                ));
            }
            Event::Finish(s) => self.stop = Some(*s),
            Event::Usage(u) => self.usage = Some(*u),
            Event::Done => {
                self.close(out);
                let u = self.usage.unwrap_or_default();
                out.push_back(sse(
                    "message_delta",
                    &json!({"type": "message_delta",
                            "delta": {"stop_reason": stop_name(self.stop.unwrap_or(Stop::End)), "stop_sequence": null},
                            "usage": usage_json(u)}),
                ));
                out.push_back(sse("message_stop", &json!({"type": "message_stop"})));
            }
        }
    }
}

/// Metering of an Anthropic stream relayed as it is.
#[derive(Debug, Default)]
pub(crate) struct PassMeter {
    start_usage: Option<Usage>,
}

impl PassMeter {
    /// Meter one event; false when it must not be forwarded (an upstream error).
    pub(crate) fn inspect(&mut self, event: &[u8], meter: &mut StreamMeter) -> bool {
        let (name, data) = parse_event(event);
        if name == Some(b"error".as_slice()) {
            return false;
        }
        let Some(data) = data else { return true };
        let Ok(v) = serde_json::from_slice::<Value>(&data) else {
            return true;
        };
        match v.get("type").and_then(Value::as_str) {
            Some("error") => return false,
            Some("message_start") => {
                self.start_usage = v.pointer("/message/usage").and_then(usage_from);
            }
            Some("content_block_delta") => {
                if let Some(d) = v.get("delta") {
                    for k in ["text", "partial_json", "thinking"] {
                        if let Some(t) = d.get(k).and_then(Value::as_str) {
                            meter.output_tokens += tokens::count(t) as u64;
                        }
                    }
                }
            }
            Some("message_delta") => {
                if let Some(mut u) = v.get("usage").and_then(usage_from) {
                    if u.prompt == 0 {
                        if let Some(s) = self.start_usage {
                            u.prompt = s.prompt;
                            u.cached = s.cached;
                        }
                    }
                    meter.usage = Some(u);
                }
            }
            Some("message_stop") => meter.done = true,
            _ => {}
        }
        true
    }
}

/// Anthropic's error `type` for a status.
fn error_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 | 405 | 409 | 422 => "invalid_request_error",
        401 => "authentication_error",
        402 => "billing_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        504 => "timeout_error",
        529 => "overloaded_error",
        _ => "api_error",
    }
}

/// `{"type":"error","error":{"type":...,"message":...}}` with the gateway's own text.
pub(crate) fn error_body(
    status: StatusCode,
    err: ApiError,
    message: Option<&'static str>,
) -> Bytes {
    Bytes::from(
        json!({"type": "error", "error": {"type": error_type(status), "message": message.unwrap_or(err.message())}})
            .to_string(),
    )
}

/// The named `error` event that ends a Messages stream abnormally.
pub(crate) fn error_event(err: ApiError) -> Bytes {
    let body = json!({"type": "error", "error": {"type": "api_error", "message": err.message()}});
    sse("error", &body)
}

/// A tool's name, schema (from `schema_key`, written as `to_key`; an empty object schema
/// when absent) and description: OpenAI's function and Anthropic's tool differ only in the
/// schema's key.
fn tool_definition(tool: &Value, schema_key: &str, to_key: &str) -> Value {
    let mut t = Map::new();
    let name = tool.get("name").cloned().unwrap_or(Value::from(""));
    t.insert("name".into(), name);
    let schema = tool.get(schema_key).cloned();
    t.insert(
        to_key.into(),
        schema.unwrap_or_else(|| json!({"type": "object"})),
    );
    if let Some(d) = tool.get("description") {
        t.insert("description".into(), d.clone());
    }
    Value::Object(t)
}
