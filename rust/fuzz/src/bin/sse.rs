//! SSE framer and metering: never panics, and the events and meter do not depend on how
//! the upstream bytes are chunked (the first input byte picks the chunk size).

use std::collections::VecDeque;

use onetoken_gateway::sse::{inspect, SseRelay};

fn relay(chunks: std::slice::Chunks<'_, u8>) -> (VecDeque<bytes::Bytes>, String) {
    let mut r = SseRelay::new(true);
    let mut out = VecDeque::new();
    for c in chunks {
        r.push(c, &mut out);
    }
    r.finish(&mut out);
    (out, format!("{:?}", r.meter))
}

fn main() {
    // Build the tokenizer tables once, before the fork server starts, rather than in
    // every forked child (which AFL would see as slow and unstable runs).
    onetoken_gateway::tokens::warm_up();
    afl::fuzz!(|data: &[u8]| {
        let Some((&step, stream)) = data.split_first() else {
            return;
        };
        let whole = relay(stream.chunks(stream.len().max(1)));
        let split = relay(stream.chunks(usize::from(step).max(1)));
        assert!(whole == split, "framing depends on chunking");
        for event in &whole.0 {
            let _ = inspect(event);
        }
    });
}
