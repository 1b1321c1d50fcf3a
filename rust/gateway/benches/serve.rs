//! The engine alone, serving for an external load tool, so its CPU and syscalls can be
//! measured apart from the upstream and the client:
//!
//! ```text
//! target/release/onetoken-mock-upstream --listen 127.0.0.1:9190 &
//! ONETOKEN_BENCH_UPSTREAM=127.0.0.1:9190 cargo bench -p onetoken-gateway --bench serve &
//! # prints "serving ADDR pid PID"; then, for example:
//! perf stat -e task-clock,context-switches,syscalls:sys_enter_write -p PID -- sleep 10 &
//! BENCH_MODEL=demo-chat BENCH_API_KEY=ot-good wrk -t1 -c32 -d10s -s bench/chat.lua http://ADDR
//! ```
//!
//! It serves for `ONETOKEN_BENCH_SECONDS` (default 30), then stops and prints the engine's
//! record counters. The journal goes to a fresh directory under the system temp dir,
//! removed at the end.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../tests/harness/mod.rs"]
mod harness;

use std::time::Duration;

use onetoken_gateway::Engine;

fn main() {
    let Ok(upstream) = std::env::var("ONETOKEN_BENCH_UPSTREAM") else {
        println!(
            "ONETOKEN_BENCH_UPSTREAM (the mock upstream's host:port) is not set: nothing to do"
        );
        return;
    };
    let seconds: u64 = std::env::var("ONETOKEN_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let spool = harness::tempdir::Dir::new();
    let engine = Engine::new(harness::engine_config(spool.path())).unwrap();
    let snapshot = harness::spec_snapshot(1, upstream.parse().unwrap(), i64::MAX / 4);
    engine
        .load_snapshot(snapshot.to_string().as_bytes())
        .unwrap();
    let addr = engine.start().unwrap();
    println!("serving {addr} pid {}", std::process::id());
    std::thread::sleep(Duration::from_secs(seconds));
    engine.stop(Duration::from_secs(1));
    let stats = engine.stats();
    println!(
        "records {} journal segments {} errors {}",
        stats.records_total, stats.journal_segments, stats.journal_errors
    );
}
