//! Token counting throughput, in MB/s of text on one thread: the gateway's counter
//! (`tokens::count`) next to the two exact o200k libraries it must agree with.
//! Run: `cargo bench -p onetoken-gateway --bench tokens`.
//!
//! The corpora are generated (deterministic) so that they are not one paragraph repeated:
//! a repeated paragraph would make the gateway's per-thread piece cache look better than
//! it is on real traffic. "cold" runs one pass on a fresh thread (empty cache).

use std::hint::black_box;
use std::time::Instant;

use serde_json::json;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    /// Roughly Zipf: small indices are much more likely.
    fn zipf(&mut self, n: usize) -> usize {
        let u = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        (((n as f64 + 1.0).powf(u) - 1.0) as usize).min(n - 1)
    }
}

const DOCS: [&str; 3] = [
    include_str!("../../../docs/gateway-spec.md"),
    include_str!("../../../docs/control-plane-spec.md"),
    include_str!("../../../docs/mock-upstream.md"),
];

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
fn sentence(rng: &mut Rng, words: &[String], out: &mut String) {
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

fn english(rng: &mut Rng, words: &[String], bytes: usize) -> String {
    let mut s = String::new();
    while s.len() < bytes {
        sentence(rng, words, &mut s);
    }
    s
}

fn code(rng: &mut Rng, bytes: usize) -> String {
    let mut s = String::new();
    while s.len() < bytes {
        s.push_str(CODE[rng.below(CODE.len())]);
    }
    s
}

fn json_bodies(rng: &mut Rng, words: &[String], bytes: usize) -> String {
    let mut s = String::new();
    while s.len() < bytes {
        let mut content = String::new();
        for _ in 0..1 + rng.below(4) {
            sentence(rng, words, &mut content);
        }
        let body = json!({
            "model": "gpt-4o-mini",
            "user": format!("user-{:016x}", rng.next()),
            "temperature": rng.below(100) as f64 / 100.0,
            "max_tokens": 64 + rng.below(4000),
            "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": content},
            ],
            "metadata": {"request_id": format!("{:032x}", u128::from(rng.next()) << 64 | u128::from(rng.next())), "attempt": rng.below(3)},
        });
        s.push_str(&serde_json::to_string_pretty(&body).unwrap_or_default());
        s.push('\n');
    }
    s
}

fn mixed_cjk(rng: &mut Rng, words: &[String], bytes: usize) -> String {
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

fn measure(name: &str, text: &str, reps: usize, f: impl Fn(&str) -> usize) -> usize {
    black_box(f("warm up"));
    let start = Instant::now();
    let mut tokens = 0;
    for _ in 0..reps {
        tokens = black_box(f(black_box(text)));
    }
    let secs = start.elapsed().as_secs_f64();
    let mbs = (text.len() * reps) as f64 / 1e6 / secs;
    println!("  {name:<40} {mbs:>7.1} MB/s  ({tokens} tokens per pass)");
    tokens
}

/// One pass on a new thread, whose piece cache starts empty.
fn measure_cold(text: &str) {
    std::thread::scope(|s| {
        s.spawn(|| {
            let start = Instant::now();
            let tokens = black_box(onetoken_gateway::tokens::count(black_box(text)));
            let mbs = text.len() as f64 / 1e6 / start.elapsed().as_secs_f64();
            println!(
                "  {:<40} {mbs:>7.1} MB/s  ({tokens} tokens per pass)",
                "tokens::count, cold cache (1 pass)"
            );
        });
    });
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
    let t = Instant::now();
    let mut tokens = 0;
    for p in &prompts {
        tokens += black_box(f(black_box(p)));
    }
    let secs = t.elapsed().as_secs_f64();
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
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let old_english = "The quick brown fox jumps over the lazy dog. In 2026, enterprise API gateways \
relay millions of chat completions per day; each one must be authenticated, metered and billed. \
Rust's ownership model makes it a good fit: fn main() { println!(\"hi\"); } Numbers 1234567890.\n\n";
    let old_mixed = "Données, naïve café, 東京都, привет мир — emojis 🚀🔥 and prose in English too.\n";
    let kinds = [
        ("english prose", english(&mut rng, &words, size)),
        ("code (Rust sources)", code(&mut rng, size)),
        ("JSON request bodies", json_bodies(&mut rng, &words, size)),
        ("mixed English + CJK", mixed_cjk(&mut rng, &words, size)),
        ("english, one paragraph repeated", repeated(old_english, size)),
        ("mixed script, one line repeated", repeated(old_mixed, size)),
    ];
    for (label, text) in &kinds {
        println!("-- {label}, {} KB", text.len() >> 10);
        measure_cold(text);
        let ours = measure("tokens::count (warm cache)", text, 3, onetoken_gateway::tokens::count);
        if ours_only {
            continue;
        }
        let lib = measure("bpe-openai o200k_base count", text, 2, |t| bpe.count(t));
        if let Some(tik) = &tik {
            measure("tiktoken-rs o200k_base encode_ordinary", text, 1, |t| {
                tik.encode_ordinary(t).len()
            });
        }
        assert_eq!(ours, lib, "token counts differ");
    }
    for (label, text) in &kinds[..4] {
        println!("-- 1 KB prompts cut from: {label}");
        measure_prompts("tokens::count", text, 1024, onetoken_gateway::tokens::count);
        measure_prompts("bpe-openai o200k_base count", text, 1024, |t| bpe.count(t));
    }
}
