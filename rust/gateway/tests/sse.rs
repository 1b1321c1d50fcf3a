//! SSE framing and metering.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::VecDeque;

use bytes::Bytes;
use onetoken_gateway::sse::{inspect, SseFramer, SseRelay};

const STREAM: &str = concat!(
    "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hello\"}}]}\n\n",
    ": keep-alive comment\n\n",
    "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"function\":{\"arguments\":\"{\\\"a\\\":1}\"}}]}}]}\r\n\r\n",
    "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":3,\"total_tokens\":12,\"prompt_tokens_details\":{\"cached_tokens\":4}}}\n\n",
    "data: [DONE]\n\n",
);

fn frame_all(parts: &[&[u8]]) -> Vec<Bytes> {
    let mut framer = SseFramer::default();
    let mut out = Vec::new();
    for p in parts {
        framer.push(p, |e| out.push(e));
    }
    assert!(framer.finish().is_none());
    out
}

#[test]
fn events_split_at_every_byte_boundary() {
    let whole = frame_all(&[STREAM.as_bytes()]);
    assert_eq!(whole.len(), 5);
    let bytes = STREAM.as_bytes();
    for cut in 0..=bytes.len() {
        assert_eq!(
            frame_all(&[&bytes[..cut], &bytes[cut..]]),
            whole,
            "cut at {cut}"
        );
    }
    for a in (0..bytes.len()).step_by(7) {
        for b in (a..bytes.len()).step_by(11) {
            assert_eq!(frame_all(&[&bytes[..a], &bytes[a..b], &bytes[b..]]), whole);
        }
    }
    let single: Vec<&[u8]> = bytes.chunks(1).collect();
    assert_eq!(frame_all(&single), whole);
}

#[test]
fn complete_events_are_released_immediately() {
    let mut framer = SseFramer::default();
    let mut out = Vec::new();
    framer.push(b"data: {\"a\":1}\n\ndata: {\"b\"", |e| out.push(e));
    assert_eq!(out.len(), 1, "the first event does not wait for the second");
    assert_eq!(framer.pending(), "data: {\"b\"".len());
}

#[test]
fn inspect_meters_content_tools_usage_and_done() {
    let events = frame_all(&[STREAM.as_bytes()]);
    let infos: Vec<_> = events.iter().map(|e| inspect(e)).collect();
    assert_eq!(
        infos[0].output_tokens as usize,
        onetoken_gateway::tokens::count("Hello")
    );
    assert_eq!(infos[1].output_tokens, 0);
    assert_eq!(
        infos[2].output_tokens as usize,
        onetoken_gateway::tokens::count("{\"a\":1}")
    );
    assert!(infos[3].usage_only);
    let u = infos[3].usage.unwrap();
    assert_eq!((u.prompt, u.completion, u.cached), (9, 3, 4));
    assert!(infos[4].done);
}

#[test]
fn relay_strips_the_usage_chunk_only_when_asked() {
    for strip in [true, false] {
        let mut relay = SseRelay::new(strip);
        let mut out = VecDeque::new();
        for chunk in STREAM.as_bytes().chunks(13) {
            relay.push(chunk, &mut out);
        }
        relay.finish(&mut out);
        let text: String = out
            .iter()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .collect();
        assert_eq!(text.contains("\"usage\""), !strip);
        assert!(text.ends_with("data: [DONE]\n\n"));
        assert!(relay.meter.done);
        assert_eq!(
            relay.meter.usage.unwrap().completion,
            3,
            "usage is metered even when stripped"
        );
    }
}

#[test]
fn unterminated_tail_is_flushed_only_when_its_line_is_complete() {
    let mut relay = SseRelay::new(true);
    let mut out = VecDeque::new();
    relay.push(b"data: [DONE]\n", &mut out);
    assert!(out.is_empty());
    relay.finish(&mut out);
    assert_eq!(
        out.pop_front().unwrap(),
        Bytes::from_static(b"data: [DONE]\n\n")
    );
    assert!(relay.meter.done);

    let mut cut = SseRelay::new(true);
    cut.push(
        b"data: {\"choices\":[{\"delta\":{\"content\":\"par",
        &mut out,
    );
    cut.finish(&mut out);
    assert!(out.is_empty(), "a half-written event is dropped");
    assert!(!cut.meter.done);
}
