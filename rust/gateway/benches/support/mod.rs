//! What the benches share: the project's own prose as a realistic English corpus.

/// The project's specs: long, real English prose with code and tables in it.
pub const DOCS: [&str; 3] = [
    include_str!("../../../../docs/gateway-spec.md"),
    include_str!("../../../../docs/control-plane-spec.md"),
    include_str!("../../../../docs/mock-upstream.md"),
];
