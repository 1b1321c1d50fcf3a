//! The multipart upload of `/v1/audio/transcriptions` and `/v1/audio/translations`.
//!
//! An upload is streamed to the upstream, never spooled and never held whole: only the
//! prefix up to the end of the `model` part is read (bounded by [`MAX_PREFIX_BYTES`]), its
//! value is swapped for the deployment's model, and the rest of the client's body is
//! passed through chunk by chunk while [`Upload`] counts it against the size cap. The
//! audio itself is never parsed, copied aside or echoed: the boundary and the part headers
//! of the prefix are the only bytes read.
//!
//! The `model` part must come before the file (the openai SDK sends the fields first);
//! a model after the file could only be found by holding the audio, so it is refused.
//!
//! Pricing: the upstream reports the audio's duration, known only after it answered, so
//! the reservation assumes the longest audio the upload's bytes can hold: the byte length
//! at the lowest bitrate accepted ([`MIN_BITRATE_BPS`]). A higher bitrate bound would give
//! a shorter duration and under-reserve a low-bitrate file.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use serde::Deserialize;

/// The most of an upload read before the `model` part must be complete: the fields the
/// SDK sends before the file are a few hundred bytes (a `prompt` can be longer).
pub(crate) const MAX_PREFIX_BYTES: usize = 64 * 1024;

/// The lowest bitrate an accepted audio format is taken to have, in bits per second (Opus
/// speech at 16 kbit/s; lower bitrates exist but are not what speech recorders write). An
/// upload of `n` bytes is reserved as `n × 8 / 16 000` seconds of audio: 25 MB (OpenAI's
/// cap) ≈ 3.5 hours.
pub(crate) const MIN_BITRATE_BPS: u64 = 16_000;

/// Why an upload was refused before anything went upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The body ended, or its parts did, without a `model` part.
    ModelMissing,
    /// A file part came before the `model` part.
    ModelAfterFile,
    /// The `model` part did not end within [`MAX_PREFIX_BYTES`].
    PrefixTooLarge,
    /// The part structure is not multipart (no boundary line, headers without an end).
    Malformed,
    /// The client's body failed (disconnected) before the prefix was read.
    Disconnected,
}

/// The boundary of a `multipart/form-data` content type.
pub(crate) fn boundary(content_type: &str) -> Option<&str> {
    let mut params = content_type.split(';');
    let kind = params.next()?.trim();
    if !kind.eq_ignore_ascii_case("multipart/form-data") {
        return None;
    }
    params.find_map(|p| {
        let (name, value) = p.split_once('=')?;
        if !name.trim().eq_ignore_ascii_case("boundary") {
            return None;
        }
        let value = value.trim();
        let value = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(value);
        // RFC 2046: 1 to 70 characters.
        (1..=70).contains(&value.len()).then_some(value)
    })
}

/// The prefix read up to the end of the `model` part's value.
#[derive(Debug)]
pub(crate) struct Prefix {
    /// The bytes read from the client, which may run past the model part.
    bytes: Bytes,
    /// Where the model's value lies in `bytes`.
    model: std::ops::Range<usize>,
}

impl Prefix {
    /// The model the client named.
    pub(crate) fn model(&self) -> &str {
        std::str::from_utf8(&self.bytes[self.model.clone()]).unwrap_or("")
    }

    /// The prefix with the model's value replaced by `upstream_model`.
    pub(crate) fn with_model(&self, upstream_model: &str) -> Bytes {
        let mut out =
            BytesMut::with_capacity(self.bytes.len() - self.model.len() + upstream_model.len());
        out.extend_from_slice(&self.bytes[..self.model.start]);
        out.extend_from_slice(upstream_model.as_bytes());
        out.extend_from_slice(&self.bytes[self.model.end..]);
        out.freeze()
    }

    /// Bytes the client sent in the prefix (counted against the cap).
    pub(crate) fn len(&self) -> usize {
        self.bytes.len()
    }
}

/// Where the scan of a prefix stands.
enum Scan {
    Found(std::ops::Range<usize>),
    NeedMore,
}

/// Finds the `model` part's value in `buf` (the body read so far), or says more is needed.
fn scan(buf: &[u8], boundary: &str, ended: bool) -> Result<Scan, Refused> {
    let need_more = || {
        if ended {
            Err(Refused::ModelMissing)
        } else {
            Ok(Scan::NeedMore)
        }
    };
    let dash = format!("--{boundary}");
    let delim = format!("\r\n--{boundary}");
    // The first boundary line (a preamble before it is allowed and ignored).
    let Some(first) = memchr::memmem::find(buf, dash.as_bytes()) else {
        return need_more();
    };
    let mut at = first + dash.len();
    loop {
        // After a boundary: `--` closes the body, CRLF opens a part.
        if buf.len() < at + 2 {
            return need_more();
        }
        match &buf[at..at + 2] {
            b"--" => return Err(Refused::ModelMissing),
            b"\r\n" => at += 2,
            _ => return Err(Refused::Malformed),
        }
        let Some(head_len) = memchr::memmem::find(&buf[at..], b"\r\n\r\n") else {
            return need_more();
        };
        let (name, is_file) = disposition(&buf[at..at + head_len]);
        let value_start = at + head_len + 4;
        if is_file {
            return Err(Refused::ModelAfterFile);
        }
        let Some(value_len) = memchr::memmem::find(&buf[value_start..], delim.as_bytes()) else {
            return need_more();
        };
        let value_end = value_start + value_len;
        if name.as_deref() == Some("model") {
            return Ok(Scan::Found(value_start..value_end));
        }
        at = value_end + delim.len();
    }
}

/// The `name` of a part and whether it is a file (has a `filename`), from its headers.
fn disposition(head: &[u8]) -> (Option<String>, bool) {
    let head = String::from_utf8_lossy(head);
    for line in head.split("\r\n") {
        let Some((field, value)) = line.split_once(':') else {
            continue;
        };
        if !field.trim().eq_ignore_ascii_case("content-disposition") {
            continue;
        }
        let mut name = None;
        let mut is_file = false;
        for p in value.split(';').skip(1) {
            let Some((k, v)) = p.split_once('=') else {
                continue;
            };
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(v);
            match k.trim().to_ascii_lowercase().as_str() {
                "name" => name = Some(v.to_owned()),
                "filename" | "filename*" => is_file = true,
                _ => {}
            }
        }
        return (name, is_file);
    }
    (None, false)
}

/// Reads `body` until the `model` part is complete; the rest stays in `body`.
pub(crate) async fn read_prefix<B>(body: &mut B, boundary: &str) -> Result<Prefix, Refused>
where
    B: Body<Data = Bytes> + Unpin,
{
    let mut buf = BytesMut::new();
    loop {
        let ended = match body.frame().await {
            None => true,
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    buf.extend_from_slice(&data);
                }
                false
            }
            Some(Err(_)) => return Err(Refused::Disconnected),
        };
        // Scanned only up to the bound: what lies past it is not looked at.
        let seen = buf.len().min(MAX_PREFIX_BYTES);
        match scan(&buf[..seen], boundary, ended)? {
            Scan::Found(model) => {
                return Ok(Prefix {
                    bytes: buf.freeze(),
                    model,
                })
            }
            Scan::NeedMore if buf.len() >= MAX_PREFIX_BYTES => return Err(Refused::PrefixTooLarge),
            Scan::NeedMore => {}
        }
    }
}

/// Set when the client's body went over the cap while it was being sent upstream, so the
/// upstream's failure is answered as the client's 413 `body_too_large`.
#[derive(Debug, Default, Clone)]
pub(crate) struct OverCap(Arc<AtomicBool>);

impl OverCap {
    pub(crate) fn is_set(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// The upstream's request body: the rewritten prefix, then the client's body as it
/// arrives, counted against the cap.
pub(crate) struct Upload<B> {
    head: Option<Bytes>,
    rest: B,
    /// Client bytes seen so far (the prefix included).
    seen: u64,
    cap: u64,
    /// What is left to send when the client declared a length.
    remaining: Option<u64>,
    over: OverCap,
}

/// The error that ends an upload body (the client's body failed, or went over the cap).
#[derive(Debug, thiserror::Error)]
pub(crate) enum UploadError {
    #[error("upload over the size cap")]
    TooLarge,
    #[error("client body failed")]
    Client,
}

impl<B> Upload<B> {
    /// `prefix` rewritten for `upstream_model`, followed by `rest`; `declared` is the
    /// client's Content-Length, if any.
    pub(crate) fn new(
        prefix: &Prefix,
        upstream_model: &str,
        rest: B,
        cap: u64,
        declared: Option<u64>,
    ) -> (Self, OverCap) {
        let head = prefix.with_model(upstream_model);
        let over = OverCap::default();
        // The length upstream: the client's, less the old model's, plus the new one's.
        let remaining = declared.map(|n| {
            n.saturating_sub(prefix.model.len() as u64)
                .saturating_add(upstream_model.len() as u64)
        });
        let upload = Upload {
            head: Some(head),
            rest,
            seen: prefix.len() as u64,
            cap,
            remaining,
            over: over.clone(),
        };
        (upload, over)
    }
}

impl<B> Body for Upload<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = UploadError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, UploadError>>> {
        let this = self.get_mut();
        if let Some(head) = this.head.take() {
            if this.seen > this.cap {
                this.over.0.store(true, Ordering::Relaxed);
                return Poll::Ready(Some(Err(UploadError::TooLarge)));
            }
            this.remaining = this.remaining.map(|r| r.saturating_sub(head.len() as u64));
            return Poll::Ready(Some(Ok(Frame::data(head))));
        }
        match Pin::new(&mut this.rest).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Ready(Some(Err(_))) => Poll::Ready(Some(Err(UploadError::Client))),
            Poll::Ready(Some(Ok(frame))) => {
                let Ok(data) = frame.into_data() else {
                    // Trailers of a multipart upload carry nothing the upstream needs.
                    return Poll::Ready(Some(Ok(Frame::data(Bytes::new()))));
                };
                this.seen = this.seen.saturating_add(data.len() as u64);
                if this.seen > this.cap {
                    this.over.0.store(true, Ordering::Relaxed);
                    return Poll::Ready(Some(Err(UploadError::TooLarge)));
                }
                this.remaining = this.remaining.map(|r| r.saturating_sub(data.len() as u64));
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self.remaining {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

/// The milliseconds of audio reserved for an upload of `bytes` bytes: the longest audio
/// that many bytes can hold at [`MIN_BITRATE_BPS`], rounded up.
pub(crate) fn reserved_audio_ms(bytes: u64) -> u64 {
    bytes.saturating_mul(8_000).div_ceil(MIN_BITRATE_BPS)
}

/// The milliseconds of audio an upstream's answer reports: `duration` (seconds, in
/// `verbose_json`) or `usage.seconds` (`{"usage": {"type": "duration", "seconds": n}}`).
/// `None` for an answer that reports neither (`text`, `srt`, `vtt`): the reservation is
/// charged then.
pub(crate) fn reported_audio_ms(body: &[u8]) -> Option<u64> {
    #[derive(Deserialize)]
    struct Usage {
        seconds: Option<f64>,
    }
    #[derive(Deserialize)]
    struct Answer {
        duration: Option<f64>,
        usage: Option<Usage>,
    }
    let answer: Answer = serde_json::from_slice(body).ok()?;
    let seconds = answer
        .duration
        .or_else(|| answer.usage.and_then(|u| u.seconds))?;
    if !seconds.is_finite() || seconds < 0.0 {
        return None;
    }
    // Whole milliseconds, rounded up; an absurd duration saturates.
    let ms = (seconds * 1000.0).ceil();
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    Some(if ms >= u64::MAX as f64 {
        u64::MAX
    } else {
        ms as u64
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    const B: &str = "xyzBOUNDARY";

    fn form(fields: &[(&str, &str)], file: &[u8], file_first: bool) -> Vec<u8> {
        let mut out = Vec::new();
        let file_part = |out: &mut Vec<u8>| {
            out.extend_from_slice(
                format!(
                    "--{B}\r\nContent-Disposition: form-data; name=\"file\"; \
                     filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\n"
                )
                .as_bytes(),
            );
            out.extend_from_slice(file);
            out.extend_from_slice(b"\r\n");
        };
        if file_first {
            file_part(&mut out);
        }
        for (name, value) in fields {
            out.extend_from_slice(
                format!(
                    "--{B}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
                )
                .as_bytes(),
            );
        }
        if !file_first {
            file_part(&mut out);
        }
        out.extend_from_slice(format!("--{B}--\r\n").as_bytes());
        out
    }

    type Chunks = StreamBody<
        futures_util::stream::Iter<
            std::vec::IntoIter<Result<Frame<Bytes>, std::convert::Infallible>>,
        >,
    >;

    /// `bytes` as a body arriving in chunks of `size`.
    fn chunked(bytes: &[u8], size: usize) -> Chunks {
        let frames: Vec<_> = bytes
            .chunks(size)
            .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
            .collect();
        StreamBody::new(futures_util::stream::iter(frames))
    }

    /// What the upstream receives, or `None` when the upload failed over the cap.
    async fn upstream_bytes(body: &[u8], size: usize, model: &str, cap: u64) -> Option<Vec<u8>> {
        let mut rest = chunked(body, size);
        let prefix = read_prefix(&mut rest, B).await.unwrap();
        let (upload, over) = Upload::new(&prefix, model, rest, cap, Some(body.len() as u64));
        let expected = upload.size_hint().exact();
        match upload.collect().await {
            Ok(c) => {
                let out = c.to_bytes().to_vec();
                assert_eq!(expected, Some(out.len() as u64), "declared length upstream");
                Some(out)
            }
            Err(_) => {
                assert!(over.is_set());
                None
            }
        }
    }

    #[test]
    fn boundary_from_content_type() {
        assert_eq!(boundary("multipart/form-data; boundary=abc"), Some("abc"));
        assert_eq!(
            boundary("Multipart/Form-Data;boundary=\"a b\""),
            Some("a b")
        );
        assert_eq!(boundary("application/json"), None);
        assert_eq!(boundary("multipart/form-data"), None);
        assert_eq!(boundary("multipart/form-data; boundary=\"\""), None);
    }

    #[tokio::test]
    async fn the_model_is_rewritten_at_any_chunking() {
        let audio: Vec<u8> = (0..=255u8).cycle().take(3000).collect();
        let body = form(
            &[("model", "whisper-1"), ("response_format", "verbose_json")],
            &audio,
            false,
        );
        let want = form(
            &[
                ("model", "upstream-whisper-large"),
                ("response_format", "verbose_json"),
            ],
            &audio,
            false,
        );
        for size in [1, 2, 7, 64, 1000, body.len()] {
            let out = upstream_bytes(&body, size, "upstream-whisper-large", 1 << 20)
                .await
                .unwrap();
            assert_eq!(out, want, "chunks of {size}");
        }
    }

    #[tokio::test]
    async fn fields_before_the_model_are_passed_over() {
        let body = form(
            &[("language", "en"), ("prompt", "--xyz"), ("model", "m")],
            b"RIFF",
            false,
        );
        let mut rest = chunked(&body, 5);
        let prefix = read_prefix(&mut rest, B).await.unwrap();
        assert_eq!(prefix.model(), "m");
    }

    #[tokio::test]
    async fn a_missing_or_late_model_is_refused() {
        let none = form(&[("language", "en")], b"RIFF", false);
        assert_eq!(
            read_prefix(&mut chunked(&none, 3), B).await.unwrap_err(),
            Refused::ModelAfterFile
        );
        let late = form(&[("model", "m")], b"RIFF", true);
        assert_eq!(
            read_prefix(&mut chunked(&late, 3), B).await.unwrap_err(),
            Refused::ModelAfterFile
        );
        let no_file = format!(
            "--{B}\r\nContent-Disposition: form-data; name=\"language\"\r\n\r\nen\r\n--{B}--\r\n"
        )
        .into_bytes();
        assert_eq!(
            read_prefix(&mut chunked(&no_file, 4), B).await.unwrap_err(),
            Refused::ModelMissing
        );
        // A body cut before any part ended.
        let cut = &no_file[..20];
        assert_eq!(
            read_prefix(&mut chunked(cut, 4), B).await.unwrap_err(),
            Refused::ModelMissing
        );
    }

    #[tokio::test]
    async fn a_prefix_without_the_model_within_the_bound_is_refused() {
        let long = "p".repeat(MAX_PREFIX_BYTES);
        let body = form(&[("prompt", &long), ("model", "m")], b"RIFF", false);
        assert_eq!(
            read_prefix(&mut chunked(&body, 4096), B).await.unwrap_err(),
            Refused::PrefixTooLarge
        );
    }

    #[tokio::test]
    async fn an_upload_over_the_cap_fails_while_it_streams() {
        let audio = vec![7u8; 10_000];
        let body = form(&[("model", "m")], &audio, false);
        let cap = body.len() as u64 - 1;
        for size in [100, body.len()] {
            assert!(
                upstream_bytes(&body, size, "m", cap).await.is_none(),
                "chunks of {size}"
            );
        }
        assert!(upstream_bytes(&body, 100, "m", body.len() as u64)
            .await
            .is_some());
    }

    #[test]
    fn the_reservation_is_the_longest_audio_the_bytes_hold() {
        // 25 MB at 16 kbit/s: 12 500 s.
        assert_eq!(reserved_audio_ms(25_000_000), 12_500_000);
        assert_eq!(reserved_audio_ms(1), 1);
        assert_eq!(reserved_audio_ms(0), 0);
    }

    #[test]
    fn the_duration_comes_from_the_answer() {
        assert_eq!(
            reported_audio_ms(br#"{"text":"x","duration":12.3451}"#),
            Some(12_346)
        );
        assert_eq!(
            reported_audio_ms(br#"{"text":"x","usage":{"type":"duration","seconds":7}}"#),
            Some(7_000)
        );
        assert_eq!(reported_audio_ms(br#"{"text":"x"}"#), None);
        assert_eq!(reported_audio_ms(b"plain text"), None);
        assert_eq!(reported_audio_ms(br#"{"duration":-1}"#), None);
    }
}
