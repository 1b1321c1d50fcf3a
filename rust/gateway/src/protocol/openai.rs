//! OpenAI chat completions (and embeddings): what the gateway reads in a request (prompt
//! estimate, output cap, choices, usage chunk), the pass-through rewrite and metering, an
//! upstream's error identifiers, and the chat shapes on both sides of a translation
//! (decoding an OpenAI upstream, encoding for an OpenAI client).

use std::collections::VecDeque;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::{array_items, parse_event, string_at, Event, Reply, Stop, StreamIds, ToolCall};
use crate::billing::Usage;
use crate::error::is_safe_ident;
use crate::sse::{Message, UsageDoc};
use crate::tokens;

/// The output cap a chat request asks for, if any.
pub(crate) fn requested_out(doc: &Map<String, Value>) -> Option<u64> {
    doc.get("max_completion_tokens")
        .and_then(Value::as_u64)
        .or_else(|| doc.get("max_tokens").and_then(Value::as_u64))
}

/// Choices a chat request asks for (`n`), each up to the output cap.
pub(crate) fn choices(doc: &Map<String, Value>) -> u64 {
    doc.get("n").and_then(Value::as_u64).unwrap_or(1)
}

/// Whether a streaming client asked for the usage chunk (`stream_options.include_usage`).
pub(crate) fn wants_usage(doc: &Map<String, Value>) -> bool {
    doc.get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        == Some(true)
}

/// Tokens each chat message adds beyond its content (role and framing).
const PER_MESSAGE_TOKENS: u64 = 4;

fn text_tokens(v: &Value) -> u64 {
    match v {
        Value::String(s) => tokens::count(s) as u64,
        // Content parts: only text parts carry tokens we can count here.
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .map(|s| tokens::count(s) as u64)
            .sum(),
        _ => 0,
    }
}

/// Prompt tokens of a chat request, counted in memory; only the number is kept.
pub(crate) fn estimate_chat_prompt(doc: &Map<String, Value>) -> u64 {
    let Some(messages) = doc.get("messages").and_then(Value::as_array) else {
        return 0;
    };
    messages
        .iter()
        .map(|m| {
            let mut n = PER_MESSAGE_TOKENS;
            if let Some(c) = m.get("content") {
                n += text_tokens(c);
            }
            for call in array_items(m.get("tool_calls")) {
                if let Some(args) = call.pointer("/function/arguments") {
                    n += text_tokens(args);
                }
            }
            n
        })
        .sum()
}

/// Input tokens of an embeddings request.
pub(crate) fn estimate_embedding_input(doc: &Map<String, Value>) -> u64 {
    match doc.get("input") {
        Some(Value::String(s)) => tokens::count(s) as u64,
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| match i {
                Value::String(s) => tokens::count(s) as u64,
                // Pre-tokenized input: a list of token ids.
                Value::Array(ids) => ids.len() as u64,
                Value::Number(_) => 1,
                _ => 0,
            })
            .sum(),
        _ => 0,
    }
}

#[derive(Deserialize)]
struct ReplyDoc<'a> {
    #[serde(default)]
    usage: Option<UsageDoc>,
    #[serde(default, borrow)]
    choices: Option<Vec<ReplyChoice<'a>>>,
}

#[derive(Deserialize)]
struct ReplyChoice<'a> {
    #[serde(default, borrow)]
    message: Option<Message<'a>>,
}

/// Usage of a passed-through chat or embeddings answer: the upstream's, else (none) the
/// output tokens counted in its messages.
pub(crate) fn meter_reply(body: &[u8]) -> (Option<Usage>, u64) {
    let Ok(doc) = serde_json::from_slice::<ReplyDoc<'_>>(body) else {
        return (None, 0);
    };
    let usage = doc.usage.as_ref().map(UsageDoc::to_usage);
    if usage.is_some() {
        return (usage, 0);
    }
    let counted = doc
        .choices
        .iter()
        .flatten()
        .filter_map(|c| c.message.as_ref())
        .map(Message::tokens)
        .sum();
    (None, counted)
}

#[derive(Deserialize)]
struct ErrorDoc {
    error: Option<ErrorInner>,
}

#[derive(Deserialize)]
struct ErrorInner {
    #[serde(rename = "type")]
    kind: Option<Value>,
    code: Option<Value>,
}

/// `error.type` and `error.code` of an OpenAI-shaped upstream error, each only when it is
/// a plain identifier: nothing free-form from the upstream reaches the client.
pub(crate) fn error_ids(body: &[u8]) -> (Option<String>, Option<String>) {
    let Ok(ErrorDoc { error: Some(inner) }) = serde_json::from_slice(body) else {
        return (None, None);
    };
    let safe = |v: Option<Value>| match v {
        Some(Value::String(s)) if is_safe_ident(&s) => Some(s),
        _ => None,
    };
    (safe(inner.kind), safe(inner.code))
}

/// Pass-through rewrite: the deployment's model, the output cap the reservation covers
/// (`max_out` per choice), and for streams the usage chunk so billing uses the upstream's
/// own count (removed again when the client did not ask).
pub(crate) fn prepare_chat(
    doc: &mut Map<String, Value>,
    upstream_model: &str,
    stream: bool,
    max_out: u64,
) {
    doc.insert("model".into(), Value::String(upstream_model.to_owned()));
    // The client's own field keeps its name (older servers know only `max_tokens`);
    // without one, OpenAI's current field is added, so an upstream default above the
    // deployment's cap cannot outgrow the reservation.
    let cap = Value::from(max_out.max(1));
    let mut capped = false;
    for field in ["max_completion_tokens", "max_tokens"] {
        if let Some(v) = doc.get_mut(field) {
            *v = cap.clone();
            capped = true;
        }
    }
    if !capped {
        doc.insert("max_completion_tokens".into(), cap);
    }
    if stream {
        match doc.get_mut("stream_options") {
            Some(Value::Object(opts)) => {
                opts.insert("include_usage".into(), Value::Bool(true));
            }
            _ => {
                let mut opts = Map::new();
                opts.insert("include_usage".into(), Value::Bool(true));
                doc.insert("stream_options".into(), Value::Object(opts));
            }
        }
    }
}

pub(crate) fn stop_from(s: &str) -> Stop {
    match s {
        "length" => Stop::Length,
        "tool_calls" | "function_call" => Stop::ToolUse,
        "content_filter" => Stop::ContentFilter,
        _ => Stop::End,
    }
}

pub(crate) fn stop_name(s: Stop) -> &'static str {
    match s {
        Stop::End | Stop::Sequence => "stop",
        Stop::Length => "length",
        Stop::ToolUse => "tool_calls",
        Stop::ContentFilter => "content_filter",
    }
}

/// Usage from an OpenAI `usage` object (prompt tokens include cached ones).
pub(crate) fn usage_from(v: &Value) -> Option<Usage> {
    let o = v.as_object()?;
    Some(Usage {
        prompt: o.get("prompt_tokens").and_then(Value::as_u64).unwrap_or(0),
        completion: o
            .get("completion_tokens")
            .and_then(Value::as_u64)
            .unwrap_or(0),
        cached: v
            .pointer("/prompt_tokens_details/cached_tokens")
            .and_then(Value::as_u64)
            .unwrap_or(0),
    })
}

pub(crate) fn usage_json(u: Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt,
        "completion_tokens": u.completion,
        "total_tokens": u.prompt + u.completion,
        "prompt_tokens_details": {"cached_tokens": u.cached},
    })
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A whole chat completion in neutral form.
pub(crate) fn decode_reply(body: &[u8]) -> Option<Reply> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let choice = v.pointer("/choices/0")?;
    let msg = choice.get("message")?;
    let mut reply = Reply {
        model: string_at(&v, "model"),
        text: string_at(msg, "content"),
        stop: choice
            .get("finish_reason")
            .and_then(Value::as_str)
            .map(stop_from),
        usage: v.get("usage").and_then(usage_from),
        tool_calls: Vec::new(),
    };
    for tc in array_items(msg.get("tool_calls")) {
        let f = tc.get("function");
        reply.tool_calls.push(ToolCall {
            id: string_at(tc, "id"),
            name: f
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned(),
            arguments: f
                .and_then(|f| f.get("arguments"))
                .and_then(Value::as_str)
                .unwrap_or("{}")
                .to_owned(),
        });
    }
    Some(reply)
}

/// A chat completion as the OpenAI SDK parses it.
pub(crate) fn encode_reply(r: &Reply, request_id: &str) -> Vec<u8> {
    let tool_calls: Vec<Value> = r
        .tool_calls
        .iter()
        .map(|t| {
            json!({"id": t.id, "type": "function",
                   "function": {"name": t.name, "arguments": t.arguments}})
        })
        .collect();
    let mut message = json!({
        "role": "assistant",
        "content": if r.text.is_empty() && !tool_calls.is_empty() { Value::Null } else { Value::String(r.text.clone()) },
        "refusal": null,
    });
    if !tool_calls.is_empty() {
        message["tool_calls"] = Value::Array(tool_calls);
    }
    let mut out = json!({
        "id": format!("chatcmpl-{request_id}"),
        "object": "chat.completion",
        "created": unix_now(),
        "model": r.model,
        "choices": [{
            "index": 0,
            "message": message,
            "logprobs": null,
            "finish_reason": stop_name(r.stop.unwrap_or(Stop::End)),
        }],
    });
    if let Some(u) = r.usage {
        out["usage"] = usage_json(u);
    }
    out.to_string().into_bytes()
}

/// OpenAI chat chunks in, neutral events out.
#[derive(Debug, Default)]
pub(crate) struct Decoder {}

impl Decoder {
    pub(crate) fn decode(&mut self, event: &[u8], out: &mut Vec<Event>) {
        let (_, Some(data)) = parse_event(event) else {
            return;
        };
        if data.trim_ascii() == b"[DONE]" {
            out.push(Event::Done);
            return;
        }
        let Ok(v) = serde_json::from_slice::<Value>(&data) else {
            return;
        };
        // An upstream error object is dropped here; the stream then ends without its
        // terminal event and the client gets the gateway's own error.
        if v.get("error").is_some() {
            return;
        }
        for choice in array_items(v.get("choices")) {
            if let Some(delta) = choice.get("delta") {
                if let Some(t) = delta.get("content").and_then(Value::as_str) {
                    if !t.is_empty() {
                        out.push(Event::Text(t.to_owned()));
                    }
                }
                for tc in array_items(delta.get("tool_calls")) {
                    let index = tc.get("index").and_then(Value::as_u64).unwrap_or(0) as usize;
                    let f = tc.get("function");
                    let name = f.and_then(|f| f.get("name")).and_then(Value::as_str);
                    let id = tc.get("id").and_then(Value::as_str);
                    if id.is_some() || name.is_some() {
                        out.push(Event::ToolStart {
                            index,
                            id: id.unwrap_or("").to_owned(),
                            name: name.unwrap_or("").to_owned(),
                        });
                    }
                    if let Some(a) = f.and_then(|f| f.get("arguments")).and_then(Value::as_str) {
                        if !a.is_empty() {
                            out.push(Event::ToolArgs {
                                index,
                                args: a.to_owned(),
                            });
                        }
                    }
                }
            }
            if let Some(r) = choice.get("finish_reason").and_then(Value::as_str) {
                out.push(Event::Finish(stop_from(r)));
            }
        }
        if let Some(u) = v.get("usage").and_then(usage_from) {
            out.push(Event::Usage(u));
        }
    }
}

/// Neutral events in, OpenAI chat chunks out (what `client.chat.completions.create(...,
/// stream=True)` parses: role in the first delta, tool calls by index with `type` and
/// `function` on the first delta, a usage-only chunk when asked, then `[DONE]`).
pub(crate) struct Encoder {
    id: String,
    model: String,
    created: u64,
    include_usage: bool,
    role_sent: bool,
    usage: Option<Usage>,
}

impl Encoder {
    pub(crate) fn new(ids: StreamIds, include_usage: bool) -> Self {
        Encoder {
            id: format!("chatcmpl-{}", ids.id),
            model: ids.model,
            created: unix_now(),
            include_usage,
            role_sent: false,
            usage: None,
        }
    }

    fn chunk(&mut self, mut delta: Value, finish: Option<Stop>, out: &mut VecDeque<Bytes>) {
        if !self.role_sent {
            delta["role"] = Value::String("assistant".into());
            self.role_sent = true;
        }
        let mut v = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{
                "index": 0,
                "delta": delta,
                "logprobs": null,
                "finish_reason": finish.map(stop_name),
            }],
        });
        if self.include_usage {
            v["usage"] = Value::Null;
        }
        out.push_back(sse_data(&v));
    }

    pub(crate) fn encode(&mut self, ev: &Event, out: &mut VecDeque<Bytes>) {
        match ev {
            Event::Text(t) => self.chunk(json!({"content": t}), None, out),
            Event::ToolStart { index, id, name } => self.chunk(
                json!({"tool_calls": [{"index": index, "id": id, "type": "function",
                                        "function": {"name": name, "arguments": ""}}]}),
                None,
                out,
            ),
            Event::ToolArgs { index, args } => self.chunk(
                json!({"tool_calls": [{"index": index, "function": {"arguments": args}}]}),
                None,
                out,
            ),
            Event::Finish(s) => self.chunk(json!({}), Some(*s), out),
            Event::Usage(u) => self.usage = Some(*u),
            Event::Done => {
                if let (true, Some(u)) = (self.include_usage, self.usage) {
                    let v = json!({
                        "id": self.id,
                        "object": "chat.completion.chunk",
                        "created": self.created,
                        "model": self.model,
                        "choices": [],
                        "usage": usage_json(u),
                    });
                    out.push_back(sse_data(&v));
                }
                out.push_back(Bytes::from_static(b"data: [DONE]\n\n"));
            }
        }
    }
}

fn sse_data(v: &Value) -> Bytes {
    let mut s = String::with_capacity(256);
    s.push_str("data: ");
    s.push_str(&v.to_string());
    s.push_str("\n\n");
    Bytes::from(s)
}
