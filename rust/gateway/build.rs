//! Writes the o200k_base vocabulary as a compact blob for `tokens.rs`: for every rank in
//! order, one length byte and the token's bytes (ranks are the token ids, 0 upwards).
//!
//! The vocabulary comes from the `.tiktoken` file tiktoken-rs embeds; its tokenizer is
//! built here, at build time only, so the gateway never loads a tokenizer library's
//! structures (tens of MB resident) to count tokens.

#![allow(clippy::expect_used, clippy::panic)] // a build script fails the build loudly

use std::path::PathBuf;

fn main() {
    let bpe = tiktoken_rs::o200k_base().expect("tiktoken-rs builds o200k_base");
    let special = bpe.special_tokens();
    let mut blob = Vec::with_capacity(2 << 20);
    let mut rank = 0u32;
    while let Ok(bytes) = bpe.decode_bytes(&[rank]) {
        if std::str::from_utf8(&bytes).is_ok_and(|s| special.contains(s)) {
            break;
        }
        let len = u8::try_from(bytes.len()).expect("o200k tokens are at most 255 bytes");
        assert!(len > 0, "token {rank} is empty");
        blob.push(len);
        blob.extend_from_slice(&bytes);
        rank += 1;
    }
    assert!(rank > 199_000, "o200k_base has {rank} ordinary tokens");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    std::fs::write(out.join("o200k_base.ranks"), blob).expect("OUT_DIR is writable");
    println!("cargo::rerun-if-changed=build.rs");
}
