//! Properties of the SSE framer and event metering on generated streams: events do not
//! depend on how the bytes are chunked, match a byte-at-a-time reference framer, lose or
//! invent no byte, and the usage a stream reports is the usage that was written.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::VecDeque;

use bytes::Bytes;
use onetoken_gateway::sse::{inspect, SseFramer, SseRelay, StreamMeter};
use onetoken_gateway::tokens;
use proptest::prelude::*;

/// Bytes that look like SSE often enough to reach every branch: line ends of both kinds,
/// field names, `[DONE]`, JSON fragments, and arbitrary bytes.
fn stream_bytes() -> impl Strategy<Value = Vec<u8>> {
    let fixed: &[&[u8]] = &[
        b"\n",
        b"\r\n",
        b"\r",
        b"\n\n",
        b"data: ",
        b"data:",
        b"event: x\n",
        b": comment\n",
        b"[DONE]",
        b"{\"choices\":[{\"delta\":{\"content\":\"hi there\"}}]}",
        b"{\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4}}",
        b"{\"error\":{\"message\":\"x\"}}",
    ];
    // Each fixed piece as likely as each of the two random kinds.
    let piece = prop_oneof![
        12 => prop::sample::select(fixed).prop_map(<[u8]>::to_vec),
        1 => "[a-z {}\":,]{0,12}".prop_map(String::into_bytes),
        1 => prop::collection::vec(any::<u8>(), 0..8),
    ];
    prop::collection::vec(piece, 0..40).prop_map(|v| v.concat())
}

/// `bytes` cut at the given positions (taken modulo the length, in any order).
fn chunked(bytes: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
    let mut at: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    at.push(0);
    at.push(bytes.len());
    at.sort_unstable();
    at.windows(2).map(|w| bytes[w[0]..w[1]].to_vec()).collect()
}

fn frame(chunks: &[Vec<u8>]) -> (Vec<Bytes>, Option<Bytes>) {
    let mut framer = SseFramer::default();
    let mut events = Vec::new();
    for c in chunks {
        framer.push(c, |e| events.push(e));
    }
    (events, framer.finish())
}

/// The reference: one byte at a time, an event ends as soon as it ends with a blank line.
fn reference_frame(bytes: &[u8]) -> (Vec<Vec<u8>>, Vec<u8>) {
    let mut events = Vec::new();
    let mut cur = Vec::new();
    for &b in bytes {
        cur.push(b);
        if cur.ends_with(b"\n\n") || cur.ends_with(b"\n\r\n") {
            events.push(std::mem::take(&mut cur));
        }
    }
    (events, cur)
}

fn relay(chunks: &[Vec<u8>], strip_usage: bool) -> (VecDeque<Bytes>, StreamMeter) {
    let mut r = SseRelay::new(strip_usage);
    let mut out = VecDeque::new();
    for c in chunks {
        r.push(c, &mut out);
    }
    r.finish(&mut out);
    (out, r.meter)
}

fn usage_json(prompt: u64, completion: u64, cached: Option<u64>) -> String {
    let details = cached.map_or(String::new(), |c| {
        format!(",\"prompt_tokens_details\":{{\"cached_tokens\":{c}}}")
    });
    format!(
        "{{\"prompt_tokens\":{prompt},\"completion_tokens\":{completion},\"total_tokens\":{}{details}}}",
        prompt.saturating_add(completion)
    )
}

/// One `data:` event carrying `json`, split into several `data:` lines after commas (the
/// spec joins them with newlines, which JSON reads as whitespace).
fn data_event(json: &str, split_lines: bool, crlf: bool) -> String {
    let eol = if crlf { "\r\n" } else { "\n" };
    let body = if split_lines {
        json.replace(',', &format!(",{eol}data: "))
    } else {
        json.to_owned()
    };
    format!("data: {body}{eol}{eol}")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn framing_does_not_depend_on_chunking(
        bytes in stream_bytes(),
        cuts in prop::collection::vec(any::<usize>(), 0..12),
    ) {
        let whole = frame(std::slice::from_ref(&bytes));
        prop_assert_eq!(&frame(&chunked(&bytes, &cuts)), &whole);
        let single: Vec<Vec<u8>> = bytes.chunks(1).map(<[u8]>::to_vec).collect();
        prop_assert_eq!(&frame(&single), &whole);
    }

    #[test]
    fn framing_matches_the_reference_and_keeps_every_byte(
        bytes in stream_bytes(),
        cuts in prop::collection::vec(any::<usize>(), 0..12),
    ) {
        let (events, tail) = frame(&chunked(&bytes, &cuts));
        let (ref_events, ref_tail) = reference_frame(&bytes);
        let events: Vec<Vec<u8>> = events.iter().map(|e| e.to_vec()).collect();
        prop_assert_eq!(&events, &ref_events);
        // A whitespace-only tail is dropped at the end of the stream; anything else is kept.
        if ref_tail.iter().all(u8::is_ascii_whitespace) {
            prop_assert!(tail.is_none());
        } else {
            prop_assert_eq!(tail.as_deref(), Some(&ref_tail[..]));
        }
    }

    #[test]
    fn relay_output_and_meter_do_not_depend_on_chunking(
        bytes in stream_bytes(),
        cuts in prop::collection::vec(any::<usize>(), 0..12),
        strip_usage in any::<bool>(),
    ) {
        let (out, meter) = relay(std::slice::from_ref(&bytes), strip_usage);
        let (split_out, split_meter) = relay(&chunked(&bytes, &cuts), strip_usage);
        prop_assert_eq!(split_out, out);
        // StreamMeter has no PartialEq; its Debug form lists every field.
        prop_assert_eq!(format!("{split_meter:?}"), format!("{meter:?}"));
    }

    #[test]
    fn inspect_never_panics(event in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = inspect(&event);
    }

    #[test]
    fn usage_parsed_equals_usage_written(
        prompt in any::<u64>(),
        completion in any::<u64>(),
        cached in proptest::option::of(any::<u64>()),
        split_lines in any::<bool>(),
        crlf in any::<bool>(),
    ) {
        let chunk = format!("{{\"choices\":[],\"usage\":{}}}", usage_json(prompt, completion, cached));
        let info = inspect(data_event(&chunk, split_lines, crlf).as_bytes());
        let usage = info.usage.expect("usage parsed");
        prop_assert_eq!(usage.prompt, prompt);
        prop_assert_eq!(usage.completion, completion);
        prop_assert_eq!(usage.cached, cached.unwrap_or(0));
        prop_assert!(info.usage_only);
        prop_assert!(!info.done && !info.error);
    }

    #[test]
    fn a_relayed_stream_meters_what_it_carried(
        deltas in prop::collection::vec("[a-zA-Z0-9 ,.!?\u{4e00}-\u{4e10}]{0,24}", 0..8),
        prompt in 0u64..1_000_000,
        cached in 0u64..1_000,
        crlf in any::<bool>(),
        cuts in prop::collection::vec(any::<usize>(), 0..12),
        strip_usage in any::<bool>(),
    ) {
        let completion = deltas.len() as u64;
        let mut stream = String::new();
        for d in &deltas {
            let chunk = serde_json::json!({"choices": [{"index": 0, "delta": {"content": d}}], "usage": null});
            stream.push_str(&data_event(&chunk.to_string(), false, crlf));
        }
        let usage = format!("{{\"choices\":[],\"usage\":{}}}", usage_json(prompt, completion, Some(cached)));
        stream.push_str(&data_event(&usage, true, crlf));
        stream.push_str(&data_event("[DONE]", false, crlf));

        let (out, m) = relay(&chunked(stream.as_bytes(), &cuts), strip_usage);
        prop_assert!(m.done);
        let u = m.usage.expect("usage metered");
        prop_assert_eq!((u.prompt, u.completion, u.cached), (prompt, completion, cached));
        let expected: u64 = deltas.iter().map(|d| tokens::count(d) as u64).sum();
        prop_assert_eq!(m.output_tokens, expected);
        // Every event is forwarded, except the usage-only chunk when the client did not ask.
        let forwarded = deltas.len() + 1 + usize::from(!strip_usage);
        prop_assert_eq!(out.len(), forwarded);
        prop_assert_eq!(m.events, forwarded as u64);
    }
}
