//! Token counting with the o200k_base vocabulary (GPT-4o family), exact, in a few MB.
//!
//! Measured 2026-12-06 on the 2-core dev machine, shared with other builds and test suites
//! (load average 1-3), so absolute figures are noisy and the ratios are the point. Release
//! build, one thread, `cargo bench -p onetoken-gateway --bench tokens -- --quick`, MB/s of
//! text per core (the counting thread's CPU time), best of three runs; "before" is the
//! previous design (bpe-openai's tokenizer loaded for its vocabulary and long pieces).
//!
//! | text (256 KB, generated)            | warm      | cold (1st pass) | before: warm, cold |
//! |-------------------------------------|-----------|-----------------|--------------------|
//! | English prose (2.5% never-seen words) | 178     | 122             | 124, 67            |
//! | code (the gateway's Rust sources)   | 247       | 150             | 195, 127           |
//! | JSON chat request bodies            | 210       | 143             | 150, 94            |
//! | mixed English + CJK                 | 70        | 61              | 105, 70            |
//! | real English (license texts, 97 KB) | 227       | 125             | 198, 87            |
//!
//! bpe-openai counts the mixed CJK text at 44 MB/s here. 1 KB prompts (warm): English
//! 169 MB/s = 6 µs per prompt, code 228, JSON 197, mixed CJK 73 (before 102), license
//! English 215. Every row gives identical counts to bpe-openai (the bench asserts it).
//!
//! Memory: the tables are a 4 MiB index, a 256 KiB table of two-byte tokens, the 64 KiB
//! code point classes and the vocabulary blob in the binary (1.6 MB, read-only, shared by
//! every process mapping the library), plus 256 KiB of cache per counting thread. Warming
//! up took the gateway's Python process (interpreter + `onetoken._core`) from 18 to 25 MB
//! resident in 12 ms; with bpe-openai's tokenizer it went from 18 to 88 MB in 63 ms.
//!
//! Where the time goes: ASCII prose, code and JSON are split and looked up in a few ns per
//! piece; what is left is BPE on pieces never seen before (random words in the generated
//! English, ids in JSON) and on long CJK runs (a run of Han characters is one piece, often
//! 30-60 bytes, too long for the cache and merged span by span each time).
//!
//! Why it is small: a tokenizer library keeps tens of MB of structures for its own
//! encoder (bpe-openai: ~70 MB resident once loaded) while counting needs only the ranks.
//! build.rs takes the vocabulary from the `.tiktoken` data tiktoken-rs embeds and writes
//! it as one length byte plus the bytes of each token, in rank order; warm-up indexes that
//! blob in an open-addressing table of (offset, length, rank, hash bits), and no tokenizer
//! library is linked into the gateway.
//!
//! Why it is fast: o200k's pre-tokenizer splits text into pieces (words with their leading
//! space or punctuation, 1-3 digit numbers, punctuation runs, whitespace runs) and BPE never
//! merges across pieces, so the count is the sum of per-piece counts. Libraries find the
//! pieces with a general regex engine and then run a BPE encoder (with heap allocations)
//! per piece, even for the common piece that is one vocabulary entry. Here the pieces come
//! from a hand-written matcher of the same pattern, and a piece's count comes from, in
//! order: length 1 (every byte is a token), a per-thread cache (256 KiB per thread, no
//! sharing, no locks), the vocabulary index (a piece equal to a token is one token), and
//! then the BPE merge: on the stack for pieces under 128 bytes, with a heap of candidate
//! pairs for longer ones, so a megabyte without a space costs n log n, not n^2.
//!
//! Why it is exact: the matcher implements the library's pattern alternative by alternative
//! with the same leftmost-first (backtracking) preference, over character classes taken at
//! start-up from the same `regex-syntax` Unicode tables the library's regex is compiled
//! from. The merge is tiktoken's own procedure (lowest rank first, leftmost on a tie) over
//! the same ranks. Cache and vocabulary hits are confirmed by comparing bytes, never by
//! hash alone. The tests below compare pieces and counts with bpe-openai (a
//! dev-dependency) on every Unicode scalar value in many contexts, on a generated corpus
//! and on random strings, the vocabulary with the library's rank by rank, and both merges
//! with the library's encoder on random byte strings and long CJK and emoji runs;
//! tests/props_tokens.rs compares counts with tiktoken-rs.

use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::LazyLock;

use regex_syntax::hir::{Class, HirKind};

/// Tokens in `text` under o200k_base (same counts as tiktoken's `encode_ordinary`).
pub fn count(text: &str) -> usize {
    if text.is_empty() {
        return 0;
    }
    match FAST.as_ref() {
        Some(fast) => fast.count(text),
        // Only if the embedded tables were corrupt (the tests build them): every token
        // covers at least one byte, so the byte length is an upper bound, never an
        // under-count that would let a request past its limits.
        None => text.len(),
    }
}

/// Load the vocabulary and build the lookup tables now rather than on the first request.
pub fn warm_up() {
    let _ = count("warm up");
}

static FAST: LazyLock<Option<Fast>> = LazyLock::new(Fast::new);

thread_local! {
    static CACHE: RefCell<Cache> = RefCell::new(Cache::new());
}

// Character classes of the o200k pattern, one bit each.
/// `[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]`, the "upper" letters of the pattern.
const UP: u8 = 1;
/// `[\p{Ll}\p{Lm}\p{Lo}\p{M}]`, the "lower" letters of the pattern.
const LO: u8 = 2;
/// `\p{L}`
const LET: u8 = 4;
/// `\p{N}`
const NUM: u8 = 8;
/// `\s`
const WS: u8 = 16;
/// `\r` or `\n`
const NL: u8 = 32;
/// Past the end of the text: in no class.
const END: u8 = 64;

/// Code point classes from the Unicode tables the library's regex uses.
struct Classes {
    ascii: [u8; 128],
    /// Class of every code point below 0x10000.
    bmp: Vec<u8>,
    /// Sorted, disjoint ranges above 0xFFFF with a non-empty class.
    astral: Vec<(u32, u32, u8)>,
}

impl Classes {
    fn new() -> Option<Self> {
        let sets: [(&str, u8); 5] = [
            (r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]", UP),
            (r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]", LO),
            (r"\p{L}", LET),
            (r"\p{N}", NUM),
            (r"\s", WS),
        ];
        let mut bmp = vec![0u8; 0x10000];
        let mut bounds: Vec<u32> = Vec::new();
        let mut astral_sets: Vec<(Vec<(u32, u32)>, u8)> = Vec::new();
        for (pattern, bit) in sets {
            let hir = regex_syntax::ParserBuilder::new()
                .build()
                .parse(pattern)
                .ok()?;
            let HirKind::Class(Class::Unicode(class)) = hir.kind() else {
                return None;
            };
            let mut astral = Vec::new();
            for r in class.ranges() {
                let (lo, hi) = (u32::from(r.start()), u32::from(r.end()));
                for cp in lo..=hi.min(0xFFFF) {
                    if let Some(slot) = bmp.get_mut(cp as usize) {
                        *slot |= bit;
                    }
                }
                if hi > 0xFFFF {
                    let lo = lo.max(0x10000);
                    astral.push((lo, hi));
                    bounds.push(lo);
                    bounds.push(hi + 1);
                }
            }
            astral_sets.push((astral, bit));
        }
        for cp in [b'\r', b'\n'] {
            if let Some(slot) = bmp.get_mut(usize::from(cp)) {
                *slot |= NL;
            }
        }
        // Split the astral planes at every range boundary and classify each segment.
        bounds.sort_unstable();
        bounds.dedup();
        let mut astral = Vec::new();
        for w in bounds.windows(2) {
            let (lo, hi) = (w[0], w[1] - 1);
            let mut class = 0u8;
            for (ranges, bit) in &astral_sets {
                if ranges.iter().any(|&(a, b)| a <= lo && hi <= b) {
                    class |= bit;
                }
            }
            if class != 0 {
                astral.push((lo, hi, class));
            }
        }
        let mut ascii = [0u8; 128];
        ascii.copy_from_slice(bmp.get(..128)?);
        Some(Classes { ascii, bmp, astral })
    }

    fn of_code_point(&self, cp: u32) -> u8 {
        if cp < 0x10000 {
            return self.bmp.get(cp as usize).copied().unwrap_or(0);
        }
        match self.astral.binary_search_by(|&(lo, hi, _)| {
            if hi < cp {
                std::cmp::Ordering::Less
            } else if lo > cp {
                std::cmp::Ordering::Greater
            } else {
                std::cmp::Ordering::Equal
            }
        }) {
            Ok(i) => self.astral.get(i).map_or(0, |r| r.2),
            Err(_) => 0,
        }
    }

    /// Class and byte length of the character starting at `i` (a char boundary of valid
    /// UTF-8), or `END` past the end.
    #[inline(always)]
    fn at(&self, b: &[u8], i: usize) -> (u8, usize) {
        match b.get(i) {
            None => (END, 0),
            Some(&c) if c < 0x80 => (self.ascii[usize::from(c)], 1),
            Some(&c) => self.at_multibyte(b, i, c),
        }
    }

    #[inline(never)]
    fn at_multibyte(&self, b: &[u8], i: usize, c0: u8) -> (u8, usize) {
        let cont = |k: usize| u32::from(b.get(i + k).copied().unwrap_or(0) & 0x3F);
        let (cp, len) = if c0 < 0xE0 {
            ((u32::from(c0 & 0x1F) << 6) | cont(1), 2)
        } else if c0 < 0xF0 {
            ((u32::from(c0 & 0x0F) << 12) | (cont(1) << 6) | cont(2), 3)
        } else {
            (
                (u32::from(c0 & 0x07) << 18) | (cont(1) << 12) | (cont(2) << 6) | cont(3),
                4,
            )
        };
        (self.of_code_point(cp), len)
    }
}

/// Start of the character that ends just before `i`.
fn prev_char_start(b: &[u8], mut i: usize) -> usize {
    while i > 0 {
        i -= 1;
        match b.get(i) {
            Some(&c) if c & 0xC0 == 0x80 => {}
            _ => break,
        }
    }
    i
}

impl Classes {
    /// End of the pre-tokenizer piece that starts at `p` (< len). This is the library's
    /// pattern, tried in its order; the first alternative that matches wins:
    ///
    /// 1. `[^\r\n\p{L}\p{N}]?[UP]*[LO]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?`
    /// 2. `[^\r\n\p{L}\p{N}]?[UP]+[LO]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?`
    /// 3. `\p{N}{1,3}`
    /// 4. ` ?[^\s\p{L}\p{N}]+[\r\n/]*`
    /// 5. `\s*[\r\n]+`
    /// 6. `\s+$`
    /// 7. `\s+(?!\S)` (the library's `\s+\s` minus its last character)
    /// 8. `\s+`
    ///
    /// Returns `None` only in a state the pattern cannot reach (the caller then asks the
    /// library for this piece).
    fn piece_end(&self, b: &[u8], p: usize) -> Option<usize> {
        let (c0, l0) = self.at(b, p);
        let prefix = c0 & (NL | LET | NUM | END) == 0;
        if prefix {
            if let Some(e) = self.letters_lower(b, p + l0) {
                return Some(e);
            }
        }
        if let Some(e) = self.letters_lower(b, p) {
            return Some(e);
        }
        if prefix {
            if let Some(e) = self.letters_upper(b, p + l0) {
                return Some(e);
            }
        }
        if let Some(e) = self.letters_upper(b, p) {
            return Some(e);
        }
        if c0 & NUM != 0 {
            let mut e = p + l0;
            for _ in 0..2 {
                let (c, l) = self.at(b, e);
                if c & NUM == 0 {
                    break;
                }
                e += l;
            }
            return Some(e);
        }
        let other = |c: u8| c & (WS | LET | NUM | END) == 0;
        let start = if b.get(p) == Some(&b' ') {
            let (c1, _) = self.at(b, p + 1);
            other(c1).then_some(p + 1)
        } else {
            other(c0).then_some(p)
        };
        if let Some(mut e) = start {
            loop {
                let (c, l) = self.at(b, e);
                if !other(c) {
                    break;
                }
                e += l;
            }
            while matches!(b.get(e), Some(b'\r' | b'\n' | b'/')) {
                e += 1;
            }
            return Some(e);
        }
        if c0 & WS == 0 {
            return None;
        }
        // A whitespace run: up to its last line break, else all of it at the end of the
        // text, else all but its last character, else the single character.
        let mut e = p;
        let mut last = p;
        let mut chars = 0usize;
        let mut after_newline = None;
        loop {
            let (c, l) = self.at(b, e);
            if c & WS == 0 {
                break;
            }
            if c & NL != 0 {
                after_newline = Some(e + l);
            }
            last = e;
            e += l;
            chars += 1;
        }
        if let Some(n) = after_newline {
            Some(n)
        } else if e >= b.len() || chars < 2 {
            Some(e)
        } else {
            Some(last)
        }
    }

    /// `[UP]*[LO]+` then the optional contraction, at `q`. The greedy `[UP]*` gives back
    /// characters until a `[LO]` can follow; characters in both classes (Lm, Lo, M) make
    /// that matter.
    #[inline(always)]
    fn letters_lower(&self, b: &[u8], q: usize) -> Option<usize> {
        let mut e = q;
        let mut ascii_run = true;
        loop {
            let (c, l) = self.at(b, e);
            if c & UP == 0 {
                break;
            }
            ascii_run &= l == 1;
            e += l;
        }
        let (c, _) = self.at(b, e);
        let mut j = e;
        if c & LO == 0 {
            // ASCII upper-case letters are never in LO, so only a non-ASCII run can yield.
            if ascii_run {
                return None;
            }
            loop {
                if j <= q {
                    return None;
                }
                j = prev_char_start(b, j);
                if self.at(b, j).0 & LO != 0 {
                    break;
                }
            }
        }
        Some(contraction(b, self.run_end(b, j, LO)))
    }

    /// `[UP]+[LO]*` then the optional contraction, at `q`.
    #[inline(always)]
    fn letters_upper(&self, b: &[u8], q: usize) -> Option<usize> {
        let (c, l) = self.at(b, q);
        if c & UP == 0 {
            return None;
        }
        let e = self.run_end(b, q + l, UP);
        Some(contraction(b, self.run_end(b, e, LO)))
    }

    /// Where the run of characters in `class` starting at `e` ends.
    #[inline(always)]
    fn run_end(&self, b: &[u8], mut e: usize, class: u8) -> usize {
        loop {
            let (c, l) = self.at(b, e);
            if c & class == 0 {
                return e;
            }
            e += l;
        }
    }
}

/// `(?i:'s|'t|'re|'ve|'m|'ll|'d)?` at `e`. Under Unicode case folding `s` also matches
/// U+017F LATIN SMALL LETTER LONG S; no other letter here has a non-ASCII fold.
#[inline(always)]
fn contraction(b: &[u8], e: usize) -> usize {
    if b.get(e) != Some(&b'\'') {
        return e;
    }
    let at = |k: usize| b.get(e + k).map(u8::to_ascii_lowercase);
    match at(1) {
        Some(b's' | b't' | b'm' | b'd') => e + 2,
        Some(b'r') if at(2) == Some(b'e') => e + 3,
        Some(b'v') if at(2) == Some(b'e') => e + 3,
        Some(b'l') if at(2) == Some(b'l') => e + 3,
        Some(0xC5) if b.get(e + 2) == Some(&0xBF) => e + 3,
        _ => e,
    }
}

/// The first 8 bytes of `b` as a little-endian word, zero-padded. No variable-length
/// copy (a library call per word): merges hash and compare many short spans.
#[inline(always)]
fn read_u64(b: &[u8]) -> u64 {
    if let Some(w) = b.first_chunk::<8>() {
        return u64::from_le_bytes(*w);
    }
    let mut w = 0u64;
    for (i, &x) in b.iter().enumerate() {
        w |= u64::from(x) << (8 * i);
    }
    w
}

#[inline(always)]
fn fold(a: u64, b: u64) -> u64 {
    let p = u128::from(a) * u128::from(b);
    (p as u64) ^ ((p >> 64) as u64)
}

const K1: u64 = 0x9E37_79B9_7F4A_7C15;
const K2: u64 = 0xD6E8_FEB8_6659_FD93;
const K3: u64 = 0xA076_1D64_78BD_642F;

/// Longest piece the per-thread cache keeps; longer ones are rare and counted directly.
const KEY_BYTES: usize = 24;

/// Pieces shorter than this are merged by scanning arrays on the stack; longer ones (a
/// run of Han characters with no space is one piece) by the heap merge.
const SCAN_BYTES: usize = 128;

/// A short piece as zero-padded little-endian words: equal keys (with equal lengths) are
/// equal pieces, and comparing them needs no byte loop.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Key([u64; 3]);

impl Key {
    #[inline(always)]
    fn of(piece: &[u8]) -> Key {
        let word = |i: usize| piece.get(i..).map_or(0, read_u64);
        Key([word(0), word(8), word(16)])
    }

    #[inline(always)]
    fn hash(&self, len: usize) -> u64 {
        let [a, b, c] = self.0;
        fold(a ^ K1, b ^ K2).wrapping_add(fold(c ^ K3 ^ len as u64, K1))
    }
}

/// Byte equality without a library call for short slices (the common case here).
#[inline(always)]
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len()
        && if a.len() <= KEY_BYTES {
            Key::of(a) == Key::of(b)
        } else {
            a == b
        }
}

/// A fast non-cryptographic hash of a piece; only picks slots, equality is checked on bytes.
#[inline(always)]
fn hash(b: &[u8]) -> u64 {
    if b.len() <= KEY_BYTES {
        return Key::of(b).hash(b.len());
    }
    let mut h = (b.len() as u64).wrapping_mul(K1);
    let mut chunks = b.chunks_exact(8);
    for c in &mut chunks {
        h = fold(h ^ read_u64(c), K2);
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        h = fold(h ^ read_u64(rest), K2);
    }
    fold(h, K1)
}

/// The o200k_base vocabulary as build.rs writes it: for every rank (= token id) in order,
/// one length byte then the token's bytes. It is the byte arena the index points into.
static RANKS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/o200k_base.ranks"));

/// The vocabulary's tokens of two bytes or more in an open-addressing table over
/// `RANKS`. A slot packs the token's offset in `RANKS` (bits 0-23), its length (24-31),
/// its rank (32-51) and 12 bits of its hash (52-63), so most misses touch no token bytes
/// and a hit is confirmed by comparing bytes, never by hash alone.
struct Vocab {
    slots: Vec<u64>,
    mask: usize,
    /// Rank of every two-byte token by its bytes as a little-endian u16 (`NO_PAIR` if
    /// none): a merge's first round looks up every adjacent byte pair.
    pairs: Vec<u32>,
}

const NO_PAIR: u32 = u32::MAX;

/// No real slot is all ones: ranks stay far below 2^20 - 1.
const EMPTY: u64 = u64::MAX;
const TAG_SHIFT: u32 = 52;

impl Vocab {
    fn new() -> Option<Self> {
        let mut entries = Vec::new();
        let mut at = 0usize;
        while let Some(&len) = RANKS.get(at) {
            let offset = at + 1;
            at = offset + usize::from(len);
            if len == 0 || at > RANKS.len() {
                return None;
            }
            entries.push((offset, len));
        }
        if RANKS.len() >= 1 << 24 || entries.len() >= (1 << 20) - 1 {
            return None;
        }
        let size = (entries.len() * 2).next_power_of_two();
        let mut v = Vocab {
            slots: vec![EMPTY; size],
            mask: size - 1,
            pairs: vec![NO_PAIR; 1 << 16],
        };
        for (rank, &(offset, len)) in entries.iter().enumerate() {
            // Pieces of one byte never reach the table (every byte is a token).
            if len < 2 {
                continue;
            }
            let bytes = RANKS.get(offset..offset + usize::from(len))?;
            if let [a, b] = *bytes {
                if let Some(p) = v.pairs.get_mut(usize::from(u16::from_le_bytes([a, b]))) {
                    *p = rank as u32;
                }
            }
            let h = hash(bytes);
            let mut i = (h as usize) & v.mask;
            while v.slots.get(i).is_some_and(|&s| s != EMPTY) {
                i = (i + 1) & v.mask;
            }
            let packed = offset as u64
                | (u64::from(len) << 24)
                | ((rank as u64) << 32)
                | ((h >> TAG_SHIFT) << TAG_SHIFT);
            if let Some(slot) = v.slots.get_mut(i) {
                *slot = packed;
            }
        }
        Some(v)
    }

    /// Rank of the token `piece[i..i + 2]`, if it is one.
    #[inline(always)]
    fn pair(&self, piece: &[u8], i: usize) -> Option<u32> {
        let (&a, &b) = (piece.get(i)?, piece.get(i + 1)?);
        let r = *self.pairs.get(usize::from(u16::from_le_bytes([a, b])))?;
        (r != NO_PAIR).then_some(r)
    }

    #[inline(always)]
    fn contains(&self, h: u64, piece: &[u8]) -> bool {
        self.find(h, piece).is_some()
    }

    /// The rank of the token whose bytes are `piece` (`h` = `hash(piece)`).
    #[inline(always)]
    fn find(&self, h: u64, piece: &[u8]) -> Option<u32> {
        let tag = h >> TAG_SHIFT;
        let mut i = (h as usize) & self.mask;
        loop {
            let s = *self.slots.get(i)?;
            if s == EMPTY {
                return None;
            }
            let len = ((s >> 24) & 0xFF) as usize;
            if s >> TAG_SHIFT == tag && len == piece.len() {
                let offset = (s & 0xFF_FFFF) as usize;
                if RANKS
                    .get(offset..offset + len)
                    .is_some_and(|t| same_bytes(t, piece))
                {
                    return Some(((s >> 32) & 0xF_FFFF) as u32);
                }
            }
            i = (i + 1) & self.mask;
        }
    }
}

/// Sets of the per-thread cache; two entries of 32 bytes each: 256 KiB per thread.
const CACHE_SETS: usize = 4096;

#[derive(Clone, Copy)]
struct Entry {
    key: Key,
    /// 0 for an empty entry (pieces of length 0 and 1 are never cached).
    len: u8,
    count: u8,
}

/// One cache line: the most recently inserted entry first.
#[derive(Clone, Copy)]
#[repr(align(64))]
struct Set([Entry; 2]);

/// Two-way set-associative piece -> count cache, one per thread (nothing shared, nothing
/// locked). It is private to the thread and never logged or exported.
struct Cache {
    sets: Vec<Set>,
}

impl Cache {
    fn new() -> Self {
        let empty = Entry {
            key: Key([0; 3]),
            len: 0,
            count: 0,
        };
        Cache {
            sets: vec![Set([empty; 2]); CACHE_SETS],
        }
    }

    #[inline(always)]
    fn get(&self, h: u64, key: &Key, len: usize) -> Option<usize> {
        let set = self
            .sets
            .get((h as usize) & (self.sets.len().wrapping_sub(1)))?;
        set.0
            .iter()
            .find(|e| usize::from(e.len) == len && e.key == *key)
            .map(|e| usize::from(e.count))
    }

    #[inline(always)]
    fn put(&mut self, h: u64, key: Key, len: usize, count: usize) {
        let (Ok(len), Ok(count)) = (u8::try_from(len), u8::try_from(count)) else {
            return;
        };
        let mask = self.sets.len().wrapping_sub(1);
        if let Some(set) = self.sets.get_mut((h as usize) & mask) {
            set.0[1] = set.0[0];
            set.0[0] = Entry { key, len, count };
        }
    }
}

struct Fast {
    classes: Classes,
    vocab: Vocab,
}

impl Fast {
    fn new() -> Option<Self> {
        Some(Fast {
            classes: Classes::new()?,
            vocab: Vocab::new()?,
        })
    }

    fn count(&self, text: &str) -> usize {
        CACHE
            .try_with(|cell| match cell.try_borrow_mut() {
                Ok(mut cache) => self.count_with(text, Some(&mut cache)),
                Err(_) => self.count_with(text, None),
            })
            .unwrap_or_else(|_| self.count_with(text, None))
    }

    fn count_with(&self, text: &str, mut cache: Option<&mut Cache>) -> usize {
        let b = text.as_bytes();
        let mut total = 0;
        let mut p = 0;
        while p < b.len() {
            let end = match self.classes.piece_end(b, p) {
                Some(e) if e > p && e <= b.len() => e,
                // Unreachable (the sweeps below split every code point in every context
                // as the library does); one character as a piece keeps the count going.
                _ => (p + self.classes.at(b, p).1.max(1)).min(b.len()),
            };
            let piece = b.get(p..end).unwrap_or_default();
            total += self.piece_count(piece, cache.as_deref_mut());
            p = end;
        }
        total
    }

    #[inline(always)]
    fn piece_count(&self, piece: &[u8], cache: Option<&mut Cache>) -> usize {
        let len = piece.len();
        if len <= 1 {
            return len;
        }
        if len > KEY_BYTES {
            return self.uncached_count(hash(piece), piece);
        }
        let key = Key::of(piece);
        let h = key.hash(len);
        if let Some(c) = &cache {
            if let Some(n) = c.get(h, &key, len) {
                return n;
            }
        }
        let n = self.uncached_count(h, piece);
        if let Some(c) = cache {
            c.put(h, key, len, n);
        }
        n
    }

    /// BPE count of a piece by the reference merge procedure (tiktoken's
    /// `byte_pair_merge`): repeatedly merge the adjacent pair whose concatenation is the
    /// lowest-ranked token (leftmost on a tie), with ranks = token ids. Short pieces scan
    /// arrays on the stack, so a piece seen for the first time costs no allocation; long
    /// ones (CJK runs, long words) use a heap of candidate pairs, so the time grows as
    /// n log n rather than n^2.
    fn merge_count(&self, piece: &[u8]) -> usize {
        match piece.len() {
            0 | 1 => piece.len(),
            n if n <= KEY_BYTES => self.scan_merge_count::<{ KEY_BYTES + 1 }>(piece),
            n if n < SCAN_BYTES => self.scan_merge_count::<SCAN_BYTES>(piece),
            _ => self.heap_merge_count(piece),
        }
    }

    /// Rank of the token `piece[a..b]`, if it is one.
    #[inline(always)]
    fn rank(&self, piece: &[u8], a: usize, b: usize) -> Option<u32> {
        if b == a + 2 {
            return self.vocab.pair(piece, a);
        }
        piece.get(a..b).and_then(|s| self.vocab.find(hash(s), s))
    }

    /// The merge by scanning for the lowest rank each round; `piece.len()` < `N`.
    fn scan_merge_count<const N: usize>(&self, piece: &[u8]) -> usize {
        const NONE: u32 = u32::MAX;
        let n = piece.len();
        if n >= N || N > 256 {
            return self.heap_merge_count(piece);
        }
        let rank = |a: u8, b: u8| -> u32 {
            self.rank(piece, usize::from(a), usize::from(b))
                .unwrap_or(NONE)
        };
        // bounds[..m]: part boundaries (bytes, so a merge moves little memory); ranks[i]:
        // rank of parts i and i + 1 merged.
        let mut bounds = [0u8; N];
        let mut ranks = [NONE; N];
        for (i, b) in bounds.iter_mut().enumerate().take(n + 1) {
            *b = i as u8;
        }
        for (i, r) in ranks.iter_mut().enumerate().take(n - 1) {
            *r = self.vocab.pair(piece, i).unwrap_or(NONE);
        }
        let mut m = n + 1;
        loop {
            let mut best = NONE;
            let mut at = 0;
            for (i, &r) in ranks.iter().enumerate().take(m - 2) {
                if r < best {
                    best = r;
                    at = i;
                }
            }
            if best == NONE {
                return m - 1;
            }
            // Drop boundary at + 1 (and the rank of the pair it started).
            bounds.copy_within(at + 2..m, at + 1);
            ranks.copy_within(at + 2..m - 1, at + 1);
            m -= 1;
            let (b, r) = (&bounds, &mut ranks);
            if let Some(x) = r.get_mut(at) {
                *x = if at + 2 < m {
                    rank(b[at], b[at + 2])
                } else {
                    NONE
                };
            }
            if at > 0 {
                if let Some(x) = r.get_mut(at - 1) {
                    *x = rank(b[at - 1], b[at + 1]);
                }
            }
        }
    }

    /// The same merge with the candidate pairs in a min-heap of (rank, start, end): the
    /// smallest entry is the lowest rank, leftmost on a tie, as the scan picks. Merging
    /// only removes boundaries, so an entry whose pair still spans exactly two parts with
    /// the same start and end is current (same bytes, same rank); others are skipped.
    fn heap_merge_count(&self, piece: &[u8]) -> usize {
        let n = piece.len();
        let Ok(n32) = u32::try_from(n) else {
            return n;
        };
        // next[i] / prev[i]: start of the part after / before the part starting at i.
        let mut next: Vec<u32> = (1..=n32).collect();
        let mut prev: Vec<u32> = (0..n32).map(|i| i.wrapping_sub(1)).collect();
        let mut alive = vec![true; n];
        let mut heap = BinaryHeap::with_capacity(n);
        for i in 0..n.saturating_sub(1) {
            if let Some(r) = self.vocab.pair(piece, i) {
                heap.push(Reverse((r, i as u32, i as u32 + 2)));
            }
        }
        let mut parts = n;
        while let Some(Reverse((_, start, end))) = heap.pop() {
            let (s, e) = (start as usize, end as usize);
            let mid = next.get(s).copied().unwrap_or(n32) as usize;
            if !alive.get(s).copied().unwrap_or(false)
                || mid >= n
                || next.get(mid).copied() != Some(end)
            {
                continue;
            }
            if let Some(a) = alive.get_mut(mid) {
                *a = false;
            }
            if let Some(x) = next.get_mut(s) {
                *x = end;
            }
            if let Some(x) = prev.get_mut(e) {
                *x = start;
            }
            parts -= 1;
            if e < n {
                let after = next.get(e).copied().unwrap_or(n32);
                if let Some(r) = self.rank(piece, s, after as usize) {
                    heap.push(Reverse((r, start, after)));
                }
            }
            if s > 0 {
                let before = prev.get(s).copied().unwrap_or(0);
                if let Some(r) = self.rank(piece, before as usize, e) {
                    heap.push(Reverse((r, before, end)));
                }
            }
        }
        parts
    }

    fn uncached_count(&self, h: u64, piece: &[u8]) -> usize {
        if self.vocab.contains(h, piece) {
            1
        } else {
            self.merge_count(piece)
        }
    }

    #[cfg(test)]
    fn pieces<'a>(&self, text: &'a str) -> Vec<&'a str> {
        let b = text.as_bytes();
        let mut out = Vec::new();
        let mut p = 0;
        while p < b.len() {
            let e = self.classes.piece_end(b, p).unwrap_or(p);
            assert!(e > p && e <= b.len(), "no piece at {p}");
            out.push(&text[p..e]);
            p = e;
        }
        out
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::xorshift::XorShift;

    fn fast() -> &'static Fast {
        FAST.as_ref().expect("tables build")
    }

    fn lib() -> &'static bpe_openai::Tokenizer {
        bpe_openai::o200k_base()
    }

    /// Pieces and count of `text` must equal the library's.
    #[track_caller]
    fn check(text: &str) {
        check_split(text);
        assert_eq!(count(text), lib().count(text), "count differs");
    }

    #[track_caller]
    fn check_split(text: &str) {
        let ours = fast().pieces(text);
        let theirs: Vec<&str> = lib().split(text).collect();
        if ours != theirs {
            let i = ours.iter().zip(&theirs).take_while(|(a, b)| a == b).count();
            panic!(
                "split differs at piece {i}: ours {:?} library {:?} in {:?}",
                ours.get(i),
                theirs.get(i),
                text.chars().take(200).collect::<String>()
            );
        }
    }

    /// Characters chosen to sit on every class boundary of the pattern.
    const TRICKY: &[&str] = &[
        "a",
        "z",
        "A",
        "Z",
        "0",
        "9",
        " ",
        "  ",
        "\t",
        "\n",
        "\r",
        "\r\n",
        "\x0b",
        "\x0c",
        "\x00",
        "\x1c",
        "\x1f",
        "\x7f",
        "'",
        "'s",
        "'S",
        "'t",
        "'re",
        "'RE",
        "'Ve",
        "'m",
        "'ll",
        "'LL",
        "'d",
        "'x",
        "'",
        "'ſ",
        "/",
        "//",
        "!",
        ".",
        ",",
        "-",
        "_",
        "\"",
        "{",
        "}",
        "(",
        ")",
        ":",
        ";",
        "#",
        "$",
        "%",
        "@",
        "\\",
        "é",
        "É",
        "ß",
        "ñ",
        "ǅ",
        "ʰ",
        "ª",
        "\u{301}",
        "\u{300}",
        "\u{93f}",
        "東",
        "京",
        "あ",
        "ア",
        "ー",
        "한",
        "п",
        "П",
        "α",
        "Ω",
        "١",
        "٣",
        "²",
        "½",
        "Ⅻ",
        "\u{a0}",
        "\u{85}",
        "\u{3000}",
        "\u{2028}",
        "\u{2029}",
        "\u{200b}",
        "\u{feff}",
        "—",
        "…",
        "€",
        "🚀",
        "🔥",
        "👍🏽",
        "𝐀",
        "𝑎",
        "𠀀",
        "𝟙",
        "\u{e000}",
        "\u{10ffff}",
        "K",
        "ſ",
    ];

    const WORDS: &[&str] = &[
        "the",
        "The",
        "THE",
        "quick",
        "brown",
        "fox",
        "don't",
        "I'M",
        "we've",
        "they'll",
        "she'd",
        "it's",
        "You're",
        "HTTP",
        "JSONParser",
        "getX",
        "iPhone",
        "McDonald's",
        "naïve",
        "café",
        "Straße",
        "東京都",
        "こんにちは",
        "привет",
        "Ελληνικά",
        "tokenizer",
        "supercalifragilisticexpialidocious",
        "x",
        "a",
        "I",
        "2026",
        "3.14159",
        "1234567890",
        "0x1F",
        "snake_case",
        "camelCase",
        "kebab-case",
        "e.g.",
        "U.S.A.",
    ];

    const SNIPPETS: &[&str] = &[
        "fn main() {\n    println!(\"hi\");\n}\n",
        "if (x != null && y >= 10) { return x / y; }\n",
        "{\"model\": \"gpt-4o\", \"messages\": [{\"role\": \"user\", \"content\": \"Hi!\"}], \"max_tokens\": 512}",
        "<div class=\"a\">\n\t<span>text</span>\n</div>\r\n",
        "SELECT id, name FROM users WHERE age > 21 ORDER BY name;\n",
        "    \n\n    \t  \r\n  ",
        "https://example.com/path/to/file.html?q=1&x=2#frag",
        "// comment\n/* block */\n/// doc\n",
        "$ cargo build --release 2>&1 | tail -n 20\n",
        "日本語のテキストと English text が混在しています。",
        "数据库连接失败，请稍后重试。Error code: 503.",
        "emoji 🚀🔥 in a sentence 👍🏽 ok",
        "ℌ𝔢𝔩𝔩𝔬 ｗｏｒｌｄ ＡＢＣ １２３",
    ];

    #[test]
    fn tables_cover_the_pattern_classes() {
        let c = &fast().classes;
        assert_eq!(c.at(b"a", 0).0, LO | LET);
        assert_eq!(c.at(b"A", 0).0, UP | LET);
        assert_eq!(c.at(b"7", 0).0, NUM);
        assert_eq!(c.at(b"\n", 0).0, WS | NL);
        assert_eq!(c.at(b" ", 0).0, WS);
        assert_eq!(c.at(b"!", 0).0, 0);
        assert_eq!(c.at("東".as_bytes(), 0), (UP | LO | LET, 3));
        assert_eq!(c.at("\u{301}".as_bytes(), 0), (UP | LO, 2));
        assert_eq!(c.at("𝐀".as_bytes(), 0), (UP | LET, 4));
        assert_eq!(c.at("🚀".as_bytes(), 0), (0, 4));
        assert_eq!(c.at(b"", 0).0, END);
    }

    /// Every code point in `range`, each in all `templates` (`{}` stands for it), checked
    /// in batches.
    fn sweep(range: std::ops::RangeInclusive<u32>, templates: &[&str]) {
        let parts: Vec<Vec<&str>> = templates.iter().map(|t| t.split("{}").collect()).collect();
        let mut text = String::new();
        for (n, ch) in range.filter_map(char::from_u32).enumerate() {
            let mut buf = [0u8; 4];
            let c: &str = ch.encode_utf8(&mut buf);
            for t in &parts {
                for (i, part) in t.iter().enumerate() {
                    if i > 0 {
                        text.push_str(c);
                    }
                    text.push_str(part);
                }
            }
            if n % 512 == 511 {
                check_split(&text);
                text.clear();
            }
        }
        check_split(&text);
    }

    /// Every Basic Multilingual Plane character (all the scripts, spaces, marks and
    /// digits of everyday text) in contexts that exercise each alternative of the pattern
    /// and each way a character can end or extend a piece.
    #[test]
    fn split_matches_library_for_every_bmp_code_point() {
        sweep(
            0..=0xFFFF,
            &[
                "x{}y ", " {}A ", "A{}b ", "{}{}.", "a'{}", "'{}", "1{}2", "!{}", " {}\n", "\n{}",
                "Ab{}'s", "AB{}'S ", "a'r{}", "a'l{}", "a've{}", " \t{}", "{} ", "-{}x", "{}/",
            ],
        );
        // A whitespace run at the very end, per whitespace character.
        for cp in 0..=0xFFFFu32 {
            let Some(ch) = char::from_u32(cp) else {
                continue;
            };
            if fast().classes.of_code_point(cp) & WS != 0 {
                for t in ["x{}", "x {}", "x{}{}", "x\n{}", "{}"] {
                    check(&t.replace("{}", ch.encode_utf8(&mut [0; 4])));
                }
            }
        }
    }

    /// Every character above the BMP (emoji, historic scripts, mathematical letters and
    /// digits, CJK extensions, unassigned and private use), in fewer contexts.
    #[test]
    fn split_matches_library_for_every_astral_code_point() {
        sweep(
            0x10000..=0x10FFFF,
            &["x{}y ", "A{}b ", "1{}2", "!{}a", "{}{}'s", " {}A "],
        );
    }

    #[test]
    fn counts_match_library_on_a_generated_corpus() {
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
        let mut corpus = String::new();
        while corpus.len() < 400_000 {
            match rng.below(6) {
                0 | 1 => {
                    for _ in 0..rng.below(30) + 1 {
                        let sep = rng.pick(&[" ", " ", " ", ", ", ". ", "\n", "  ", "\t", "; "]);
                        corpus.push_str(rng.pick(WORDS));
                        corpus.push_str(sep);
                    }
                }
                2 => corpus.push_str(rng.pick(SNIPPETS)),
                3 => {
                    for _ in 0..rng.below(40) + 1 {
                        corpus.push_str(rng.pick(TRICKY));
                    }
                }
                4 => {
                    // Random printable and control ASCII.
                    for _ in 0..rng.below(60) + 1 {
                        corpus.push(char::from((rng.below(128)) as u8));
                    }
                }
                _ => {
                    // Numbers and whitespace runs of every length.
                    let n = rng.below(20);
                    for _ in 0..n {
                        corpus.push(char::from(b'0' + rng.below(10) as u8));
                    }
                    let ws = rng.pick(&[" ", "\t", "\n", "\r\n", "\u{a0}", "\u{3000}"]);
                    corpus.push_str(&ws.repeat(rng.below(12)));
                }
            }
        }
        check(&corpus);
        // Many substrings, cut at random character boundaries (so pieces start and end
        // anywhere, including a text ending in whitespace).
        let bounds: Vec<usize> = corpus.char_indices().map(|(i, _)| i).collect();
        for _ in 0..3000 {
            let a = bounds[rng.below(bounds.len())];
            let len = rng.below(600);
            let b = bounds
                .iter()
                .copied()
                .find(|&x| x >= a + len)
                .unwrap_or(corpus.len());
            check(&corpus[a..b]);
        }
    }

    /// A property loop: random strings over the tricky alphabet, words and raw ASCII.
    #[test]
    fn random_strings_match_library() {
        let mut rng = XorShift(0x2545_F491_4F6C_DD1D);
        for _ in 0..5000 {
            let mut s = String::new();
            for _ in 0..rng.below(48) {
                match rng.below(4) {
                    0 => s.push_str(rng.pick(WORDS)),
                    1 => s.push(char::from(rng.below(128) as u8)),
                    _ => s.push_str(rng.pick(TRICKY)),
                }
            }
            check(&s);
        }
    }

    #[test]
    fn repeated_counting_uses_the_cache_and_agrees() {
        let text = SNIPPETS.concat().repeat(50) + &WORDS.join(" ").repeat(50);
        let first = count(&text);
        assert_eq!(first, lib().count(text.as_str()));
        assert_eq!(count(&text), first);
        let mut tiny = Cache::new();
        tiny.sets.truncate(1);
        let again = fast().count_with(&text, Some(&mut tiny));
        assert_eq!(again, first);
        assert_eq!(fast().count_with(&text, None), first);
    }

    /// The embedded vocabulary is the library's, rank for rank, and the single-token
    /// shortcut is only right if every token encodes to itself.
    #[test]
    fn every_vocabulary_token_is_found_with_its_rank_and_counts_one() {
        let f = fast();
        let bpe = &lib().bpe;
        let mut at = 0usize;
        for id in 0..bpe.num_tokens() as u32 {
            let len = usize::from(RANKS[at]);
            let bytes = &RANKS[at + 1..at + 1 + len];
            at += 1 + len;
            assert_eq!(bytes, bpe.token_bytes(id), "token {id}");
            if len >= 2 {
                assert_eq!(f.vocab.find(hash(bytes), bytes), Some(id), "token {id}");
            }
            if len == 2 {
                assert_eq!(f.vocab.pair(bytes, 0), Some(id), "token {id}");
            }
            assert_eq!(f.merge_count(bytes), 1, "token {id}");
        }
        assert_eq!(at, RANKS.len());
        for miss in ["notatokenatall", "zzqxj", "  \t\n\n x"] {
            assert!(!f.vocab.contains(hash(miss.as_bytes()), miss.as_bytes()));
        }
        for b in 0..=255u8 {
            assert_eq!(bpe.count(&[b]), 1);
        }
    }

    /// The stack merge for short ASCII pieces against the library's BPE encoder, on random
    /// byte strings of every length it accepts (not only pre-tokenizer pieces: BPE is
    /// defined on any byte string).
    #[test]
    fn short_ascii_merge_matches_library_bpe() {
        let f = fast();
        let lib = &lib().bpe;
        let mut rng = XorShift(0x1234_5678_9ABC_DEF1);
        let letters = b"etaoinshrdlucmfwypvbgkjqxz";
        for i in 0..60_000 {
            let len = 2 + rng.below(KEY_BYTES - 1);
            let piece: Vec<u8> = (0..len)
                .map(|k| match (i % 4, k) {
                    // Words with a leading space or punctuation, as pieces have.
                    (0, 0) => b' ',
                    (1, 0) => b"!.,(@#_-"[rng.below(8)],
                    (0 | 1, _) => letters[rng.zipf_ish(letters.len())],
                    (2, _) => {
                        let set = b" \t\n0123456789aeiou!?/";
                        set[rng.below(set.len())]
                    }
                    _ => rng.below(128) as u8,
                })
                .collect();
            assert_eq!(f.merge_count(&piece), lib.count(&piece), "{piece:?}");
        }
        // Runs of one byte: many equal-rank pairs, where the leftmost must win.
        for b in [b'a', b' ', b'-', b'=', b'0', b'\n'] {
            for len in 2..=KEY_BYTES {
                let piece = vec![b; len];
                assert_eq!(f.merge_count(&piece), lib.count(&piece), "{piece:?}");
            }
        }
    }

    /// Both merges (stack scan and heap) against the library's BPE encoder on random byte
    /// strings of every length band, including bytes that are not UTF-8 on their own (BPE
    /// inside a CJK or emoji piece meets partial characters), and on long runs of CJK and
    /// emoji, where a piece is hundreds of bytes and the heap merge does the work.
    #[test]
    fn merges_match_library_bpe_on_random_bytes_and_long_cjk_and_emoji_runs() {
        let f = fast();
        let lib = &lib().bpe;
        let mut rng = XorShift(0x0DDB_1A5E_5BAD_5EED);
        let utf8_heavy: &[u8] = "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年\
            日本語のテキスト한국어문장🚀🔥😀👍🏽éèàüöñ"
            .as_bytes();
        for i in 0..6_000 {
            let len = match i % 3 {
                0 => 2 + rng.below(KEY_BYTES - 1),
                1 => KEY_BYTES + 1 + rng.below(SCAN_BYTES - KEY_BYTES),
                _ => SCAN_BYTES + rng.below(400),
            };
            let piece: Vec<u8> = (0..len)
                .map(|_| match i % 2 {
                    0 => rng.below(256) as u8,
                    _ => utf8_heavy[rng.below(utf8_heavy.len())],
                })
                .collect();
            assert_eq!(f.merge_count(&piece), lib.count(&piece), "{piece:?}");
            assert_eq!(f.heap_merge_count(&piece), lib.count(&piece), "{piece:?}");
        }
        let han = [
            "数据库连接失败请稍后重试",
            "东京都的天气",
            "模型返回的结果需要按照字符流",
        ];
        let emoji = ["🚀", "🔥", "👍🏽", "👨‍👩‍👧", "🇯🇵"];
        for reps in [1, 3, 10, 40, 200] {
            for run in han.iter().chain(&emoji) {
                let text = run.repeat(reps);
                let b = text.as_bytes();
                assert_eq!(f.merge_count(b), lib.count(b), "{reps} x {run}");
                assert_eq!(f.heap_merge_count(b), lib.count(b), "{reps} x {run}");
                check(&text);
            }
            let mut mixed = String::new();
            for _ in 0..reps {
                mixed.push_str(han[rng.below(han.len())]);
                mixed.push_str(emoji[rng.below(emoji.len())]);
            }
            check(&mixed);
        }
        // One byte repeated: equal-rank pairs everywhere, leftmost must win in the heap too.
        for b in [b'a', b' ', b'-', b'0', 0xE4] {
            for len in [25, 127, 128, 129, 1000] {
                let piece = vec![b; len];
                assert_eq!(f.merge_count(&piece), lib.count(&piece), "{b} x {len}");
            }
        }
        // Pieces of hundreds of KB (no space, no punctuation) go through the heap merge.
        check(&"a".repeat(200_000));
        check(&"数据库连接失败请稍后重试".repeat(5_000));
    }

    #[test]
    fn edge_cases() {
        assert_eq!(count(""), 0);
        for s in [
            " ",
            "\n",
            "a",
            "'",
            "'s",
            "I'M",
            "don't",
            "  x",
            "x  ",
            "x \n",
            "\r\n\r\n",
            "123456",
            "ſ",
            "a'ſ",
            "A'ſ",
            "ǅx",
            "x\u{301}",
            "\u{301}x",
            "🚀",
            "🚀🚀 ",
        ] {
            check(s);
        }
    }
}
