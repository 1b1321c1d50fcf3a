//! Token counting throughput, in MB/s of text on one thread: the gateway's counter
//! (`tokens::count`) next to the two exact o200k libraries it must agree with.
//! Run: `cargo bench -p onetoken-gateway --bench tokens`.
//!
//! The corpora are generated (deterministic) so that they are not one paragraph repeated:
//! a repeated paragraph would make the gateway's per-thread piece cache look better than
//! it is on real traffic. "cold" runs one pass on a fresh thread (empty cache).
//! Times are the counting thread's CPU time (best of a few passes), so MB/s is per core
//! even while other processes load the machine; they still share its caches.

mod support;

use std::hint::black_box;
use std::time::Instant;

use onetoken_gateway::xorshift::XorShift;
use serde_json::json;
use support::{chat_request, DOCS};

const CODE: [&str; 8] = [
    include_str!("../src/proxy.rs"),
    include_str!("../src/engine.rs"),
    include_str!("../src/snapshot.rs"),
    include_str!("../src/sse.rs"),
    include_str!("../src/records.rs"),
    include_str!("../src/server.rs"),
    include_str!("../src/metrics.rs"),
    include_str!("../src/billing.rs"),
];

const CJK: [&str; 8] = [
    "数据库连接失败，请稍后重试。",
    "这个接口会在转发请求之前计算提示词的令牌数量，用于预留额度。",
    "日本語のテキストを正確に数える必要があります。",
    "東京都の天気は晴れ、最高気温は二十五度です。",
    "한국어 문장도 함께 섞여 있습니다.",
    "请把下面的段落翻译成英文，并保持原有的格式。",
    "ユーザーの入力はログに残さず、件数だけを記録します。",
    "模型返回的结果需要按照字符流逐块转发给客户端。",
];

/// Distinct words of the docs and sources, most frequent first.
fn vocabulary() -> Vec<String> {
    let mut freq: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for text in DOCS.iter().chain(CODE.iter()) {
        for w in text.split(|c: char| !c.is_ascii_alphabetic()) {
            if w.len() > 1 {
                *freq.entry(w.to_ascii_lowercase()).or_default() += 1;
            }
        }
    }
    let mut words: Vec<(String, usize)> = freq.into_iter().collect();
    words.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    words.into_iter().map(|(w, _)| w).collect()
}

/// One English sentence: Zipf words, a few capitalised or rare made-up words and numbers.
fn sentence(rng: &mut XorShift, words: &[String], out: &mut String) {
    let n = 6 + rng.below(18);
    for i in 0..n {
        if i > 0 {
            out.push(' ');
        }
        match rng.below(40) {
            0 => out.push_str(&rng.below(100_000).to_string()),
            1 => {
                // A rare word the vocabulary will not hold whole.
                for _ in 0..5 + rng.below(8) {
                    out.push(char::from(b'a' + rng.below(26) as u8));
                }
            }
            _ => {
                let w = &words[rng.zipf(words.len())];
                if i == 0 || rng.below(15) == 0 {
                    let mut c = w.chars();
                    if let Some(f) = c.next() {
                        out.extend(f.to_uppercase());
                        out.push_str(c.as_str());
                    }
                } else {
                    out.push_str(w);
                }
            }
        }
        if i + 1 < n && rng.below(8) == 0 {
            out.push(',');
        }
    }
    out.push_str([". ", ". ", "? ", "! ", ".\n\n"][rng.below(5)]);
}

fn english(rng: &mut XorShift, words: &[String], bytes: usize) -> String {
    let mut s = String::new();
    while s.len() < bytes {
        sentence(rng, words, &mut s);
    }
    s
}

fn code(rng: &mut XorShift, bytes: usize) -> String {
    let mut s = String::new();
    while s.len() < bytes {
        s.push_str(CODE[rng.below(CODE.len())]);
    }
    s
}

fn json_bodies(rng: &mut XorShift, words: &[String], bytes: usize) -> String {
    let mut s = String::new();
    while s.len() < bytes {
        let mut content = String::new();
        for _ in 0..1 + rng.below(4) {
            sentence(rng, words, &mut content);
        }
        let body = chat_request(rng, content, |rng| {
            let id = u128::from(rng.next_u64()) << 64 | u128::from(rng.next_u64());
            json!({"request_id": format!("{id:032x}"), "attempt": rng.below(3)})
        });
        s.push_str(&serde_json::to_string_pretty(&body).unwrap_or_default());
        s.push('\n');
    }
    s
}

fn mixed_cjk(rng: &mut XorShift, words: &[String], bytes: usize) -> String {
    let mut s = String::new();
    while s.len() < bytes {
        match rng.below(3) {
            0 => sentence(rng, words, &mut s),
            1 => s.push_str(CJK[rng.below(CJK.len())]),
            _ => {
                s.push_str(CJK[rng.below(CJK.len())]);
                s.push_str([" 🚀 ", " (", "：", " — ", "\n"][rng.below(5)]);
                sentence(rng, words, &mut s);
            }
        }
    }
    s
}

fn repeated(paragraph: &str, bytes: usize) -> String {
    let mut s = String::with_capacity(bytes + paragraph.len());
    while s.len() < bytes {
        s.push_str(paragraph);
    }
    s
}

/// CPU time of the calling thread in seconds (Linux: /proc/thread-self/schedstat, first
/// field), if the system tells it.
fn cpu_now() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns: u64 = s.split_whitespace().next()?.parse().ok()?;
    Some(ns as f64 / 1e9)
}

/// Seconds `f` took. The thread's CPU time when the window is long enough for its
/// tick-grained accounting (>= 20 ms): that is what "MB/s per core" means, and unlike wall
/// time it leaves out time the thread waited while other processes (concurrent builds)
/// had the core. Wall time otherwise.
fn timed(f: impl FnOnce()) -> f64 {
    let (wall, cpu) = (Instant::now(), cpu_now());
    f();
    let wall = wall.elapsed().as_secs_f64();
    match (cpu, cpu_now()) {
        (Some(a), Some(b)) if b - a >= 0.02 => b - a,
        _ => wall,
    }
}

/// Best of `reps` samples of at least `min_bytes` each: the machine is shared, and the
/// fastest sample is the one least disturbed by other processes.
fn measure(
    name: &str,
    text: &str,
    reps: usize,
    min_bytes: usize,
    f: impl Fn(&str) -> usize,
) -> usize {
    black_box(f("warm up"));
    let passes = min_bytes.div_ceil(text.len()).max(1);
    let mut tokens = 0;
    let mut secs = f64::MAX;
    for _ in 0..reps {
        secs = secs.min(timed(|| {
            for _ in 0..passes {
                tokens = black_box(f(black_box(text)));
            }
        }));
    }
    let mbs = (text.len() * passes) as f64 / 1e6 / secs;
    println!("  {name:<40} {mbs:>7.1} MB/s  ({tokens} tokens per pass)");
    tokens
}

/// One pass on a new thread, whose piece cache starts empty (best of three threads).
fn measure_cold(text: &str) {
    let mut secs = f64::MAX;
    let mut tokens = 0;
    for _ in 0..3 {
        std::thread::scope(|s| {
            s.spawn(|| {
                secs = secs.min(timed(|| {
                    tokens = black_box(onetoken_gateway::tokens::count(black_box(text)));
                }));
            });
        });
    }
    println!(
        "  {:<40} {:>7.1} MB/s  ({tokens} tokens per pass)",
        "tokens::count, cold cache (1 pass)",
        text.len() as f64 / 1e6 / secs
    );
}

/// Many different prompts of about `size` bytes cut from `text`, counted one by one.
fn measure_prompts(name: &str, text: &str, size: usize, f: impl Fn(&str) -> usize) {
    let mut prompts = Vec::new();
    let mut start = 0;
    while prompts.len() < 2000 {
        let mut end = (start + size).min(text.len());
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        prompts.push(&text[start..end]);
        start = if end + size >= text.len() { 0 } else { end };
        while !text.is_char_boundary(start) {
            start += 1;
        }
    }
    let bytes: usize = prompts.iter().map(|p| p.len()).sum();
    let mut secs = f64::MAX;
    let mut tokens = 0;
    for _ in 0..3 {
        secs = secs.min(timed(|| {
            tokens = 0;
            for p in &prompts {
                tokens += black_box(f(black_box(p)));
            }
        }));
    }
    println!(
        "  {name:<40} {:>7.1} MB/s  {:>6.1} µs per prompt ({} tokens)",
        bytes as f64 / 1e6 / secs,
        secs * 1e6 / prompts.len() as f64,
        tokens / prompts.len()
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    // `--ours` skips the libraries (for profiling the gateway's path alone).
    let ours_only = args.iter().any(|a| a == "--ours");
    let size = if quick { 256 << 10 } else { 1 << 20 };
    let bpe = bpe_openai::o200k_base();
    let tik = tiktoken_rs::o200k_base().ok();
    onetoken_gateway::tokens::warm_up();

    let words = vocabulary();
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    let old_english = "The quick brown fox jumps over the lazy dog. In 2026, enterprise API gateways \
relay millions of chat completions per day; each one must be authenticated, metered and billed. \
Rust's ownership model makes it a good fit: fn main() { println!(\"hi\"); } Numbers 1234567890.\n\n";
    let old_mixed =
        "Données, naïve café, 東京都, привет мир — emojis 🚀🔥 and prose in English too.\n";
    // Real English prose where the system has it (Debian and Ubuntu ship these texts).
    let mut licenses = String::new();
    for name in [
        "GPL-3",
        "Apache-2.0",
        "MPL-2.0",
        "Artistic",
        "LGPL-3",
        "GFDL-1.3",
    ] {
        licenses.push_str(
            &std::fs::read_to_string(format!("/usr/share/common-licenses/{name}"))
                .unwrap_or_default(),
        );
    }
    let mut kinds = vec![
        ("english prose", english(&mut rng, &words, size)),
        ("code (Rust sources)", code(&mut rng, size)),
        ("JSON request bodies", json_bodies(&mut rng, &words, size)),
        ("mixed English + CJK", mixed_cjk(&mut rng, &words, size)),
        (
            "english, one paragraph repeated",
            repeated(old_english, size),
        ),
        ("mixed script, one line repeated", repeated(old_mixed, size)),
    ];
    if !licenses.is_empty() {
        kinds.push(("real English (license texts)", licenses));
    }
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1));
    for (label, text) in &kinds {
        if only.is_some_and(|o| !label.contains(o.as_str())) {
            continue;
        }
        println!("-- {label}, {} KB", text.len() >> 10);
        measure_cold(text);
        let reps = args
            .iter()
            .position(|a| a == "--reps")
            .and_then(|i| args.get(i + 1)?.parse().ok())
            .unwrap_or(5);
        let ours = measure(
            "tokens::count (warm cache)",
            text,
            reps,
            4 << 20,
            onetoken_gateway::tokens::count,
        );
        if ours_only {
            continue;
        }
        let lib = measure("bpe-openai o200k_base count", text, 3, 1 << 20, |t| {
            bpe.count(t)
        });
        if let Some(tik) = &tik {
            measure(
                "tiktoken-rs o200k_base encode_ordinary",
                text,
                1,
                1 << 20,
                |t| tik.encode_ordinary(t).len(),
            );
        }
        assert_eq!(ours, lib, "token counts differ");
    }
    for (label, text) in kinds.iter().filter(|(l, _)| !l.contains("repeated")) {
        if only.is_some_and(|o| !label.contains(o.as_str())) {
            continue;
        }
        println!("-- 1 KB prompts cut from: {label}");
        measure_prompts("tokens::count", text, 1024, onetoken_gateway::tokens::count);
        if !ours_only {
            measure_prompts("bpe-openai o200k_base count", text, 1024, |t| bpe.count(t));
        }
    }
}
