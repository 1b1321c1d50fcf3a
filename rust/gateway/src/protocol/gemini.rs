//! Google Gemini (`generateContent`, `streamGenerateContent?alt=sse`) as an upstream.

use std::collections::HashMap;

use serde_json::{json, Map, Value};

use super::anthropic::copy_extensions;
use super::{
    array_items, joined_text, parse_event, stop_sequences, string_at, tool_call_args, Event, Reply,
    Stop, ToolCall, CHAT_FIELDS,
};
use crate::billing::Usage;

fn stop_from(s: &str, saw_tools: bool) -> Stop {
    match s {
        "MAX_TOKENS" => Stop::Length,
        "SAFETY" | "RECITATION" | "BLOCKLIST" | "PROHIBITED_CONTENT" | "SPII" | "IMAGE_SAFETY" => {
            Stop::ContentFilter
        }
        _ if saw_tools => Stop::ToolUse,
        _ => Stop::End,
    }
}

fn usage_from(v: &Value) -> Option<Usage> {
    let o = v.as_object()?;
    let n = |k: &str| o.get(k).and_then(Value::as_u64).unwrap_or(0);
    Some(Usage {
        prompt: n("promptTokenCount"),
        // Thinking tokens are billed as output.
        completion: n("candidatesTokenCount") + n("thoughtsTokenCount"),
        cached: n("cachedContentTokenCount"),
    })
}

/// Gemini accepts an OpenAPI subset for function parameters; drop the JSON Schema
/// keywords it refuses.
fn schema(v: &Value) -> Value {
    match v {
        Value::Object(o) => Value::Object(
            o.iter()
                .filter(|(k, _)| {
                    !matches!(k.as_str(), "additionalProperties" | "$schema" | "strict")
                })
                .map(|(k, v)| (k.clone(), schema(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(schema).collect()),
        other => other.clone(),
    }
}

fn parts_of(content: &Value) -> Vec<Value> {
    match content {
        Value::String(s) if !s.is_empty() => vec![json!({"text": s})],
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| match p.get("type").and_then(Value::as_str) {
                Some("text") => p.get("text").map(|t| json!({"text": t})),
                Some("image_url") => {
                    let url = p.pointer("/image_url/url").and_then(Value::as_str)?;
                    if let Some((meta, data)) =
                        url.strip_prefix("data:").and_then(|r| r.split_once(','))
                    {
                        let mime = meta.strip_suffix(";base64").unwrap_or(meta);
                        Some(json!({"inlineData": {"mimeType": mime, "data": data}}))
                    } else {
                        Some(json!({"fileData": {"fileUri": url}}))
                    }
                }
                // OpenAI's `{"data": <base64>, "format": "wav" | "mp3"}`.
                Some("input_audio") => {
                    let audio = p.get("input_audio")?;
                    let data = audio.get("data").and_then(Value::as_str)?;
                    let format = audio.get("format").and_then(Value::as_str).unwrap_or("wav");
                    Some(json!({"inlineData": {"mimeType": format!("audio/{format}"), "data": data}}))
                }
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// OpenAI chat request → Gemini `GenerateContentRequest`. `max_out` bounds the output so
/// the reservation holds.
pub(crate) fn from_chat_request(doc: &Map<String, Value>, max_out: u64) -> Value {
    let mut system = Vec::new();
    let mut contents: Vec<(&'static str, Vec<Value>)> = Vec::new();
    // Gemini answers tool results by function name; OpenAI by call id.
    let mut call_names: HashMap<String, String> = HashMap::new();
    let mut push = |role: &'static str, parts: Vec<Value>| {
        if parts.is_empty() {
            return;
        }
        match contents.last_mut() {
            Some((r, p)) if *r == role => p.extend(parts),
            _ => contents.push((role, parts)),
        }
    };
    for m in array_items(doc.get("messages")) {
        let content = m.get("content").unwrap_or(&Value::Null);
        match m.get("role").and_then(Value::as_str) {
            Some("system") | Some("developer") => {
                system.push(json!({"text": joined_text(content)}))
            }
            Some("assistant") => {
                let mut parts = parts_of(content);
                for tc in array_items(m.get("tool_calls")) {
                    let name = tc
                        .pointer("/function/name")
                        .and_then(Value::as_str)
                        .unwrap_or("");
                    if let Some(id) = tc.get("id").and_then(Value::as_str) {
                        call_names.insert(id.to_owned(), name.to_owned());
                    }
                    let args = tool_call_args(tc);
                    parts.push(json!({"functionCall": {"name": name, "args": args}}));
                }
                push("model", parts);
            }
            Some("tool") | Some("function") => {
                let id = m.get("tool_call_id").and_then(Value::as_str).unwrap_or("");
                let name = call_names
                    .get(id)
                    .cloned()
                    .or_else(|| m.get("name").and_then(Value::as_str).map(str::to_owned))
                    .unwrap_or_default();
                let text = joined_text(content);
                let response = serde_json::from_str::<Value>(&text)
                    .ok()
                    .filter(Value::is_object)
                    .unwrap_or_else(|| json!({"content": text}));
                push(
                    "user",
                    vec![json!({"functionResponse": {"name": name, "response": response}})],
                );
            }
            _ => push("user", parts_of(content)),
        }
    }
    let mut out = Map::new();
    out.insert(
        "contents".into(),
        Value::Array(
            contents
                .into_iter()
                .map(|(role, parts)| json!({"role": role, "parts": parts}))
                .collect(),
        ),
    );
    if !system.is_empty() {
        out.insert("systemInstruction".into(), json!({"parts": system}));
    }
    let mut gen = Map::new();
    gen.insert("maxOutputTokens".into(), Value::from(max_out.max(1)));
    if let Some(v) = doc.get("temperature") {
        gen.insert("temperature".into(), v.clone());
    }
    if let Some(v) = doc.get("top_p") {
        gen.insert("topP".into(), v.clone());
    }
    if let Some(stop) = stop_sequences(doc) {
        gen.insert("stopSequences".into(), stop);
    }
    out.insert("generationConfig".into(), Value::Object(gen));
    if let Some(Value::Array(tools)) = doc.get("tools") {
        let decls: Vec<Value> = tools
            .iter()
            .filter_map(|t| t.get("function"))
            .map(|f| {
                let mut d = json!({"name": f.get("name").cloned().unwrap_or(Value::from(""))});
                if let Some(desc) = f.get("description") {
                    d["description"] = desc.clone();
                }
                if let Some(p) = f.get("parameters") {
                    d["parameters"] = schema(p);
                }
                d
            })
            .collect();
        if !decls.is_empty() {
            out.insert("tools".into(), json!([{"functionDeclarations": decls}]));
        }
    }
    let mode = match doc.get("tool_choice") {
        Some(Value::String(s)) if s == "required" => Some(json!({"mode": "ANY"})),
        Some(Value::String(s)) if s == "none" => Some(json!({"mode": "NONE"})),
        Some(Value::Object(o)) => o
            .get("function")
            .and_then(|f| f.get("name"))
            .map(|n| json!({"mode": "ANY", "allowedFunctionNames": [n]})),
        _ => None,
    };
    if let Some(m) = mode {
        out.insert("toolConfig".into(), json!({"functionCallingConfig": m}));
    }
    copy_extensions(doc, CHAT_FIELDS, &mut out);
    Value::Object(out)
}

/// Events of one `GenerateContentResponse` (a whole reply, or one stream chunk).
#[derive(Debug, Default)]
pub(crate) struct Decoder {
    tools: usize,
    finish: Option<Stop>,
    usage: Option<Usage>,
    ended: bool,
}

impl Decoder {
    fn response(&mut self, v: &Value, out: &mut Vec<Event>) {
        if let Some(c) = v.pointer("/candidates/0") {
            for part in c
                .pointer("/content/parts")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if part.get("thought").and_then(Value::as_bool) == Some(true) {
                    continue;
                }
                if let Some(t) = part.get("text").and_then(Value::as_str) {
                    if !t.is_empty() {
                        out.push(Event::Text(t.to_owned()));
                    }
                } else if let Some(fc) = part.get("functionCall") {
                    let index = self.tools;
                    self.tools += 1;
                    let id = fc
                        .get("id")
                        .and_then(Value::as_str)
                        .map_or_else(|| format!("call_{index}"), str::to_owned);
                    out.push(Event::ToolStart {
                        index,
                        id,
                        name: string_at(fc, "name"),
                    });
                    let args = fc
                        .get("args")
                        .map_or_else(|| "{}".to_owned(), Value::to_string);
                    out.push(Event::ToolArgs { index, args });
                }
            }
            if let Some(r) = c.get("finishReason").and_then(Value::as_str) {
                let stop = stop_from(r, self.tools > 0);
                if self.finish.is_none() {
                    out.push(Event::Finish(stop));
                }
                self.finish = Some(stop);
            }
        }
        if let Some(u) = v.get("usageMetadata").and_then(usage_from) {
            self.usage = Some(u);
        }
    }

    pub(crate) fn decode(&mut self, event: &[u8], out: &mut Vec<Event>) {
        let (_, Some(data)) = parse_event(event) else {
            return;
        };
        let Ok(v) = serde_json::from_slice::<Value>(&data) else {
            return;
        };
        // An upstream error object is dropped (its body never reaches the client).
        if v.get("error").is_some() {
            return;
        }
        self.response(&v, out);
    }

    /// End of the upstream body. Gemini has no terminal event: a stream that carried a
    /// finish reason is complete, and only then is its usage final.
    pub(crate) fn end(&mut self, out: &mut Vec<Event>) {
        if self.ended || self.finish.is_none() {
            return;
        }
        self.ended = true;
        if let Some(u) = self.usage {
            out.push(Event::Usage(u));
        }
        out.push(Event::Done);
    }
}

/// A whole `generateContent` answer in neutral form.
pub(crate) fn decode_reply(body: &[u8]) -> Option<Reply> {
    let v: Value = serde_json::from_slice(body).ok()?;
    v.get("candidates")?;
    let mut d = Decoder::default();
    let mut events = Vec::new();
    d.response(&v, &mut events);
    let mut reply = Reply {
        model: string_at(&v, "modelVersion"),
        stop: d.finish,
        usage: d.usage,
        ..Reply::default()
    };
    for ev in events {
        match ev {
            Event::Text(t) => reply.text.push_str(&t),
            Event::ToolStart { id, name, .. } => reply.tool_calls.push(ToolCall {
                id,
                name,
                arguments: String::new(),
            }),
            Event::ToolArgs { args, .. } => {
                if let Some(t) = reply.tool_calls.last_mut() {
                    t.arguments.push_str(&args);
                }
            }
            Event::Finish(_) | Event::Usage(_) | Event::Done => {}
        }
    }
    Some(reply)
}
