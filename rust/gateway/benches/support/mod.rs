//! What the benches share: the project's own prose as a realistic English corpus, and
//! chat-completion request bodies as clients send them.

use onetoken_gateway::xorshift::XorShift;
use serde_json::{json, Value};

/// The project's specs: long, real English prose with code and tables in it.
pub const DOCS: [&str; 3] = [
    include_str!("../../../../docs/gateway-spec.md"),
    include_str!("../../../../docs/control-plane-spec.md"),
    include_str!("../../../../docs/mock-upstream.md"),
];

/// A chat-completion request saying `content`, with client-ish parameters drawn from
/// `rng` and then `metadata` (drawn last, so each bench keeps its corpus).
pub fn chat_request(
    rng: &mut XorShift,
    content: String,
    metadata: impl FnOnce(&mut XorShift) -> Value,
) -> Value {
    let user = format!("user-{:016x}", rng.next_u64());
    let temperature = rng.below(100) as f64 / 100.0;
    let max_tokens = 64 + rng.below(4000);
    json!({
        "model": "gpt-4o-mini",
        "user": user,
        "temperature": temperature,
        "max_tokens": max_tokens,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": content},
        ],
        "metadata": metadata(rng),
    })
}
