//! Server-sent events: framing upstream bytes into complete events, and metering them.
//!
//! The framer holds at most one incomplete trailing event; every complete event is handed
//! on as soon as its terminating blank line arrives. Metering parses each event in memory
//! and keeps only numbers.

use std::borrow::Cow;
use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};
use serde::Deserialize;

use crate::billing::Usage;
use crate::tokens;

/// Splits a byte stream into SSE events (each ending with a blank line).
#[derive(Debug, Default)]
pub struct SseFramer {
    buf: BytesMut,
    /// Bytes of `buf` already known to hold no event boundary.
    scanned: usize,
}

impl SseFramer {
    /// Add upstream bytes; call `on_event` with each event completed by them.
    pub fn push(&mut self, chunk: &[u8], mut on_event: impl FnMut(Bytes)) {
        self.buf.extend_from_slice(chunk);
        while let Some(end) = find_event_end(&self.buf, self.scanned) {
            let event = self.buf.split_to(end).freeze();
            self.scanned = 0;
            on_event(event);
        }
        // A boundary may straddle the next chunk: rescan the last two bytes.
        self.scanned = self.buf.len().saturating_sub(2);
    }

    /// End of stream: an unterminated trailing event, if any.
    pub fn finish(&mut self) -> Option<Bytes> {
        self.scanned = 0;
        if self.buf.iter().all(|b| b.is_ascii_whitespace()) {
            self.buf.clear();
            return None;
        }
        Some(self.buf.split().freeze())
    }

    /// Bytes held back waiting for the end of an event.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Drop the incomplete event held back, releasing its memory.
    pub fn discard(&mut self) {
        self.buf = BytesMut::new();
        self.scanned = 0;
    }
}

/// Index just past the first blank line (`\n\n` or `\n\r\n`) at or after `from`.
fn find_event_end(buf: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while let Some(off) = memchr::memchr(b'\n', buf.get(i..)?) {
        let p = i + off;
        match buf.get(p + 1) {
            Some(b'\n') => return Some(p + 2),
            Some(b'\r') if buf.get(p + 2) == Some(&b'\n') => return Some(p + 3),
            _ => {}
        }
        i = p + 1;
    }
    None
}

/// What one event carried, as numbers.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct EventInfo {
    /// `data: [DONE]`.
    pub done: bool,
    /// Usage reported in the event.
    pub usage: Option<Usage>,
    /// A usage-only chunk (`"choices": []` plus `usage`).
    pub usage_only: bool,
    /// Tokens of the content and tool-argument deltas.
    pub output_tokens: u64,
    /// An error object from the upstream: never forwarded (its text may quote the
    /// request); the stream then ends without `[DONE]` and the gateway's own error event.
    pub error: bool,
}

#[derive(Deserialize)]
pub(crate) struct UsageDoc {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
    #[serde(default)]
    prompt_tokens_details: Option<PromptDetails>,
}

#[derive(Deserialize)]
struct PromptDetails {
    #[serde(default)]
    cached_tokens: Option<u64>,
}

impl UsageDoc {
    pub(crate) fn to_usage(&self) -> Usage {
        Usage {
            prompt: self.prompt_tokens,
            completion: self.completion_tokens,
            cached: self
                .prompt_tokens_details
                .as_ref()
                .and_then(|d| d.cached_tokens)
                .unwrap_or(0),
        }
    }
}

#[derive(Deserialize)]
struct StreamChunk<'a> {
    #[serde(default, borrow)]
    choices: Option<Vec<StreamChoice<'a>>>,
    #[serde(default)]
    usage: Option<UsageDoc>,
    #[serde(default)]
    error: Option<serde::de::IgnoredAny>,
}

#[derive(Deserialize)]
struct StreamChoice<'a> {
    #[serde(default, borrow)]
    delta: Option<Message<'a>>,
}

/// A chat message or delta: the parts that count as output tokens.
#[derive(Deserialize)]
pub(crate) struct Message<'a> {
    #[serde(default, borrow)]
    content: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    tool_calls: Option<Vec<ToolCall<'a>>>,
}

#[derive(Deserialize)]
struct ToolCall<'a> {
    #[serde(default, borrow)]
    function: Option<Function<'a>>,
}

#[derive(Deserialize)]
struct Function<'a> {
    #[serde(default, borrow)]
    arguments: Option<Cow<'a, str>>,
}

impl Message<'_> {
    pub(crate) fn tokens(&self) -> u64 {
        let mut n = self.content.as_deref().map_or(0, tokens::count);
        for call in self.tool_calls.iter().flatten() {
            if let Some(args) = call.function.as_ref().and_then(|f| f.arguments.as_deref()) {
                n += tokens::count(args);
            }
        }
        n as u64
    }
}

/// Parse one event's `data` and meter it.
pub fn inspect(event: &[u8]) -> EventInfo {
    let mut info = EventInfo::default();
    let mut data: Option<Cow<'_, [u8]>> = None;
    for line in event.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(value) = line.strip_prefix(b"data:") else {
            continue;
        };
        let value = value.strip_prefix(b" ").unwrap_or(value);
        data = Some(match data {
            None => Cow::Borrowed(value),
            Some(prev) => {
                // Multi-line data is joined with newlines, as the SSE spec says.
                let mut joined = prev.into_owned();
                joined.push(b'\n');
                joined.extend_from_slice(value);
                Cow::Owned(joined)
            }
        });
    }
    let Some(data) = data else { return info };
    if data.trim_ascii() == b"[DONE]" {
        info.done = true;
        return info;
    }
    if let Ok(chunk) = serde_json::from_slice::<StreamChunk<'_>>(&data) {
        info.error = chunk.error.is_some();
        info.usage = chunk.usage.as_ref().map(UsageDoc::to_usage);
        let choices = chunk.choices.unwrap_or_default();
        info.usage_only = choices.is_empty() && info.usage.is_some();
        info.output_tokens = choices
            .iter()
            .filter_map(|c| c.delta.as_ref())
            .map(Message::tokens)
            .sum();
    }
    info
}

/// Meter state of one relayed stream.
#[derive(Debug, Default, Clone, Copy)]
pub struct StreamMeter {
    /// Output tokens counted from the relayed deltas.
    pub output_tokens: u64,
    /// Last usage the upstream reported.
    pub usage: Option<Usage>,
    /// `data: [DONE]` was seen.
    pub done: bool,
    /// Events forwarded to the client.
    pub events: u64,
}

/// Framer plus meter plus the usage-chunk filter, for one stream.
#[derive(Debug, Default)]
pub struct SseRelay {
    framer: SseFramer,
    /// Drop usage-only chunks (the relay asked for them; the client did not).
    strip_usage: bool,
    /// Counters of what went through.
    pub meter: StreamMeter,
}

impl SseRelay {
    /// `strip_usage`: remove usage-only chunks from the client's view.
    pub fn new(strip_usage: bool) -> Self {
        SseRelay {
            framer: SseFramer::default(),
            strip_usage,
            meter: StreamMeter::default(),
        }
    }

    /// Frame `chunk`; complete events to forward are appended to `out`.
    pub fn push(&mut self, chunk: &[u8], out: &mut VecDeque<Bytes>) {
        let SseRelay {
            framer,
            strip_usage,
            meter,
        } = self;
        framer.push(chunk, |event| Self::accept(*strip_usage, meter, event, out));
    }

    /// Bytes held back waiting for the end of an event.
    pub fn pending(&self) -> usize {
        self.framer.pending()
    }

    /// Drop the incomplete event held back.
    pub fn discard(&mut self) {
        self.framer.discard();
    }

    /// End of the upstream body: flush an unterminated trailing event.
    pub fn finish(&mut self, out: &mut VecDeque<Bytes>) {
        // An unterminated event is forwarded only when its last line is complete; a
        // half-written line from a cut stream is dropped.
        if let Some(event) = self.framer.finish() {
            if event.ends_with(b"\n") {
                let mut complete = BytesMut::with_capacity(event.len() + 1);
                complete.extend_from_slice(&event);
                complete.extend_from_slice(b"\n");
                Self::accept(self.strip_usage, &mut self.meter, complete.freeze(), out);
            }
        }
    }

    fn accept(strip_usage: bool, meter: &mut StreamMeter, event: Bytes, out: &mut VecDeque<Bytes>) {
        let info = inspect(&event);
        meter.output_tokens += info.output_tokens;
        if info.usage.is_some() {
            meter.usage = info.usage;
        }
        meter.done |= info.done;
        if info.error || (strip_usage && info.usage_only) {
            return;
        }
        meter.events += 1;
        out.push_back(event);
    }
}
