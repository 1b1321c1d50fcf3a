//! The OpenAI Responses API (`POST /v1/responses`), passed through to OpenAI-compatible
//! upstreams and metered from its own usage and delta events.

use serde_json::{Map, Value};

use super::{array_items, parse_event, value_tokens};
use crate::billing::Usage;
use crate::sse::StreamMeter;
use crate::tokens;

/// Tokens each input item adds beyond its content.
const PER_ITEM_TOKENS: u64 = 4;

/// Prompt tokens of a Responses request: `instructions` and every `input` item.
pub(crate) fn estimate_prompt(doc: &Map<String, Value>) -> u64 {
    let mut n = doc.get("instructions").map_or(0, value_tokens);
    match doc.get("input") {
        Some(Value::String(s)) => n += PER_ITEM_TOKENS + tokens::count(s) as u64,
        Some(Value::Array(items)) => {
            for item in items {
                n += PER_ITEM_TOKENS + value_tokens(item);
            }
        }
        _ => {}
    }
    n
}

/// Usage of a Responses `usage` object (input tokens include cached ones).
fn usage_from(v: &Value) -> Option<Usage> {
    let o = v.as_object()?;
    Some(Usage {
        prompt: o.get("input_tokens").and_then(Value::as_u64).unwrap_or(0),
        completion: o.get("output_tokens").and_then(Value::as_u64).unwrap_or(0),
        cached: v
            .pointer("/input_tokens_details/cached_tokens")
            .and_then(Value::as_u64)
            .unwrap_or(0),
    })
}

/// Usage of a whole Responses answer, and the output tokens it carries.
pub(crate) fn meter_reply(body: &[u8]) -> (Option<Usage>, u64) {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return (None, 0);
    };
    let usage = v.get("usage").and_then(usage_from);
    let mut out = 0u64;
    for item in array_items(v.get("output")) {
        if let Some(a) = item.get("arguments").and_then(Value::as_str) {
            out += tokens::count(a) as u64;
        }
        for part in array_items(item.get("content")) {
            if let Some(t) = part.get("text").and_then(Value::as_str) {
                out += tokens::count(t) as u64;
            }
        }
    }
    (usage, out)
}

/// Metering of a Responses event stream relayed as it is.
#[derive(Debug, Default)]
pub(crate) struct PassMeter {}

impl PassMeter {
    /// Meter one event; false when it must not be forwarded (an upstream error or
    /// failure, whose body may quote the request).
    pub(crate) fn inspect(&mut self, event: &[u8], meter: &mut StreamMeter) -> bool {
        let (name, data) = parse_event(event);
        if matches!(name, Some(b"error") | Some(b"response.failed")) {
            return false;
        }
        let Some(data) = data else { return true };
        if data.trim_ascii() == b"[DONE]" {
            return true;
        }
        let Ok(v) = serde_json::from_slice::<Value>(&data) else {
            return true;
        };
        match v.get("type").and_then(Value::as_str) {
            Some("error") | Some("response.failed") => return false,
            Some("response.output_text.delta")
            | Some("response.function_call_arguments.delta")
            | Some("response.refusal.delta") => {
                if let Some(d) = v.get("delta").and_then(Value::as_str) {
                    meter.output_tokens += tokens::count(d) as u64;
                }
            }
            Some("response.completed") | Some("response.incomplete") => {
                meter.usage = v.pointer("/response/usage").and_then(usage_from);
                meter.done = true;
            }
            _ => {
                if v.get("error").is_some() && v.get("type").is_none() {
                    return false;
                }
            }
        }
        true
    }
}
