//! Sensitive-content guard (privacy policy section VI, "content you should not submit"):
//! an in-memory detector for vendor API keys, PEM private keys, passwords in connection
//! strings, bank card numbers, mainland-China resident ID numbers and phone numbers.
//!
//! [`scan`] keeps only a count per category. No match, offset or fragment of the text ever
//! leaves this module, so a [`Findings`] may be recorded, logged or named in an error
//! (privacy invariants 1 and 3).
//!
//! One forward pass over the bytes. Positions that may start a match (a digit or a key
//! prefix at a word start, `+`, `-`, `:`, `\`) are found 64 bytes at a time by branch-free
//! comparisons the compiler vectorises; only those positions are examined further (no regex
//! engine: the hot path stays allocation-free). Candidates are confirmed by structure
//! (prefix, length, charset, word boundaries) and by checksums (Luhn, ISO 7064 MOD 11-2,
//! the onetoken key CRC) rather than by shape alone, because in `block` mode a false
//! positive refuses a legitimate request. Speed: `benches/guard.rs`.
//!
//! Request bodies are JSON, so word boundaries also look through JSON string escapes: in
//! `"\u624b\u673a13812345678"` (CJK text sent with `ensure_ascii`) or `"a\nsk-..."` the
//! match starts right after an escape whose last character is a letter or hex digit.

use std::fmt;
use std::str::FromStr;

use memchr::memmem;

/// A kind of sensitive content. Names are stable: they appear in snapshots, in the
/// `guard_flags` column and in the `sensitive_content_blocked` error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Category {
    /// An API key of a known vendor (OpenAI, Anthropic, AWS, GitHub, Google, Slack, ...).
    SecretKey,
    /// A PEM private key block with key material.
    PrivateKey,
    /// A password in a connection string or URL (`scheme://user:password@host`).
    PasswordInUrl,
    /// A Luhn-valid card number of a known issuer range.
    BankCard,
    /// A mainland-China resident ID number with a valid checksum and birth date.
    CnResidentId,
    /// A mainland-China mobile number or an E.164 phone number.
    Phone,
}

impl Category {
    /// Every category, in the fixed order used by [`Findings::flags`].
    pub const ALL: [Category; 6] = [
        Category::SecretKey,
        Category::PrivateKey,
        Category::PasswordInUrl,
        Category::BankCard,
        Category::CnResidentId,
        Category::Phone,
    ];

    /// The stable snake_case name.
    pub const fn name(self) -> &'static str {
        match self {
            Category::SecretKey => "secret_key",
            Category::PrivateKey => "private_key",
            Category::PasswordInUrl => "password_in_url",
            Category::BankCard => "bank_card",
            Category::CnResidentId => "cn_resident_id",
            Category::Phone => "phone",
        }
    }

    /// The category with this name, if any.
    pub fn from_name(name: &str) -> Option<Category> {
        Category::ALL.into_iter().find(|c| c.name() == name)
    }

    const fn index(self) -> usize {
        self as usize
    }

    const fn bit(self) -> u8 {
        1 << self as u8
    }
}

impl fmt::Display for Category {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Category {
    type Err = UnknownCategory;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Category::from_name(s).ok_or_else(|| UnknownCategory { name: s.to_owned() })
    }
}

/// A category name that is not one of [`Category::ALL`]'s names. The name comes from
/// configuration, never from request content.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown guard category `{name}` (expected secret_key, private_key, password_in_url, \
     bank_card, cn_resident_id or phone)"
)]
pub struct UnknownCategory {
    /// The rejected name.
    pub name: String,
}

/// A set of categories (a bitset). Displays as comma-separated names in the fixed order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct CategorySet(u8);

impl CategorySet {
    /// No category.
    pub const fn empty() -> Self {
        CategorySet(0)
    }

    /// Every category.
    pub const fn all() -> Self {
        CategorySet((1 << Category::ALL.len()) - 1)
    }

    /// The categories whose bits (in [`Category::ALL`] order) are set in `bits`.
    pub const fn from_bits(bits: u8) -> Self {
        CategorySet(bits & Self::all().0)
    }

    /// Just `category`.
    pub const fn only(category: Category) -> Self {
        CategorySet(category.bit())
    }

    /// This set plus `category`.
    #[must_use]
    pub const fn with(self, category: Category) -> Self {
        CategorySet(self.0 | category.bit())
    }

    /// Add `category`.
    pub fn insert(&mut self, category: Category) {
        self.0 |= category.bit();
    }

    /// Whether `category` is in the set.
    pub const fn contains(self, category: Category) -> bool {
        self.0 & category.bit() != 0
    }

    /// Whether the set is empty.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Number of categories in the set.
    pub const fn len(self) -> usize {
        self.0.count_ones() as usize
    }

    /// The categories in the set, in the fixed order.
    pub fn iter(self) -> impl Iterator<Item = Category> {
        Category::ALL.into_iter().filter(move |c| self.contains(*c))
    }

    /// The set named by `names`; the first unknown name is an error naming it.
    pub fn from_names<I, S>(names: I) -> Result<Self, UnknownCategory>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut set = CategorySet::empty();
        for name in names {
            set.insert(name.as_ref().parse()?);
        }
        Ok(set)
    }
}

impl FromIterator<Category> for CategorySet {
    fn from_iter<T: IntoIterator<Item = Category>>(iter: T) -> Self {
        let mut set = CategorySet::empty();
        for c in iter {
            set.insert(c);
        }
        set
    }
}

impl fmt::Display for CategorySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (n, c) in self.iter().enumerate() {
            if n > 0 {
                f.write_str(",")?;
            }
            f.write_str(c.name())?;
        }
        Ok(())
    }
}

/// What a scan found: a count per category and nothing else.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Findings {
    counts: [u32; Category::ALL.len()],
}

impl Findings {
    /// Nothing found.
    pub fn is_empty(&self) -> bool {
        self.counts.iter().all(|&n| n == 0)
    }

    /// Matches of `category`.
    pub fn count(&self, category: Category) -> u32 {
        self.counts[category.index()]
    }

    /// Matches of every category together.
    pub fn total(&self) -> u32 {
        self.counts.iter().fold(0u32, |a, &n| a.saturating_add(n))
    }

    /// The categories with at least one match.
    pub fn categories(&self) -> CategorySet {
        self.iter().map(|(c, _)| c).collect()
    }

    /// `(category, count)` for each category found, in the fixed order.
    pub fn iter(&self) -> impl Iterator<Item = (Category, u32)> + '_ {
        Category::ALL
            .into_iter()
            .map(|c| (c, self.count(c)))
            .filter(|&(_, n)| n > 0)
    }

    /// `category:count` pairs joined by commas in the fixed order, e.g.
    /// `bank_card:2,phone:1`; empty when nothing was found. This is the `guard_flags`
    /// record column.
    pub fn flags(&self) -> String {
        let mut out = String::new();
        for (c, n) in self.iter() {
            if !out.is_empty() {
                out.push(',');
            }
            out.push_str(c.name());
            out.push(':');
            out.push_str(&n.to_string());
        }
        out
    }

    /// Add the counts of `other` (e.g. when a request is scanned field by field).
    pub fn merge(&mut self, other: &Findings) {
        for (a, b) in self.counts.iter_mut().zip(other.counts) {
            *a = a.saturating_add(b);
        }
    }

    fn add(&mut self, category: Category) {
        let n = &mut self.counts[category.index()];
        *n = n.saturating_add(1);
    }
}

/// Scan `text` for the `categories` asked for.
pub fn scan(text: &str, categories: CategorySet) -> Findings {
    scan_bytes(text.as_bytes(), categories)
}

/// [`scan`] over raw bytes (e.g. a JSON body not yet validated as UTF-8). Every pattern is
/// ASCII, so bytes of multi-byte characters simply never match and act as word boundaries.
pub fn scan_bytes(b: &[u8], categories: CategorySet) -> Findings {
    let mut found = Findings::default();
    let mask = trigger_mask(categories);
    if mask == 0 {
        return found;
    }
    let on = Enabled::from_mask(mask);
    let mut i = 0;
    let mut base = 0;
    while base < b.len() {
        let mut m = candidates(b, base, on);
        while m != 0 {
            let k = base + m.trailing_zeros() as usize;
            m &= m - 1;
            // Positions a handler already consumed (a key body, a PEM block) are skipped.
            if k >= i {
                i = dispatch(b, k, mask, categories, &mut found);
            }
        }
        // Resume after a long match (a PEM block) rather than re-examine what it covered.
        base = (base + CHUNK).max(i);
    }
    found
}

// ---------------------------------------------------------------------------------------
// Candidates and dispatch

/// Bytes examined per candidate mask.
const CHUNK: usize = 64;

/// Which trigger kinds a scan looks for.
#[derive(Clone, Copy)]
struct Enabled {
    digit: bool,
    key: bool,
    plus: bool,
    pem: bool,
    url: bool,
    esc: bool,
}

impl Enabled {
    fn from_mask(mask: u8) -> Self {
        Enabled {
            digit: mask & T_DIGIT != 0,
            key: mask & T_KEY != 0,
            plus: mask & T_PLUS != 0,
            pem: mask & T_PEM != 0,
            url: mask & T_URL != 0,
            esc: mask & T_ESC != 0,
        }
    }
}

/// Bit `k` set when `b[base + k]` may start a match: a trigger punctuation byte, or a digit
/// or a key prefix pair at a word start. Written as comparisons over a fixed-size chunk, not
/// table lookups, so that the compiler vectorises it: a byte-at-a-time loop spends most of
/// its time on mispredicted branches at word boundaries (about 3x slower on prose).
fn candidates(b: &[u8], base: usize, on: Enabled) -> u64 {
    // cur[k] is the byte before chunk byte k, cur[k + 1] the byte, cur[k + 2] the one after;
    // 0 (a boundary, never a trigger) before the text and past its end.
    let mut cur = [0u8; CHUNK + 2];
    let end = b.len().min(base + CHUNK);
    if let Some(prev) = base.checked_sub(1).and_then(|j| b.get(j)) {
        cur[0] = *prev;
    }
    cur[1..1 + end - base].copy_from_slice(&b[base..end]);
    if let Some(next) = b.get(end) {
        cur[1 + end - base] = *next;
    }
    let mut hit = [0u8; CHUNK];
    for (k, h) in hit.iter_mut().enumerate() {
        let (p, c, n) = (cur[k], cur[k + 1], cur[k + 2]);
        let word_start = !is_alnum(p);
        let punct = (on.plus & (c == b'+'))
            | (on.pem & (c == b'-'))
            | (on.url & (c == b':'))
            | (on.esc & (c == b'\\'));
        let digit = on.digit & word_start & (c.wrapping_sub(b'0') < 10);
        let key = on.key & word_start & key_pair(c, n);
        *h = u8::from(punct | digit | key);
    }
    if hit.iter().all(|&h| h == 0) {
        return 0;
    }
    // Eight 0/1 bytes to eight bits at a time (the multiply gathers byte i's bit to bit i
    // of the top byte).
    let mut m = 0u64;
    for (g, bytes) in hit.chunks_exact(8).enumerate() {
        let mut w = [0u8; 8];
        w.copy_from_slice(bytes);
        let packed = u64::from_le_bytes(w).wrapping_mul(0x0102_0408_1020_4080) >> 56;
        m |= packed << (8 * g);
    }
    m
}

fn is_alnum(c: u8) -> bool {
    (c.wrapping_sub(b'0') < 10) | ((c | 0x20).wrapping_sub(b'a') < 26)
}

/// Whether a word starting with `c1 c2` may be one of the keys in [`shapes_for`]: common
/// words (`the`, `page`) never reach the prefix comparisons.
fn key_pair(c1: u8, c2: u8) -> bool {
    ((c1 == b's') & ((c2 == b'k') | (c2 == b'h')))
        | ((c1 == b'r') & ((c2 == b'k') | (c2 == b'8')))
        | ((c1 == b'A') & ((c2 == b'K') | (c2 == b'S') | (c2 == b'I')))
        | ((c1 == b'L') & (c2 == b'T'))
        | ((c1 == b'g') & ((c2 == b'h') | (c2 == b'i') | (c2 == b'l') | (c2 == b's')))
        | ((c1 == b'h') & (c2 == b'f'))
        | ((c1 == b'x') & ((c2 == b'o') | (c2 == b'a')))
        | ((c1 == b'n') & (c2 == b'p'))
        | ((c1 == b'p') & ((c2 == b'y') | (c2 == b'p')))
        | ((c1 == b'S') & (c2 == b'G'))
        | ((c1 == b'o') & (c2 == b't'))
}

fn word_candidate(b: &[u8], j: usize, mask: u8) -> bool {
    let c = usize::from(b[j]);
    let t = CLASS[c] & mask;
    t & T_DIGIT != 0 || (t & T_KEY != 0 && key_pair(b[j], at(b, j + 1)))
}

/// Handle the candidate at `i`; returns where scanning resumes (always past `i`).
fn dispatch(b: &[u8], i: usize, mask: u8, set: CategorySet, found: &mut Findings) -> usize {
    let t = CLASS[usize::from(b[i])] & mask;
    let next = if t & T_DIGIT != 0 {
        digits(b, i, set, found)
    } else if t & T_KEY != 0 {
        key(b, i, found)
    } else if t & T_PLUS != 0 {
        plus(b, i, found)
    } else if t & T_PEM != 0 {
        pem(b, i, found)
    } else if t & T_URL != 0 {
        url(b, i, found)
    } else {
        // The token right after a JSON escape is at a word start although the byte before
        // it is a letter or hex digit, which `candidates` cannot see: dispatch it here.
        let after = escape(b, i);
        if after > i + 1 && after < b.len() && word_candidate(b, after, mask) {
            return dispatch(b, after, mask, set, found);
        }
        after
    };
    next.max(i + 1)
}

const T_DIGIT: u8 = 1;
const T_PLUS: u8 = 2;
const T_KEY: u8 = 4;
const T_PEM: u8 = 8;
const T_URL: u8 = 16;
const T_ESC: u8 = 32;
/// An ASCII letter or digit (not a trigger by itself).
const C_ALNUM: u8 = 128;

/// First bytes of the vendor key prefixes in [`shapes_for`].
const KEY_FIRST_BYTES: &[u8] = b"sArLghxnpSo";

static CLASS: [u8; 256] = build_classes();

const fn build_classes() -> [u8; 256] {
    let mut t = [0u8; 256];
    let mut c = 0u8;
    while c < 128 {
        if c.is_ascii_alphanumeric() {
            t[c as usize] = C_ALNUM;
        }
        if c.is_ascii_digit() {
            t[c as usize] |= T_DIGIT;
        }
        c += 1;
    }
    let mut k = 0;
    while k < KEY_FIRST_BYTES.len() {
        t[KEY_FIRST_BYTES[k] as usize] |= T_KEY;
        k += 1;
    }
    t[b'+' as usize] = T_PLUS;
    t[b'-' as usize] = T_PEM;
    t[b':' as usize] = T_URL;
    t[b'\\' as usize] = T_ESC;
    t
}

fn trigger_mask(set: CategorySet) -> u8 {
    let mut mask = 0;
    if set.contains(Category::BankCard)
        || set.contains(Category::CnResidentId)
        || set.contains(Category::Phone)
    {
        mask |= T_DIGIT | T_ESC;
    }
    if set.contains(Category::Phone) {
        mask |= T_PLUS;
    }
    if set.contains(Category::SecretKey) {
        mask |= T_KEY | T_ESC;
    }
    if set.contains(Category::PrivateKey) {
        mask |= T_PEM;
    }
    if set.contains(Category::PasswordInUrl) {
        mask |= T_URL;
    }
    mask
}

// ---------------------------------------------------------------------------------------
// Word boundaries

fn at(b: &[u8], i: usize) -> u8 {
    b.get(i).copied().unwrap_or(0)
}

/// Whether a token may start at `i`: the byte before is not an ASCII letter or digit, or it
/// ends a JSON escape (`\n`, `\t`, `\r`, `\b`, `\f`, `\uXXXX`).
fn starts_word(b: &[u8], i: usize) -> bool {
    let Some(p) = i.checked_sub(1).and_then(|j| b.get(j)) else {
        return true;
    };
    if !p.is_ascii_alphanumeric() {
        return true;
    }
    if i >= 2 && b[i - 2] == b'\\' && matches!(p, b'n' | b't' | b'r' | b'b' | b'f') {
        return true;
    }
    i >= 6 && b[i - 6] == b'\\' && b[i - 5] == b'u' && b[i - 4..i].iter().all(u8::is_ascii_hexdigit)
}

/// Past the ASCII letters and digits from `i`: nothing inside a word can start a match.
fn skip_word(b: &[u8], i: usize) -> usize {
    let mut j = i;
    while j < b.len() && CLASS[usize::from(b[j])] & C_ALNUM != 0 {
        j += 1;
    }
    j
}

/// A JSON escape is consumed whole so that the token after it is seen at a word start.
fn escape(b: &[u8], i: usize) -> usize {
    match at(b, i + 1) {
        b'u' if b.len() >= i + 6 && b[i + 2..i + 6].iter().all(u8::is_ascii_hexdigit) => i + 6,
        b'n' | b't' | b'r' | b'b' | b'f' | b'"' | b'\\' | b'/' => i + 2,
        _ => i + 1,
    }
}

// ---------------------------------------------------------------------------------------
// Numbers: bank cards, resident IDs, phones

/// Digit groups a number may be split into ("4111 1111 1111 1111 111" has five).
const MAX_GROUPS: usize = 5;

#[derive(Clone, Copy, Default)]
struct Group {
    start: usize,
    len: usize,
    /// Followed by an ID check character `X`.
    x: bool,
    /// Nothing glued after it (no letter or digit, not a decimal point).
    bounded: bool,
}

impl Group {
    fn end(&self) -> usize {
        self.start + self.len + usize::from(self.x)
    }
}

/// Up to [`MAX_GROUPS`] digit groups from `i`, split by one space or one dash (the same
/// separator throughout).
struct Run {
    groups: [Group; MAX_GROUPS],
    n: usize,
}

impl Run {
    fn parse(b: &[u8], i: usize) -> Run {
        let mut run = Run {
            groups: [Group::default(); MAX_GROUPS],
            n: 0,
        };
        let mut sep = 0u8;
        let mut pos = i;
        while run.n < MAX_GROUPS {
            let start = pos;
            pos += b[pos..].iter().take_while(|c| c.is_ascii_digit()).count();
            let len = pos - start;
            let mut g = Group {
                start,
                len,
                x: false,
                bounded: false,
            };
            let c = at(b, pos);
            if (c == b'X' || c == b'x') && matches!(len, 3 | 17) && ends_number(b, pos + 1) {
                g.x = true;
                g.bounded = true;
                run.groups[run.n] = g;
                run.n += 1;
                break;
            }
            g.bounded = ends_number(b, pos);
            run.groups[run.n] = g;
            run.n += 1;
            if !g.bounded || !(c == b' ' || c == b'-') || (sep != 0 && c != sep) {
                break;
            }
            if !at(b, pos + 1).is_ascii_digit() {
                break;
            }
            sep = c;
            pos += 1;
        }
        run
    }

    fn groups(&self, k: usize) -> &[Group] {
        &self.groups[..k.min(self.n)]
    }
}

fn ends_number(b: &[u8], pos: usize) -> bool {
    match at(b, pos) {
        c if c.is_ascii_alphanumeric() => false,
        b'.' => !at(b, pos + 1).is_ascii_digit(),
        _ => true,
    }
}

fn digits(b: &[u8], i: usize, set: CategorySet, found: &mut Findings) -> usize {
    let decimal_tail = i >= 2 && b[i - 1] == b'.' && b[i - 2].is_ascii_digit();
    if decimal_tail || !starts_word(b, i) {
        return skip_word(b, i);
    }
    let run = Run::parse(b, i);
    for k in (1..=run.n).rev() {
        let groups = run.groups(k);
        if let Some(category) = classify(b, groups) {
            if set.contains(category) {
                found.add(category);
            }
            return groups.last().map_or(i + 1, Group::end);
        }
    }
    skip_word(b, i)
}

/// What the digit groups form, if anything. An ID is preferred over a card (it is the more
/// specific check) and a card over a phone.
fn classify(b: &[u8], groups: &[Group]) -> Option<Category> {
    let last = groups.last()?;
    if !last.bounded {
        return None;
    }
    let total = groups.iter().fold(0usize, |a, g| a.saturating_add(g.len));
    if !(11..=19).contains(&total) {
        return None;
    }
    let mut buf = [0u8; 19];
    let mut n = 0;
    for g in groups {
        for &c in &b[g.start..g.start + g.len] {
            buf[n] = c - b'0';
            n += 1;
        }
    }
    let d = &buf[..n];
    let lens = |want: &[usize]| {
        groups.len() == want.len() && groups.iter().zip(want).all(|(g, &w)| g.len == w)
    };
    if last.x {
        let shape = groups.len() == 1 || lens(&[6, 8, 3]);
        return (shape && n == 17 && resident_id(d, 10)).then_some(Category::CnResidentId);
    }
    if groups.len() == 1 || lens(&[6, 8, 4]) {
        if let [body @ .., check] = d {
            if n == 18 && resident_id(body, *check) {
                return Some(Category::CnResidentId);
            }
        }
    }
    let card_groups = groups.len() == 1
        || (groups[0].len == 4 && groups[1..].iter().all(|g| (3..=6).contains(&g.len)));
    if card_groups && n >= 13 && bank_card(d) {
        return Some(Category::BankCard);
    }
    if (groups.len() == 1 || lens(&[3, 4, 4])) && mobile(d) {
        return Some(Category::Phone);
    }
    None
}

/// ISO 7064 MOD 11-2 weights of the 17 body digits of a resident ID.
const ID_WEIGHTS: [u32; 17] = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2];
/// Check value (10 = `X`) by weighted sum mod 11.
const ID_CHECK: [u8; 11] = [1, 0, 10, 9, 8, 7, 6, 5, 4, 3, 2];

/// GB 11643: a province code, a real birth date, and the MOD 11-2 check (`check` is 0..=10).
fn resident_id(body: &[u8], check: u8) -> bool {
    let [a, b2, _, _, _, _, y1, y2, y3, y4, m1, m2, d1, d2, ..] = *body else {
        return false;
    };
    if body.len() != 17 {
        return false;
    }
    let province = a * 10 + b2;
    if !matches!(
        province,
        11..=15 | 21..=23 | 31..=37 | 41..=46 | 50..=54 | 61..=65 | 71 | 81..=83
    ) {
        return false;
    }
    let year = u32::from(y1) * 1000 + u32::from(y2) * 100 + u32::from(y3) * 10 + u32::from(y4);
    let month = m1 * 10 + m2;
    let day = d1 * 10 + d2;
    if !(1900..=2099).contains(&year) || day == 0 || day > days_in_month(year, month) {
        return false;
    }
    let sum: u32 = body
        .iter()
        .zip(ID_WEIGHTS)
        .map(|(&d, w)| u32::from(d) * w)
        .sum();
    ID_CHECK[(sum % 11) as usize] == check
}

fn days_in_month(year: u32, month: u8) -> u8 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if (year.is_multiple_of(4) && !year.is_multiple_of(100)) || year.is_multiple_of(400) => {
            29
        }
        2 => 28,
        _ => 0,
    }
}

fn bank_card(d: &[u8]) -> bool {
    (13..=19).contains(&d.len()) && known_iin(d) && luhn(d)
}

fn luhn(d: &[u8]) -> bool {
    let sum: u32 = d
        .iter()
        .rev()
        .enumerate()
        .map(|(k, &x)| {
            let x = u32::from(x);
            if k % 2 == 1 {
                let y = x * 2;
                if y > 9 {
                    y - 9
                } else {
                    y
                }
            } else {
                x
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// Issuer ranges and lengths of the major networks: without them about one random digit
/// string in ten would pass Luhn and count as a card.
fn known_iin(d: &[u8]) -> bool {
    let prefix = |k: usize| d.iter().take(k).fold(0u32, |a, &x| a * 10 + u32::from(x));
    let (p2, p3, p4) = (prefix(2), prefix(3), prefix(4));
    let n = d.len();
    match d.first() {
        // Visa
        Some(4) => matches!(n, 13 | 16 | 19),
        // Mastercard 2-series; Mir
        Some(2) => ((2221..=2720).contains(&p4) && n == 16) || (2200..=2204).contains(&p4),
        // Amex; Diners; JCB
        Some(3) => match p2 {
            34 | 37 => n == 15,
            36 | 38 | 39 => n >= 14,
            30 => (300..=305).contains(&p3) && n >= 14,
            35 => (3528..=3589).contains(&p4) && n >= 16,
            _ => false,
        },
        // Mastercard; Maestro
        Some(5) => ((51..=55).contains(&p2) && n == 16) || matches!(p2, 50 | 56..=58),
        // UnionPay, Discover, Maestro, RuPay: mainland debit cards are mostly 62
        Some(6) => matches!(p2, 60 | 62 | 63 | 65 | 67) || (644..=649).contains(&p3),
        _ => false,
    }
}

fn mobile(d: &[u8]) -> bool {
    matches!(d, [1, 3..=9, _, _, _, _, _, _, _, _, _])
}

/// E.164: `+`, a country code, at most 15 digits in all, unseparated (at least 9 digits) or
/// in groups (`+86 138 1234 5678`, `+1-415-555-2671`; at least 10 digits, since short
/// grouped numbers after a `+` are mostly counts, as in a diff's `+200 58552`).
fn plus(b: &[u8], i: usize, found: &mut Findings) -> usize {
    if !starts_word(b, i) || !matches!(at(b, i + 1), b'1'..=b'9') {
        return i + 1;
    }
    let run = Run::parse(b, i + 1);
    for k in (1..=run.n).rev() {
        let groups = run.groups(k);
        let Some(last) = groups.last() else { continue };
        let total = groups.iter().fold(0usize, |a, g| a.saturating_add(g.len));
        let shape =
            groups.len() == 1 || (groups[0].len <= 3 && groups[1..].iter().all(|g| g.len >= 2));
        let min = if groups.len() == 1 { 9 } else { 10 };
        if last.bounded && !last.x && shape && (min..=15).contains(&total) {
            found.add(Category::Phone);
            return last.end();
        }
    }
    i + 1
}

// ---------------------------------------------------------------------------------------
// Vendor API keys

#[derive(Clone, Copy)]
enum Charset {
    /// `[A-Za-z0-9]`
    Alnum,
    /// `[A-Z0-9]`
    Upper,
    /// `[a-f0-9]`
    Hex,
    /// `[A-Za-z0-9_-]`
    Token,
    /// `[A-Za-z0-9_]`
    Word,
    /// `[A-Za-z0-9_.-]`
    Dotted,
}

impl Charset {
    fn has(self, c: u8) -> bool {
        match self {
            Charset::Alnum => c.is_ascii_alphanumeric(),
            Charset::Upper => c.is_ascii_uppercase() || c.is_ascii_digit(),
            Charset::Hex => c.is_ascii_digit() || (b'a'..=b'f').contains(&c),
            Charset::Token => c.is_ascii_alphanumeric() || c == b'_' || c == b'-',
            Charset::Word => c.is_ascii_alphanumeric() || c == b'_',
            Charset::Dotted => c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.'),
        }
    }
}

/// A vendor key: prefix, then `min..=max` bytes of `charset`.
struct Shape {
    prefix: &'static [u8],
    min: usize,
    max: usize,
    charset: Charset,
    /// The body must hold a digit and a letter: random keys do, English words joined by
    /// dashes (`sk-...` CSS classes, identifiers) do not.
    mixed: bool,
    /// A further check of the body (a checksum or an inner separator).
    check: Option<fn(&[u8]) -> bool>,
}

const fn shape(prefix: &'static [u8], min: usize, max: usize, charset: Charset) -> Shape {
    Shape {
        prefix,
        min,
        max,
        charset,
        mixed: false,
        check: None,
    }
}

const fn mixed(s: Shape) -> Shape {
    Shape { mixed: true, ..s }
}

/// OpenAI (`sk-`, `sk-proj-`, `sk-svcacct-`), Anthropic (`sk-ant-`) and the many
/// OpenAI-compatible vendors (DeepSeek, DashScope, Moonshot: `sk-` + hex or base62) share
/// one shape; Stripe live keys; Shopify.
static S_SHAPES: [Shape; 4] = [
    mixed(shape(b"sk-", 32, 256, Charset::Token)),
    shape(b"sk_live_", 20, 255, Charset::Alnum),
    shape(b"shpat_", 32, 32, Charset::Hex),
    shape(b"shpss_", 32, 32, Charset::Hex),
];
/// Stripe restricted live keys; Replicate.
static R_SHAPES: [Shape; 2] = [
    shape(b"rk_live_", 20, 255, Charset::Alnum),
    mixed(shape(b"r8_", 37, 40, Charset::Alnum)),
];
/// AWS access key ids (long-term and temporary); Google API keys; Tencent Cloud SecretId.
static A_SHAPES: [Shape; 4] = [
    shape(b"AKIA", 16, 16, Charset::Upper),
    shape(b"ASIA", 16, 16, Charset::Upper),
    shape(b"AIza", 35, 35, Charset::Token),
    mixed(shape(b"AKID", 32, 36, Charset::Alnum)),
];
/// Alibaba Cloud AccessKey ids.
static L_SHAPES: [Shape; 1] = [mixed(shape(b"LTAI", 12, 24, Charset::Alnum))];
/// GitHub tokens (classic and fine-grained); GitLab personal tokens; Groq.
static G_SHAPES: [Shape; 8] = [
    shape(b"ghp_", 36, 36, Charset::Alnum),
    shape(b"gho_", 36, 36, Charset::Alnum),
    shape(b"ghu_", 36, 36, Charset::Alnum),
    shape(b"ghs_", 36, 36, Charset::Alnum),
    shape(b"ghr_", 36, 36, Charset::Alnum),
    shape(b"github_pat_", 50, 255, Charset::Word),
    mixed(shape(b"glpat-", 20, 64, Charset::Token)),
    shape(b"gsk_", 52, 52, Charset::Alnum),
];
/// Hugging Face.
static H_SHAPES: [Shape; 1] = [mixed(shape(b"hf_", 34, 40, Charset::Alnum))];
/// Slack bot, user, app, refresh and config tokens; xAI.
static X_SHAPES: [Shape; 8] = [
    mixed(shape(b"xoxb-", 20, 255, Charset::Token)),
    mixed(shape(b"xoxp-", 20, 255, Charset::Token)),
    mixed(shape(b"xoxa-", 20, 255, Charset::Token)),
    mixed(shape(b"xoxr-", 20, 255, Charset::Token)),
    mixed(shape(b"xoxs-", 20, 255, Charset::Token)),
    mixed(shape(b"xoxe-", 20, 255, Charset::Token)),
    mixed(shape(b"xapp-", 20, 255, Charset::Token)),
    mixed(shape(b"xai-", 60, 100, Charset::Alnum)),
];
/// npm.
static N_SHAPES: [Shape; 1] = [shape(b"npm_", 36, 36, Charset::Alnum)];
/// PyPI upload tokens (a macaroon whose prefix encodes "pypi.org"); Perplexity.
static P_SHAPES: [Shape; 2] = [
    shape(b"pypi-AgEIcHlwaS5vcmc", 50, 1024, Charset::Token),
    mixed(shape(b"pplx-", 40, 64, Charset::Alnum)),
];
/// SendGrid: `SG.` + 22 + `.` + 43.
static UPPER_S_SHAPES: [Shape; 1] = [Shape {
    check: Some(sendgrid_body),
    ..shape(b"SG.", 66, 66, Charset::Dotted)
}];
/// onetoken's own keys (`ot-` + 40 base62 + 4 checksum), confirmed by their checksum.
static O_SHAPES: [Shape; 1] = [Shape {
    check: Some(onetoken_checksum),
    ..shape(b"ot-", 44, 44, Charset::Alnum)
}];

fn shapes_for(first: u8) -> &'static [Shape] {
    match first {
        b's' => &S_SHAPES,
        b'r' => &R_SHAPES,
        b'A' => &A_SHAPES,
        b'L' => &L_SHAPES,
        b'g' => &G_SHAPES,
        b'h' => &H_SHAPES,
        b'x' => &X_SHAPES,
        b'n' => &N_SHAPES,
        b'p' => &P_SHAPES,
        b'S' => &UPPER_S_SHAPES,
        b'o' => &O_SHAPES,
        _ => &[],
    }
}

fn key(b: &[u8], i: usize, found: &mut Findings) -> usize {
    if !starts_word(b, i) {
        return skip_word(b, i);
    }
    let rest = &b[i..];
    for s in shapes_for(b[i]) {
        // A byte loop: these prefixes are a few bytes, shorter than a memcmp call costs.
        if rest.len() < s.prefix.len() || rest.iter().zip(s.prefix).any(|(a, p)| a != p) {
            continue;
        }
        let tail = &rest[s.prefix.len()..];
        let len = tail
            .iter()
            .take(s.max + 1)
            .take_while(|&&c| s.charset.has(c))
            .count();
        let body = &tail[..len];
        let after = at(tail, len);
        let bounded = !(after.is_ascii_alphanumeric() || after == b'_');
        if (s.min..=s.max).contains(&len)
            && bounded
            && (!s.mixed || has_digit_and_letter(body))
            && s.check.is_none_or(|check| check(body))
        {
            found.add(Category::SecretKey);
            return i + s.prefix.len() + len;
        }
    }
    skip_word(b, i)
}

fn has_digit_and_letter(body: &[u8]) -> bool {
    body.iter().any(u8::is_ascii_digit) && body.iter().any(u8::is_ascii_alphabetic)
}

fn sendgrid_body(body: &[u8]) -> bool {
    body.get(22) == Some(&b'.') && body.iter().filter(|&&c| c == b'.').count() == 1
}

/// The onetoken key checksum: CRC-32 (zlib) of the 40 random characters, reduced mod 62^4
/// and written as 4 base62 digits (python/onetoken/kit/crypto.py).
fn onetoken_checksum(body: &[u8]) -> bool {
    const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let (random, check) = body.split_at(body.len().min(40));
    if check.len() != 4 {
        return false;
    }
    let mut n = crc32(random) % 62u32.pow(4);
    let mut want = [0u8; 4];
    for slot in want.iter_mut().rev() {
        *slot = BASE62[(n % 62) as usize];
        n /= 62;
    }
    want == check
}

/// CRC-32 (IEEE, as zlib); bitwise, since it only runs on a confirmed key shape.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

// ---------------------------------------------------------------------------------------
// PEM private keys

const PEM_BEGIN: &[u8] = b"-----BEGIN ";
const PEM_DASHES: &[u8] = b"-----";
/// How far past the header the key material must start (room for `Proc-Type` headers).
const PEM_BODY_WINDOW: usize = 512;
/// How far to look for the END line; larger than any real key (RSA-16384 is ~12 KB).
const PEM_END_WINDOW: usize = 64 * 1024;

fn pem(b: &[u8], i: usize, found: &mut Findings) -> usize {
    let rest = &b[i..];
    if !rest.starts_with(PEM_BEGIN) {
        // A line of dashes costs one visit, not one per dash.
        return i + rest.iter().take_while(|&&c| c == b'-').count();
    }
    let label_start = i + PEM_BEGIN.len();
    let label_len = b[label_start..]
        .iter()
        .take(64)
        .take_while(|&&c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == b' ')
        .count();
    let label = &b[label_start..label_start + label_len];
    let body_start = label_start + label_len;
    if !b[body_start..].starts_with(PEM_DASHES)
        || !(label.ends_with(b"PRIVATE KEY") || label.ends_with(b"PRIVATE KEY BLOCK"))
    {
        return skip_word(b, body_start);
    }
    let body_start = body_start + PEM_DASHES.len();
    let window = &b[body_start..b.len().min(body_start + PEM_BODY_WINDOW)];
    // A header alone (documentation, a question about the format) is not a key.
    if !has_base64_run(window, 40) {
        return body_start;
    }
    found.add(Category::PrivateKey);
    // Skip the body: base64 is full of digits and `+`, which must not count as numbers.
    let search = &b[body_start..b.len().min(body_start + PEM_END_WINDOW)];
    match memmem::find(search, b"-----END ") {
        Some(off) => body_start + off + 9,
        None => body_start,
    }
}

fn has_base64_run(window: &[u8], min: usize) -> bool {
    let mut run = 0;
    for &c in window {
        if c.is_ascii_alphanumeric() || matches!(c, b'+' | b'/' | b'=') {
            run += 1;
            if run >= min {
                return true;
            }
        } else {
            run = 0;
        }
    }
    false
}

// ---------------------------------------------------------------------------------------
// Passwords in URLs

/// How long a `user:password` part may be.
const USERINFO_MAX: usize = 512;

/// `scheme://user:password@host` with a non-empty, non-placeholder password.
fn url(b: &[u8], i: usize, found: &mut Findings) -> usize {
    if at(b, i + 1) != b'/' || at(b, i + 2) != b'/' {
        return i + 1;
    }
    let scheme_char = i
        .checked_sub(1)
        .and_then(|j| b.get(j))
        .is_some_and(|c| c.is_ascii_alphanumeric());
    let auth = i + 3;
    if !scheme_char {
        return auth;
    }
    let mut colon = None;
    let mut j = auth;
    let limit = b.len().min(auth + USERINFO_MAX);
    loop {
        if j >= limit {
            return auth;
        }
        match b[j] {
            b'@' => break,
            b':' => {
                colon.get_or_insert(j);
            }
            c if userinfo_byte(c) => {}
            // Not userinfo: a plain URL (its host and path are scanned as usual).
            _ => return auth,
        }
        j += 1;
    }
    let at_sign = j;
    let host_ok = {
        let c = at(b, at_sign + 1);
        c.is_ascii_alphanumeric() || c == b'['
    };
    if let Some(colon) = colon {
        let password = &b[colon + 1..at_sign];
        if host_ok && !password.is_empty() && !placeholder(password) {
            found.add(Category::PasswordInUrl);
        }
    }
    at_sign + 1
}

/// RFC 3986 userinfo characters other than `:` (unreserved, sub-delims, `%`).
fn userinfo_byte(c: u8) -> bool {
    c.is_ascii_alphanumeric()
        || matches!(
            c,
            b'-' | b'.'
                | b'_'
                | b'~'
                | b'%'
                | b'!'
                | b'$'
                | b'&'
                | b'\''
                | b'('
                | b')'
                | b'*'
                | b'+'
                | b','
                | b';'
                | b'='
        )
}

/// Documentation placeholders and template variables are not credentials: flagging every
/// `postgres://user:password@localhost` from a tutorial would make `block` mode unusable.
fn placeholder(password: &[u8]) -> bool {
    const WORDS: [&[u8]; 10] = [
        b"password",
        b"pass",
        b"passwd",
        b"pwd",
        b"secret",
        b"your_password",
        b"yourpassword",
        b"mypassword",
        b"your-password",
        b"changeme",
    ];
    let first = password.first().copied().unwrap_or(b'*');
    first == b'$'
        || (matches!(first, b'*' | b'x' | b'X' | b'.') && password.iter().all(|&c| c == first))
        || WORDS.iter().any(|w| password.eq_ignore_ascii_case(w))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use crate::xorshift::XorShift;

    fn cats(text: &str) -> String {
        scan(text, CategorySet::all()).flags()
    }

    /// How many `category` findings all categories' scan of `text` counts.
    fn count(text: &str, category: Category) -> u32 {
        scan(text, CategorySet::all()).count(category)
    }

    /// Each text's findings are exactly `flags` ("" for none).
    fn assert_flags<T: AsRef<str>>(flags: &str, texts: impl IntoIterator<Item = T>) {
        for t in texts {
            let t = t.as_ref();
            assert_eq!(cats(t), flags, "{t}");
        }
    }

    fn text_of(d: &[u8]) -> String {
        d.iter().map(|x| char::from(b'0' + x)).collect()
    }

    fn luhn_complete(mut d: Vec<u8>) -> Vec<u8> {
        d.push(0);
        for c in 0..10 {
            *d.last_mut().unwrap() = c;
            if luhn(&d) {
                return d;
            }
        }
        unreachable!()
    }

    fn id_with_check(body: &str) -> String {
        let d: Vec<u8> = body.bytes().map(|c| c - b'0').collect();
        let sum: u32 = d
            .iter()
            .zip(ID_WEIGHTS)
            .map(|(&x, w)| u32::from(x) * w)
            .sum();
        let check = ID_CHECK[(sum % 11) as usize];
        let c = if check == 10 {
            'X'
        } else {
            char::from(b'0' + check)
        };
        format!("{body}{c}")
    }

    fn onetoken_key(rng: &mut XorShift) -> String {
        const BASE62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
        let random: String = (0..40).map(|_| char::from(BASE62[rng.below(62)])).collect();
        let mut n = crc32(random.as_bytes()) % 62u32.pow(4);
        let mut check = [0u8; 4];
        for slot in check.iter_mut().rev() {
            *slot = BASE62[(n % 62) as usize];
            n /= 62;
        }
        format!("ot-{random}{}", std::str::from_utf8(&check).unwrap())
    }

    const CARDS: [&str; 8] = [
        "4111111111111111",
        "4012888888881881",
        "5555555555554444",
        "2223003122003222",
        "378282246310005",
        "6011111111111117",
        "6212345678901265",
        "3530111333300000",
    ];

    #[test]
    fn names_round_trip_and_unknown_names_are_rejected_by_name() {
        for c in Category::ALL {
            assert_eq!(c.name().parse::<Category>(), Ok(c));
            assert_eq!(c.to_string(), c.name());
        }
        let names: Vec<&str> = Category::ALL.iter().map(|c| c.name()).collect();
        assert_eq!(
            names,
            [
                "secret_key",
                "private_key",
                "password_in_url",
                "bank_card",
                "cn_resident_id",
                "phone"
            ]
        );
        assert_eq!(CategorySet::from_names(&names), Ok(CategorySet::all()));
        assert_eq!(
            CategorySet::from_names(Vec::<String>::new()),
            Ok(CategorySet::empty())
        );
        let set = CategorySet::from_names(["phone", "bank_card"]).unwrap();
        assert_eq!(set.len(), 2);
        assert_eq!(set.to_string(), "bank_card,phone");
        let err = CategorySet::from_names(["phone", "credit_card"]).unwrap_err();
        assert_eq!(err.name, "credit_card");
        assert!(err.to_string().contains("`credit_card`"), "{err}");
        assert!("Phone".parse::<Category>().is_err());
    }

    #[test]
    fn every_key_prefix_passes_the_candidate_filter() {
        for first in 0..=255u8 {
            for s in shapes_for(first) {
                let [c1, c2, ..] = *s.prefix else { panic!() };
                assert_eq!(c1, first);
                assert!(KEY_FIRST_BYTES.contains(&c1), "{:?}", s.prefix);
                assert!(key_pair(c1, c2), "{:?}", s.prefix);
            }
        }
    }

    #[test]
    fn secret_keys() {
        let keys = [
            "sk-proj-Ab3dEfGhIjKlMnOpQrStUvWxYz0123456789abcdEFGHijkl_mnop-qrstuvT3BlbkFJ",
            "sk-ant-api03-AbCdEf0123456789AbCdEf0123456789AbCdEf0123456789-abcdef_0123456789AA",
            "sk-1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d",
            "sk-AbCdEfGhIjKlMnOpQrStT3BlbkFJuVwXyZ0123456789ab",
            "AKIAIOSFODNN7EXAMPLE",
            "ASIAY34FZKBOKMUTVV7A",
            "ghp_16C7e42F292c6912E7710c838347Ae178B4a",
            "github_pat_11ABCDEFG0123456789abc_0123456789abcdefghijABCDEFGHIJ0123456789abcdefghijklmnopq",
            "AIzaSyD-9tSrke72PouQMnMX-a7eZSW0jkFMBWY",
            "xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx",
            "sk_live_4eC39HqLyjWDarjtT1zdp7dc",
            "rk_live_4eC39HqLyjWDarjtT1zdp7dc",
            "glpat-xY1z2AbCdEfGhIjKlMn3",
            "hf_AbCdEfGhIjKlMnOpQrStUvWxYz01234567",
            "npm_AbCdEfGhIjKlMnOpQrStUvWxYz0123456789",
            "LTAI5tAbCdEfGh12345678",
            "SG.abcdefghijABCDEFGHIJ12.abcdefghijABCDEFGHIJ0123456789abcdefghijABC",
        ];
        for k in keys {
            assert_flags(
                "secret_key:1",
                [
                    k.to_string(),
                    format!("my key is {k}, thanks"),
                    format!("{{\"content\":\"OPENAI_API_KEY={k}\\n\"}}"),
                    format!("\"{k}\""),
                    format!("中文{k}。"),
                    format!("line\\n{k}"),
                ],
            );
        }
        let mut rng = XorShift(7);
        for _ in 0..50 {
            let k = onetoken_key(&mut rng);
            assert_eq!(cats(&format!("Authorization: Bearer {k}")), "secret_key:1");
            // One changed character breaks the checksum.
            let mut bad = k.into_bytes();
            bad[10] = if bad[10] == b'a' { b'b' } else { b'a' };
            let bad = String::from_utf8(bad).unwrap();
            assert_eq!(cats(&bad), "", "{bad}");
        }
    }

    #[test]
    fn things_that_are_not_keys() {
        let texts = [
            "550e8400-e29b-41d4-a716-446655440000",
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "da39a3ee5e6b4b0d3255bfef95601890afd80709",
            "sk-learn is a library; sk-skeleton-loader-container-wrapper-class-name",
            "ask-AbCdEfGhIjKlMnOpQrStT3BlbkFJuVwXyZ0123456789ab",
            "AKIAIOSFODNN7EXAMPLEXX",
            "AKIA_IOSFODNN7EXAMPL",
            "ghp_short",
            "xoxb-not-a-real-token-at-all",
            "the task-runner uses sk-",
            "ot-AbCdEfGhIjKlMnOpQrStUvWxYz0123456789AbCdEfGh",
            "mask_live_4eC39HqLyjWDarjtT1zdp7dc",
        ];
        assert_flags("", texts);
    }

    #[test]
    fn private_keys() {
        let body = "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7VJTUt9Us8cKj\n\
                    MzEfYyjiWA4R4/M2bS1GB4t7NXp98C3SC6dVMvDuictGeurT8jNbvJZHtCSuYEvu\n";
        for label in [
            "PRIVATE KEY",
            "RSA PRIVATE KEY",
            "EC PRIVATE KEY",
            "OPENSSH PRIVATE KEY",
            "ENCRYPTED PRIVATE KEY",
            "PGP PRIVATE KEY BLOCK",
        ] {
            let pem = format!("-----BEGIN {label}-----\n{body}-----END {label}-----\n");
            assert_eq!(cats(&pem), "private_key:1", "{label}");
            let json = serde_json::to_string(&pem).unwrap();
            assert_eq!(cats(&json), "private_key:1", "{json}");
        }
        let two = format!(
            "-----BEGIN PRIVATE KEY-----\n{body}-----END PRIVATE KEY-----\n\
             and -----BEGIN RSA PRIVATE KEY-----\n{body}-----END RSA PRIVATE KEY-----"
        );
        assert_eq!(cats(&two), "private_key:2");
        // Headers without key material, and public material, are not private keys.
        assert_flags(
            "",
            [
                "what does -----BEGIN PRIVATE KEY----- mean?",
                &format!("-----BEGIN PUBLIC KEY-----\n{body}-----END PUBLIC KEY-----"),
                &format!("-----BEGIN CERTIFICATE-----\n{body}-----END CERTIFICATE-----"),
                "------------------------------------------",
            ],
        );
    }

    #[test]
    fn passwords_in_urls() {
        assert_flags(
            "password_in_url:1",
            [
                "postgres://app:S3cr3t!x@db.internal:5432/prod",
                "DATABASE_URL=mysql://root:hunter2@10.0.0.5/app",
                "redis://:p4ssw0rd@cache:6379/0",
                "mongodb+srv://admin:Zx%40y12@cluster0.abcde.mongodb.net/test",
                "amqp://guest:gu3st@[::1]:5672/",
                "https://user:tok3n@github.com/org/repo.git",
            ],
        );
        assert_flags(
            "",
            [
                "https://example.com/path?q=1",
                "https://example.com:8443/a@b",
                "https://medium.com/@someone",
                "postgres://user@db/prod",
                "postgres://user:@db/prod",
                "postgresql://user:password@localhost/db",
                "postgres://app:${DB_PASSWORD}@db/prod",
                "postgres://app:$DB_PASSWORD@db/prod",
                "postgres://app:****@db/prod",
                "mailto:someone@example.com",
                "://u:p@h",
                "a ://u:p@h",
            ],
        );
    }

    #[test]
    fn bank_cards() {
        for c in CARDS {
            let spaced: String = c
                .as_bytes()
                .chunks(4)
                .map(|g| std::str::from_utf8(g).unwrap())
                .collect::<Vec<_>>()
                .join(" ");
            let dashed = spaced.replace(' ', "-");
            assert_flags(
                "bank_card:1",
                [
                    c.to_string(),
                    format!("card: {c}."),
                    format!("卡号{c}，谢谢"),
                    spaced.clone(),
                    format!("pay with {dashed} today"),
                ],
            );
        }
        assert_eq!(cats("3782 822463 10005"), "bank_card:1");
        assert_eq!(
            cats("4111111111111111 and 5555 5555 5555 4444"),
            "bank_card:2"
        );
        // Luhn-invalid, unknown ranges, glued to letters, decimals, mixed separators.
        assert_flags(
            "",
            [
                "4111111111111112",
                "9111111111111117",
                "1111111111111117",
                "x4111111111111111",
                "4111111111111111abc",
                "0.4111111111111111",
                "4111111111111111.5",
                "4111 1111-1111 1111",
                "4111  1111 1111 1111",
                "41111111111111111111",
            ],
        );
    }

    #[test]
    fn random_digit_strings_failing_luhn_are_not_cards() {
        let mut rng = XorShift(0x5eed);
        for _ in 0..20_000 {
            let n = 13 + rng.below(7);
            let mut d = rng.digits(n);
            if luhn(&d) {
                let last = d.len() - 1;
                d[last] = (d[last] + 1) % 10;
            }
            let t = text_of(&d);
            assert_eq!(count(&t, Category::BankCard), 0, "{t}");
        }
    }

    #[test]
    fn generated_cards_are_found() {
        let mut rng = XorShift(42);
        for _ in 0..2_000 {
            let (prefix, n): (&[u8], usize) = match rng.below(4) {
                0 => (&[4], 16),
                1 => (&[5, 1 + rng.below(5) as u8], 16),
                2 => (&[6, 2], 16 + rng.below(4)),
                _ => (&[3, 7], 15),
            };
            let mut d = prefix.to_vec();
            d.extend(rng.digits(n - 1 - prefix.len()));
            let d = luhn_complete(d);
            let t = format!("no. {} ok", text_of(&d));
            let f = scan(&t, CategorySet::only(Category::BankCard));
            assert_eq!(f.count(Category::BankCard), 1, "{t}");
        }
    }

    #[test]
    fn resident_ids() {
        let ids = [
            id_with_check("11010519491231002"),
            id_with_check("44030420000229123"),
            id_with_check("31011519900307001"),
            "11010519491231002X".to_string(),
        ];
        assert!(ids.iter().any(|id| id.ends_with('X')));
        for id in &ids {
            let spaced = format!("{} {} {}", &id[..6], &id[6..14], &id[14..]);
            assert_flags(
                "cn_resident_id:1",
                [
                    id.clone(),
                    id.to_lowercase(),
                    format!("身份证号：{id}。"),
                    format!("id={id}&x=1"),
                    spaced,
                ],
            );
        }
        // Wrong check digit, impossible dates, unknown province, glued digits.
        let good = id_with_check("11010519491231002");
        let mut wrong = good.clone().into_bytes();
        wrong[17] = if wrong[17] == b'0' { b'1' } else { b'0' };
        let wrong = String::from_utf8(wrong).unwrap();
        for t in [
            wrong,
            id_with_check("11010519490230002"),
            id_with_check("11010518991231002"),
            id_with_check("11010519491301002"),
            id_with_check("91010519491231002"),
            id_with_check("01010519491231002"),
            format!("{good}7"),
            format!("7{good}"),
            format!("{}Xa", &good[..17]),
        ] {
            assert_eq!(count(&t, Category::CnResidentId), 0, "{t}");
        }
    }

    #[test]
    fn wrong_checksums_are_never_ids() {
        let mut rng = XorShift(99);
        for _ in 0..5_000 {
            let mut body = vec![1, 1];
            body.extend(rng.digits(15));
            let t = text_of(&body);
            let good = id_with_check(&t);
            let good_check = good.as_bytes()[17];
            for c in b"0123456789X" {
                if *c != good_check {
                    let candidate = format!("{t}{}", char::from(*c));
                    let f = scan(&candidate, CategorySet::only(Category::CnResidentId));
                    assert!(f.is_empty(), "{candidate}");
                }
            }
        }
    }

    #[test]
    fn phones() {
        assert_flags(
            "phone:1",
            [
                "13812345678",
                "call 13812345678 now",
                "手机：13912345678，",
                "\\u624b\\u673a13812345678",
                "138 1234 5678",
                "138-1234-5678",
                "+8613812345678",
                "+86 138 1234 5678",
                "+86 13812345678",
                "+1-415-555-2671",
                "+1 415 555 2671",
                "+442079460958",
                "(+44 20 7946 0958)",
            ],
        );
        assert_flags(
            "",
            [
                "12812345678",
                "138123456789",
                "913812345678",
                "a13812345678",
                "13812345678b",
                "0.13812345678",
                "+1234567",
                "+12345678",
                "the +200 58552 lines",
                "+2024-01-01",
                "+0123456789",
                "+1234567890123456",
                "2024-01-01 12:30:45",
                "v1.2.3-13",
            ],
        );
        assert_eq!(cats("13812345678 13912345678,15012345678"), "phone:3");
    }

    #[test]
    fn counts_and_flags_in_fixed_order() {
        let text = format!(
            "call +86 13812345678 or 15012345678; card 4111111111111111 and {}; \
             id {}; key AKIAIOSFODNN7EXAMPLE; db postgres://a:b1@h/x",
            CARDS[2],
            id_with_check("11010519491231002"),
        );
        let f = scan(&text, CategorySet::all());
        assert_eq!(f.count(Category::Phone), 2);
        assert_eq!(f.count(Category::BankCard), 2);
        assert_eq!(f.total(), 7);
        assert_eq!(
            f.flags(),
            "secret_key:1,password_in_url:1,bank_card:2,cn_resident_id:1,phone:2"
        );
        assert_eq!(
            f.categories().to_string(),
            "secret_key,password_in_url,bank_card,cn_resident_id,phone"
        );
        // Only the categories asked for are reported.
        let only = CategorySet::from_names(["bank_card", "phone"]).unwrap();
        assert_eq!(scan(&text, only).flags(), "bank_card:2,phone:2");
        assert!(scan(&text, CategorySet::empty()).is_empty());
        assert_eq!(Findings::default().flags(), "");
        let mut merged = f;
        merged.merge(&f);
        assert_eq!(merged.count(Category::BankCard), 4);
    }

    #[test]
    fn findings_never_hold_the_matched_text() {
        let secret = "sk-CANARY0123456789abcdefCANARYabcdef0123";
        let text = format!("{secret} 4111111111111111 13812345678");
        let f = scan(&text, CategorySet::all());
        assert_eq!(f.flags(), "secret_key:1,bank_card:1,phone:1");
        let shown = format!("{f:?} {} {}", f.flags(), f.categories());
        for needle in ["CANARY", "4111", "1381"] {
            assert!(!shown.contains(needle), "{shown}");
        }
        assert_eq!(std::mem::size_of::<Findings>(), 24);
    }

    #[test]
    fn clean_random_text_has_no_findings() {
        const WORDS: [&str; 16] = [
            "the", "model", "should", "return", "a", "short", "answer", "请", "回答", "问题",
            "rust", "skip", "Alpha", "LTAI", "gh", "xox",
        ];
        let mut rng = XorShift(1);
        for _ in 0..2_000 {
            let mut s = String::new();
            for _ in 0..rng.below(200) {
                s.push_str(WORDS[rng.below(WORDS.len())]);
                s.push_str([" ", ", ", ". ", "\n", "-", ":", "://", "+"][rng.below(8)]);
                if rng.below(8) == 0 {
                    // Short numbers: years, counts, versions.
                    s.push_str(&rng.below(10_000).to_string());
                }
            }
            assert!(scan(&s, CategorySet::all()).is_empty(), "{s}");
        }
    }

    #[test]
    fn planted_values_are_counted_exactly() {
        let mut rng = XorShift(2024);
        let fillers = [
            "hello ",
            "世界 ",
            "résumé ",
            "\n",
            "x = 1; ",
            "🙂 ",
            "see: ",
        ];
        for _ in 0..2_000 {
            let mut s = String::new();
            let mut want = Findings::default();
            for _ in 0..rng.below(20) {
                s.push_str(fillers[rng.below(fillers.len())]);
                let (value, cat) = match rng.below(6) {
                    0 => (
                        CARDS[rng.below(CARDS.len())].to_string(),
                        Category::BankCard,
                    ),
                    1 => (id_with_check("44030420000229123"), Category::CnResidentId),
                    2 => (
                        format!("1{}{}", 3 + rng.below(7), text_of(&rng.digits(9))),
                        Category::Phone,
                    ),
                    3 => (onetoken_key(&mut rng), Category::SecretKey),
                    4 => (
                        "postgres://u:Pw1x@db/app".to_string(),
                        Category::PasswordInUrl,
                    ),
                    _ => ("AKIAIOSFODNN7EXAMPLE".to_string(), Category::SecretKey),
                };
                s.push_str(&value);
                s.push(' ');
                want.add(cat);
            }
            assert_eq!(scan(&s, CategorySet::all()), want, "{s}");
        }
    }

    #[test]
    fn never_panics_on_arbitrary_input() {
        let mut rng = XorShift(0xdead_beef);
        let pieces = [
            "sk-",
            "AKIA",
            "-----BEGIN PRIVATE KEY-----",
            "-----END ",
            "://",
            ":",
            "@",
            "+",
            "+8",
            "\\u",
            "\\u12",
            "\\",
            "X",
            "x",
            " ",
            "-",
            ".",
            "é",
            "中",
            "🙂",
            "4111",
            "1381",
            "ot-",
            "SG.",
            "github_pat_",
            "xoxb-",
            "\u{0}",
            "\u{7f}",
        ];
        for _ in 0..1_000 {
            let mut s = String::new();
            for _ in 0..rng.below(60) {
                match rng.below(3) {
                    0 => s.push_str(pieces[rng.below(pieces.len())]),
                    1 => s.push(char::from(b'0' + rng.below(10) as u8)),
                    _ => {
                        if let Some(c) = char::from_u32(rng.below(0x11_0000) as u32) {
                            s.push(c);
                        }
                    }
                }
            }
            scan(&s, CategorySet::all());
            // Every prefix and suffix at a char boundary, and each category alone.
            for (k, _) in s.char_indices() {
                scan(&s[..k], CategorySet::all());
                scan(&s[k..], CategorySet::all());
            }
            for c in Category::ALL {
                scan(&s, CategorySet::only(c));
            }
        }
        for _ in 0..5_000 {
            let bytes: Vec<u8> = (0..rng.below(100)).map(|_| rng.next_u64() as u8).collect();
            scan_bytes(&bytes, CategorySet::all());
            scan(&String::from_utf8_lossy(&bytes), CategorySet::all());
        }
    }
}
