//! The unit-priced client APIs (images, moderations, rerank, speech): what a request must
//! hold, the units reserved before the upstream answers, and the units its answer reports.
//!
//! Only counts are read from the bodies: a prompt, an image, a document or a score never
//! leaves this module.

use serde::Deserialize;
use serde_json::{Map, Value};

use super::validate::Invalid;
use super::ClientApi;
use crate::billing::Units;

/// OpenAI's upper bound on `n` (images per generation).
pub(crate) const MAX_IMAGES: u64 = 10;
/// Documents per search unit where the upstream reports no billed units (Cohere's rule:
/// a search unit is a query over up to 100 documents).
pub(crate) const DOCUMENTS_PER_SEARCH_UNIT: u64 = 100;
/// OpenAI's upper bound on the text of one speech request, in characters.
pub(crate) const MAX_SPEECH_CHARS: usize = 4096;
/// OpenAI's defaults for an image request that names no size or quality.
const DEFAULT_SIZE: &str = "1024x1024";
const DEFAULT_QUALITY: &str = "standard";

const fn invalid(param: &'static str, message: &'static str) -> Invalid {
    Invalid { param, message }
}

/// What the API requires of `doc` (the model was checked by the caller).
pub(crate) fn check(api: ClientApi, doc: &Map<String, Value>) -> Result<(), Invalid> {
    match api {
        ClientApi::Images => {
            if !doc.get("prompt").is_some_and(Value::is_string) {
                return Err(invalid(
                    "prompt",
                    "The \"prompt\" parameter is required and must be a string.",
                ));
            }
            match doc.get("n") {
                None | Some(Value::Null) => {}
                Some(v) if v.as_u64().is_some_and(|n| (1..=MAX_IMAGES).contains(&n)) => {}
                Some(_) => {
                    return Err(invalid(
                        "n",
                        "The \"n\" parameter must be an integer from 1 to 10.",
                    ))
                }
            }
            for name in ["size", "quality"] {
                if !matches!(doc.get(name), None | Some(Value::Null | Value::String(_))) {
                    return Err(invalid_string(name));
                }
            }
            // A streamed image arrives as partial images in events the relay does not
            // meter; it is refused rather than served unpriced.
            if doc.get("stream").and_then(Value::as_bool) == Some(true) {
                return Err(invalid(
                    "stream",
                    "Streamed image generation is not supported.",
                ));
            }
        }
        ClientApi::Moderations => match doc.get("input") {
            Some(Value::String(_)) => {}
            Some(Value::Array(items)) if !items.is_empty() => {}
            None | Some(Value::Null) => {
                return Err(invalid("input", "The \"input\" parameter is required."))
            }
            Some(_) => {
                return Err(invalid(
                    "input",
                    "The \"input\" parameter must be a string or a non-empty array.",
                ))
            }
        },
        ClientApi::Rerank => {
            if !doc.get("query").is_some_and(Value::is_string) {
                return Err(invalid(
                    "query",
                    "The \"query\" parameter is required and must be a string.",
                ));
            }
            if doc
                .get("documents")
                .and_then(Value::as_array)
                .is_none_or(Vec::is_empty)
            {
                return Err(invalid(
                    "documents",
                    "The \"documents\" parameter must be a non-empty array.",
                ));
            }
        }
        ClientApi::Speech => {
            let Some(input) = doc.get("input").and_then(Value::as_str) else {
                return Err(invalid(
                    "input",
                    "The \"input\" parameter is required and must be a string.",
                ));
            };
            if input.chars().count() > MAX_SPEECH_CHARS {
                return Err(invalid(
                    "input",
                    "The \"input\" parameter must be at most 4096 characters.",
                ));
            }
            if !doc
                .get("voice")
                .is_some_and(|v| v.is_string() || v.is_object())
            {
                return Err(invalid("voice", "The \"voice\" parameter is required."));
            }
            // Speech as SSE events carries the audio in JSON deltas; the relay streams the
            // audio bytes themselves.
            if doc.get("stream_format").and_then(Value::as_str) == Some("sse") {
                return Err(invalid(
                    "stream_format",
                    "The \"sse\" stream format is not supported; audio is streamed as bytes.",
                ));
            }
        }
        ClientApi::Chat
        | ClientApi::Embeddings
        | ClientApi::Messages
        | ClientApi::Responses
        | ClientApi::Transcription
        | ClientApi::Translation => {}
    }
    Ok(())
}

fn invalid_string(name: &'static str) -> Invalid {
    match name {
        "size" => invalid("size", "The \"size\" parameter must be a string."),
        _ => invalid("quality", "The \"quality\" parameter must be a string."),
    }
}

/// The size and quality an image request asks for (OpenAI's defaults when it names none).
pub(crate) fn image_variant(doc: &Map<String, Value>) -> (&str, &str) {
    let field = |name: &str, default: &'static str| {
        doc.get(name)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .unwrap_or(default)
    };
    (
        field("size", DEFAULT_SIZE),
        field("quality", DEFAULT_QUALITY),
    )
}

/// The units a request may cost, known before it is forwarded: the requested image
/// count, one search unit per started hundred documents, or the characters to speak.
pub(crate) fn requested(api: ClientApi, doc: &Map<String, Value>) -> Units {
    match api {
        ClientApi::Images => Units {
            images: doc.get("n").and_then(Value::as_u64).unwrap_or(1),
            ..Units::default()
        },
        ClientApi::Rerank => Units {
            search_units: search_units_for(
                doc.get("documents")
                    .and_then(Value::as_array)
                    .map_or(0, Vec::len) as u64,
            ),
            ..Units::default()
        },
        ClientApi::Speech => Units {
            characters: doc
                .get("input")
                .and_then(Value::as_str)
                .map_or(0, |s| s.chars().count() as u64),
            ..Units::default()
        },
        _ => Units::default(),
    }
}

/// One search unit per started hundred documents, at least one.
pub(crate) fn search_units_for(documents: u64) -> u64 {
    documents.div_ceil(DOCUMENTS_PER_SEARCH_UNIT).max(1)
}

#[derive(Deserialize)]
struct ImagesReply {
    data: Vec<serde::de::IgnoredAny>,
}

#[derive(Deserialize)]
struct RerankReply {
    #[serde(default)]
    meta: Option<RerankMeta>,
}

#[derive(Deserialize)]
struct RerankMeta {
    #[serde(default)]
    billed_units: Option<BilledUnits>,
}

#[derive(Deserialize)]
struct BilledUnits {
    #[serde(default)]
    search_units: Option<u64>,
}

/// The units an upstream's successful answer reports: the images in `data`, the rerank
/// `meta.billed_units.search_units`. `None` when the answer does not say (the caller then
/// charges what was requested).
pub(crate) fn meter(api: ClientApi, body: &[u8]) -> Option<Units> {
    match api {
        ClientApi::Images => {
            let reply: ImagesReply = serde_json::from_slice(body).ok()?;
            Some(Units {
                images: reply.data.len() as u64,
                ..Units::default()
            })
        }
        ClientApi::Rerank => {
            let reply: RerankReply = serde_json::from_slice(body).ok()?;
            let units = reply.meta?.billed_units?.search_units?;
            Some(Units {
                search_units: units,
                ..Units::default()
            })
        }
        // A moderation costs its request price: no units to count.
        ClientApi::Moderations => Some(Units::default()),
        // Speech is priced by its input, counted before it is sent (`requested`).
        // An upload's duration is read by `upload::reported_audio_ms`.
        ClientApi::Speech
        | ClientApi::Transcription
        | ClientApi::Translation
        | ClientApi::Chat
        | ClientApi::Embeddings
        | ClientApi::Messages
        | ClientApi::Responses => None,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use serde_json::json;

    use super::*;

    fn doc(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => unreachable!(),
        }
    }

    #[test]
    fn image_requests_reserve_their_count_and_settle_on_what_came_back() {
        let d = doc(json!({"model": "m", "prompt": "p", "n": 3, "size": "512x512"}));
        assert_eq!(check(ClientApi::Images, &d), Ok(()));
        assert_eq!(requested(ClientApi::Images, &d).images, 3);
        assert_eq!(image_variant(&d), ("512x512", "standard"));
        let body = br#"{"created":1,"data":[{"b64_json":"AAAA"},{"url":"https://x/y"}]}"#;
        assert_eq!(meter(ClientApi::Images, body).unwrap().images, 2);
        assert_eq!(meter(ClientApi::Images, b"{\"created\":1}"), None);
        assert_eq!(
            requested(ClientApi::Images, &doc(json!({"prompt": "p"}))).images,
            1
        );
    }

    #[test]
    fn malformed_image_requests_name_the_parameter() {
        for (bad, param) in [
            (json!({"n": 2}), "prompt"),
            (json!({"prompt": 1}), "prompt"),
            (json!({"prompt": "p", "n": 0}), "n"),
            (json!({"prompt": "p", "n": 11}), "n"),
            (json!({"prompt": "p", "n": 1.5}), "n"),
            (json!({"prompt": "p", "size": 1024}), "size"),
            (json!({"prompt": "p", "quality": []}), "quality"),
            (json!({"prompt": "p", "stream": true}), "stream"),
        ] {
            assert_eq!(
                check(ClientApi::Images, &doc(bad)).map_err(|e| e.param),
                Err(param)
            );
        }
    }

    #[test]
    fn rerank_counts_billed_units_else_hundreds_of_documents() {
        let docs: Vec<Value> = (0..250).map(|i| json!(format!("d{i}"))).collect();
        let d = doc(json!({"model": "m", "query": "q", "documents": docs}));
        assert_eq!(check(ClientApi::Rerank, &d), Ok(()));
        assert_eq!(requested(ClientApi::Rerank, &d).search_units, 3);
        assert_eq!(search_units_for(1), 1);
        assert_eq!(search_units_for(100), 1);
        assert_eq!(search_units_for(101), 2);
        let body = br#"{"results":[],"meta":{"billed_units":{"search_units":4}}}"#;
        assert_eq!(meter(ClientApi::Rerank, body).unwrap().search_units, 4);
        assert_eq!(meter(ClientApi::Rerank, br#"{"results":[]}"#), None);
        for bad in [
            json!({"documents": ["a"]}),
            json!({"query": "q", "documents": []}),
            json!({"query": "q"}),
        ] {
            assert!(check(ClientApi::Rerank, &doc(bad)).is_err());
        }
    }

    #[test]
    fn speech_is_counted_in_characters_not_bytes() {
        let d = doc(json!({"model": "m", "input": "h\u{e9}llo \u{1f980}", "voice": "alloy"}));
        assert_eq!(check(ClientApi::Speech, &d), Ok(()));
        assert_eq!(requested(ClientApi::Speech, &d).characters, 7);
        for (bad, param) in [
            (json!({"voice": "alloy"}), "input"),
            (json!({"input": "x"}), "voice"),
            (
                json!({"input": "x".repeat(4097), "voice": "alloy"}),
                "input",
            ),
            (
                json!({"input": "x", "voice": "alloy", "stream_format": "sse"}),
                "stream_format",
            ),
        ] {
            assert_eq!(
                check(ClientApi::Speech, &doc(bad)).map_err(|e| e.param),
                Err(param)
            );
        }
        let long = doc(json!({"input": "\u{e9}".repeat(4096), "voice": {"id": "v"}}));
        assert_eq!(check(ClientApi::Speech, &long), Ok(()));
    }

    #[test]
    fn moderations_need_input() {
        assert!(check(ClientApi::Moderations, &doc(json!({"input": "x"}))).is_ok());
        assert!(check(ClientApi::Moderations, &doc(json!({"input": ["x"]}))).is_ok());
        assert!(check(ClientApi::Moderations, &doc(json!({"input": []}))).is_err());
        assert!(check(ClientApi::Moderations, &doc(json!({}))).is_err());
        assert_eq!(meter(ClientApi::Moderations, b"{}"), Some(Units::default()));
    }
}
