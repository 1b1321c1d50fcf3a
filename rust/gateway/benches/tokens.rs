//! Token counting throughput of the two exact o200k candidates, in MB/s of text on one
//! thread. Run: `cargo bench -p onetoken-gateway --bench tokens`.

use std::hint::black_box;
use std::time::Instant;

fn corpus(paragraph: &str, bytes: usize) -> String {
    let mut s = String::with_capacity(bytes + paragraph.len());
    while s.len() < bytes {
        s.push_str(paragraph);
    }
    s
}

fn measure(name: &str, text: &str, reps: usize, f: impl Fn(&str) -> usize) {
    black_box(f("warm up"));
    let start = Instant::now();
    let mut tokens = 0;
    for _ in 0..reps {
        tokens = black_box(f(black_box(text)));
    }
    let secs = start.elapsed().as_secs_f64();
    let mbs = (text.len() * reps) as f64 / 1e6 / secs;
    println!("{name:<44} {mbs:>7.1} MB/s  ({tokens} tokens per pass)");
}

fn main() {
    let english = "The quick brown fox jumps over the lazy dog. In 2026, enterprise API gateways \
relay millions of chat completions per day; each one must be authenticated, metered and billed. \
Rust's ownership model makes it a good fit: fn main() { println!(\"hi\"); } Numbers 1234567890.\n\n";
    let mixed = "Données, naïve café, 東京都, привет мир — emojis 🚀🔥 and prose in English too.\n";
    let bpe = bpe_openai::o200k_base();
    let tik = match tiktoken_rs::o200k_base() {
        Ok(t) => t,
        Err(_) => return,
    };
    for (label, para, size, reps) in [
        ("english 4 MB", english, 4 << 20, 3),
        ("mixed-script 4 MB", mixed, 4 << 20, 3),
        ("english 1 KB (a typical prompt)", english, 1 << 10, 4000),
    ] {
        let text = corpus(para, size);
        println!("-- {label}");
        measure("bpe-openai o200k_base count", &text, reps, |t| bpe.count(t));
        measure("tiktoken-rs o200k_base encode_ordinary", &text, reps, |t| {
            tik.encode_ordinary(t).len()
        });
        measure(
            "onetoken_gateway::tokens::count",
            &text,
            reps,
            onetoken_gateway::tokens::count,
        );
    }
}
