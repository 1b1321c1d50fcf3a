//! The unit-priced APIs of the fake provider: image generation, moderations, rerank
//! (Cohere/Jina shape) and text to speech. Answers are deterministic functions of the
//! request; the controls under `"mock"` are those of chat (`status`, `latency_ms`, `echo`,
//! `usage`; for speech also `chunks`, `delay_ms`, `cut_after`) plus `images` and
//! `search_units`.

use std::collections::VecDeque;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::StatusCode;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::body::{MockBody, Piece};
use crate::handler::{json_response, parse_error, status_error, unix_now, Controls, Plan};
use crate::json;
use crate::MockDefaults;

/// Bytes of each fake image before base64 (a PNG signature and a digest of the prompt).
const IMAGE_BYTES: usize = 64;

#[derive(Deserialize)]
struct ImagesRequest {
    #[serde(default)]
    model: Option<String>,
    prompt: String,
    #[serde(default)]
    n: Option<u32>,
    #[serde(default)]
    response_format: Option<String>,
    #[serde(default)]
    mock: Option<Controls>,
}

/// FNV-1a, for answers that depend on the request and nothing else.
fn fnv(data: &[u8], seed: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The fake image `index` for `prompt`: a PNG signature followed by digest bytes.
pub(crate) fn image_bytes(prompt: &str, index: u32) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut seed = u64::from(index);
    while out.len() < IMAGE_BYTES {
        seed = fnv(prompt.as_bytes(), seed);
        out.extend_from_slice(&seed.to_le_bytes());
    }
    out.truncate(IMAGE_BYTES);
    out
}

pub(crate) async fn images(defaults: &MockDefaults, body: &[u8]) -> Response {
    let req: ImagesRequest = match serde_json::from_slice(body) {
        Ok(req) => req,
        Err(err) => return parse_error(&err),
    };
    let images = req.mock.as_ref().and_then(|c| c.images);
    let plan = Plan::new(defaults, req.mock);
    plan.wait_latency().await;
    if plan.status >= 400 {
        return status_error(plan.status, plan.echo.then_some(req.prompt.as_str()));
    }
    let count = images.unwrap_or_else(|| req.n.unwrap_or(1));
    let url = req.response_format.as_deref() == Some("url");
    let data: Vec<Value> = (0..count)
        .map(|i| {
            let bytes = image_bytes(&req.prompt, i);
            let mut item = if url {
                json!({"url": format!("https://mock-upstream.invalid/images/{:016x}.png",
                                      fnv(&bytes, 0))})
            } else {
                let mut b64 = Vec::with_capacity(IMAGE_BYTES * 2);
                json::push_base64(&mut b64, &bytes);
                json!({"b64_json": String::from_utf8_lossy(&b64)})
            };
            if plan.echo {
                item["revised_prompt"] = Value::String(req.prompt.clone());
            }
            item
        })
        .collect();
    let mut out = json!({"created": unix_now(), "data": data});
    if plan.usage {
        // gpt-image-1 reports tokens too; the gateway prices images by count.
        out["usage"] = json!({"input_tokens": 5, "output_tokens": 0, "total_tokens": 5});
    }
    let _ = req.model;
    ok(&out)
}

#[derive(Deserialize)]
#[serde(untagged)]
enum ModerationInput {
    One(String),
    Many(Vec<Value>),
}

#[derive(Deserialize)]
struct ModerationRequest {
    #[serde(default)]
    model: Option<String>,
    input: ModerationInput,
    #[serde(default)]
    mock: Option<Controls>,
}

const CATEGORIES: [&str; 4] = ["harassment", "hate", "self-harm", "violence"];

pub(crate) async fn moderations(defaults: &MockDefaults, body: &[u8]) -> Response {
    let req: ModerationRequest = match serde_json::from_slice(body) {
        Ok(req) => req,
        Err(err) => return parse_error(&err),
    };
    let plan = Plan::new(defaults, req.mock);
    plan.wait_latency().await;
    let texts: Vec<String> = match req.input {
        ModerationInput::One(s) => vec![s],
        ModerationInput::Many(items) => items
            .iter()
            .map(|v| match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .collect(),
    };
    if plan.status >= 400 {
        return status_error(plan.status, plan.echo.then(|| texts[0].as_str()));
    }
    // Flagged for violence when the text says "attack": enough for a client to see both
    // answers.
    let results: Vec<Value> = texts
        .iter()
        .map(|t| {
            let violent = t.to_lowercase().contains("attack");
            let categories: serde_json::Map<String, Value> = CATEGORIES
                .iter()
                .map(|c| ((*c).to_owned(), Value::Bool(violent && *c == "violence")))
                .collect();
            let scores: serde_json::Map<String, Value> = CATEGORIES
                .iter()
                .map(|c| {
                    let s = if violent && *c == "violence" { 0.9 } else { 0.01 };
                    ((*c).to_owned(), json!(s))
                })
                .collect();
            json!({"flagged": violent, "categories": categories, "category_scores": scores})
        })
        .collect();
    ok(&json!({
        "id": format!("modr-{:016x}", fnv(texts.concat().as_bytes(), 0)),
        "model": req.model.unwrap_or_else(|| "omni-moderation-latest".to_owned()),
        "results": results,
    }))
}

#[derive(Deserialize)]
struct RerankRequest {
    #[serde(default)]
    model: Option<String>,
    query: String,
    documents: Vec<Value>,
    #[serde(default)]
    top_n: Option<usize>,
    #[serde(default)]
    return_documents: Option<bool>,
    #[serde(default)]
    mock: Option<Controls>,
}

pub(crate) async fn rerank(defaults: &MockDefaults, body: &[u8]) -> Response {
    let req: RerankRequest = match serde_json::from_slice(body) {
        Ok(req) => req,
        Err(err) => return parse_error(&err),
    };
    let units = req.mock.as_ref().and_then(|c| c.search_units);
    let plan = Plan::new(defaults, req.mock);
    plan.wait_latency().await;
    if plan.status >= 400 {
        return status_error(plan.status, plan.echo.then_some(req.query.as_str()));
    }
    let text = |d: &Value| match d {
        Value::String(s) => s.clone(),
        other => other
            .get("text")
            .and_then(Value::as_str)
            .map_or_else(|| other.to_string(), str::to_owned),
    };
    // Score: the share of the query's words the document contains, so the order is
    // predictable; ties keep the documents' order.
    let words: Vec<String> = req
        .query
        .split_whitespace()
        .map(str::to_lowercase)
        .collect();
    let mut scored: Vec<(usize, f64, String)> = req
        .documents
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let t = text(d);
            let lower = t.to_lowercase();
            let hits = words.iter().filter(|w| lower.contains(w.as_str())).count();
            (i, hits as f64 / words.len().max(1) as f64, t)
        })
        .collect();
    scored.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    scored.truncate(req.top_n.unwrap_or(scored.len()));
    let with_docs = req.return_documents == Some(true);
    let results: Vec<Value> = scored
        .into_iter()
        .map(|(index, score, t)| {
            let mut r = json!({"index": index, "relevance_score": score});
            if with_docs {
                r["document"] = json!({"text": t});
            }
            r
        })
        .collect();
    let mut out = json!({
        "id": format!("rerank-{:016x}", fnv(req.query.as_bytes(), 1)),
        "model": req.model.unwrap_or_else(|| "mock-rerank".to_owned()),
        "results": results,
    });
    if plan.usage {
        let n = units.unwrap_or_else(|| (req.documents.len() as u64).div_ceil(100).max(1));
        out["meta"] = json!({"billed_units": {"search_units": n}});
    }
    ok(&out)
}

#[derive(Deserialize)]
struct SpeechRequest {
    input: String,
    #[serde(default)]
    response_format: Option<String>,
    #[serde(default)]
    mock: Option<Controls>,
}

/// Audio bytes per input character.
const AUDIO_BYTES_PER_CHAR: usize = 32;

/// The fake audio of `input`: the format's magic bytes, then digest bytes, in proportion
/// to the text as real speech is.
pub(crate) fn audio_bytes(input: &str, format: &str) -> Vec<u8> {
    let magic: &[u8] = match format {
        "wav" => b"RIFF\0\0\0\0WAVE",
        "flac" => b"fLaC",
        "opus" => b"OggS",
        "aac" => b"\xff\xf1",
        "pcm" => b"",
        _ => b"ID3\x04\0",
    };
    let len = magic.len() + input.chars().count().max(1) * AUDIO_BYTES_PER_CHAR;
    let mut out = magic.to_vec();
    let mut seed = 0;
    while out.len() < len {
        seed = fnv(input.as_bytes(), seed);
        out.extend_from_slice(&seed.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn audio_type(format: &str) -> &'static str {
    match format {
        "wav" => "audio/wav",
        "flac" => "audio/flac",
        "opus" => "audio/ogg",
        "aac" => "audio/aac",
        "pcm" => "audio/pcm",
        _ => "audio/mpeg",
    }
}

/// Speech: the audio in `chunks` pieces, paced by `delay_ms`, cut after `cut_after`.
pub(crate) async fn speech(defaults: &MockDefaults, body: &[u8]) -> Response {
    let req: SpeechRequest = match serde_json::from_slice(body) {
        Ok(req) => req,
        Err(err) => return parse_error(&err),
    };
    let plan = Plan::new(defaults, req.mock);
    plan.wait_latency().await;
    if plan.status >= 400 {
        return status_error(plan.status, plan.echo.then_some(req.input.as_str()));
    }
    let format = req.response_format.as_deref().unwrap_or("mp3");
    let audio = Bytes::from(audio_bytes(&req.input, format));
    let n = plan.chunks.max(1) as usize;
    let size = audio.len().div_ceil(n);
    let mut pieces: VecDeque<Piece> = (0..audio.len())
        .step_by(size)
        .map(|at| Piece {
            bytes: audio.slice(at..(at + size).min(audio.len())),
            paced: true,
        })
        .collect();
    let cut = plan.cut_after.is_some();
    if let Some(keep) = plan.cut_after {
        pieces.truncate(keep as usize);
    }
    let mut resp = http::Response::new(MockBody::framed(pieces, plan.delay, cut));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(audio_type(format)));
    resp
}

type Response = http::Response<MockBody>;

fn ok(v: &Value) -> Response {
    json_response(StatusCode::OK, Bytes::from(v.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audio_grows_with_the_text_and_starts_with_its_format() {
        assert!(audio_bytes("hello", "mp3").starts_with(b"ID3"));
        assert!(audio_bytes("hello", "wav").starts_with(b"RIFF"));
        assert_eq!(audio_bytes("h\u{e9}", "pcm").len(), 2 * AUDIO_BYTES_PER_CHAR);
        assert_eq!(audio_bytes("abc", "mp3"), audio_bytes("abc", "mp3"));
    }

    #[test]
    fn images_are_deterministic_per_prompt_and_index() {
        assert_eq!(image_bytes("a", 0), image_bytes("a", 0));
        assert_ne!(image_bytes("a", 0), image_bytes("a", 1));
        assert_ne!(image_bytes("a", 0), image_bytes("b", 0));
        assert_eq!(image_bytes("a", 0).len(), IMAGE_BYTES);
    }
}
