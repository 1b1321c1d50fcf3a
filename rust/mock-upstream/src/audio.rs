//! Speech to text of the fake provider (`/audio/transcriptions`, `/audio/translations`):
//! a multipart upload read frame by frame (the bytes received so far are counted, so a
//! test can see an upload arrive while its client is still sending), answered with a
//! deterministic transcript and the audio's duration.
//!
//! The audio is never looked at beyond its length. Controls are form fields (the openai
//! SDK's `extra_body` on a multipart call): `mock_status` (answer with that error),
//! `mock_duration` (seconds reported; default: the file's bytes at 128 kbit/s),
//! `mock_text` (the transcript) and `mock_latency_ms` (pause after the upload is read).

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::Response;
use serde_json::json;

use crate::body::MockBody;
use crate::handler::{error_response, json_response, status_error, Shared};

/// Larger uploads are refused (OpenAI's own cap is 25 MB).
const MAX_UPLOAD_BYTES: usize = 64 * 1024 * 1024;
/// Bytes per second of the default duration (128 kbit/s).
const BYTES_PER_SECOND: usize = 16_000;

/// The fields of a form and the size of its file.
#[derive(Default)]
struct Form {
    fields: Vec<(String, String)>,
    file_bytes: Option<usize>,
}

impl Form {
    fn get(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

fn boundary(content_type: &str) -> Option<String> {
    let (kind, params) = content_type.split_once(';')?;
    if !kind.trim().eq_ignore_ascii_case("multipart/form-data") {
        return None;
    }
    params.split(';').find_map(|p| {
        let (k, v) = p.split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case("boundary")
            .then(|| v.trim().trim_matches('"').to_owned())
    })
}

/// The parts of a whole multipart body; `None` when it is not one.
fn parse(body: &[u8], boundary: &str) -> Option<Form> {
    let delim = format!("--{boundary}");
    let finder = memchr::memmem::Finder::new(delim.as_bytes());
    let starts: Vec<usize> = finder.find_iter(body).collect();
    let mut form = Form::default();
    for pair in starts.windows(2) {
        let part = body.get(pair[0] + delim.len()..pair[1])?;
        let part = part.strip_prefix(b"\r\n")?.strip_suffix(b"\r\n")?;
        let split = memchr::memmem::find(part, b"\r\n\r\n")?;
        let head = String::from_utf8_lossy(&part[..split]);
        let value = &part[split + 4..];
        let disposition = head
            .split("\r\n")
            .find(|l| l.to_ascii_lowercase().starts_with("content-disposition"))?;
        let param = |name: &str| {
            disposition.split(';').find_map(|p| {
                let (k, v) = p.split_once('=')?;
                (k.trim() == name).then(|| v.trim().trim_matches('"').to_owned())
            })
        };
        if param("filename").is_some() {
            form.file_bytes = Some(value.len());
        } else if let Some(name) = param("name") {
            form.fields
                .push((name, String::from_utf8_lossy(value).into_owned()));
        }
    }
    (!starts.is_empty()).then_some(form)
}

fn invalid(message: &str) -> Response<MockBody> {
    error_response(
        StatusCode::BAD_REQUEST,
        message,
        "invalid_request_error",
        Some("invalid_body"),
    )
}

/// Answer a transcription (`translate`: a translation) of the upload in `req`.
pub(crate) async fn transcribe(
    shared: &Shared,
    req: Request<Incoming>,
    translate: bool,
) -> Response<MockBody> {
    let Some(boundary) = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(boundary)
    else {
        return invalid("multipart/form-data with a boundary is required");
    };
    let mut body = req.into_body();
    let mut buf = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            return invalid("request body could not be read");
        };
        if let Ok(data) = frame.into_data() {
            shared
                .upload_bytes
                .fetch_add(data.len() as u64, Ordering::Relaxed);
            buf.extend_from_slice(&data);
            if buf.len() > MAX_UPLOAD_BYTES {
                return invalid("upload too large");
            }
        }
    }
    let Some(form) = parse(&buf, &boundary) else {
        return invalid("malformed multipart body");
    };
    drop(buf);
    let (Some(model), Some(file_bytes)) = (form.get("model"), form.file_bytes) else {
        return invalid("model and file are required");
    };
    if let Some(ms) = form.get("mock_latency_ms").and_then(|v| v.parse().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if let Some(status) = form.get("mock_status").and_then(|v| v.parse().ok()) {
        return status_error(status, None);
    }
    #[allow(clippy::cast_precision_loss)]
    let duration: f64 = form
        .get("mock_duration")
        .and_then(|v| v.parse().ok())
        .unwrap_or(file_bytes as f64 / BYTES_PER_SECOND as f64);
    let text = form.get("mock_text").map_or_else(
        || {
            let task = if translate {
                "translated"
            } else {
                "transcribed"
            };
            format!("{task} {file_bytes} bytes with {model}")
        },
        str::to_owned,
    );
    match form.get("response_format").unwrap_or("json") {
        "text" => {
            let mut resp = Response::new(MockBody::full(Bytes::from(text)));
            resp.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            resp
        }
        "verbose_json" => {
            let task = if translate { "translate" } else { "transcribe" };
            let body = json!({"task": task, "language": "english", "duration": duration,
                              "text": text, "segments": []});
            json_response(StatusCode::OK, Bytes::from(body.to_string()))
        }
        _ => {
            let seconds = duration.ceil();
            let body = json!({"text": text, "usage": {"type": "duration", "seconds": seconds}});
            json_response(StatusCode::OK, Bytes::from(body.to_string()))
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_form_parses_into_fields_and_the_file_size() {
        let body = b"--b\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n\
--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\
Content-Type: audio/wav\r\n\r\nRIFF1234\r\n--b--\r\n";
        let form = parse(body, "b").unwrap();
        assert_eq!(form.get("model"), Some("whisper-1"));
        assert_eq!(form.file_bytes, Some(8));
        assert_eq!(
            boundary("multipart/form-data; boundary=\"b\"").as_deref(),
            Some("b")
        );
    }
}
