//! Properties of the sensitive-content guard on generated text: standalone digit strings
//! are classified exactly as a plain reference implementation of the rules (GB 11643
//! resident IDs, Luhn plus issuer ranges for cards, mainland mobile numbers) classifies
//! them; planted values are counted exactly, also inside JSON strings with every escape a
//! client may send; results do not depend on where the text falls in the scanner's blocks;
//! and arbitrary bytes or text never panic.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use onetoken_gateway::guard::{scan, scan_bytes, Category, CategorySet};
use proptest::prelude::*;

// ---------------------------------------------------------------------------------------
// Reference rules, written from the standards rather than from the scanner.

fn reference_id(d: &[u8], check: u8) -> bool {
    if d.len() != 17 {
        return false;
    }
    let num = |r: std::ops::Range<usize>| d[r].iter().fold(0u32, |a, &x| a * 10 + u32::from(x));
    let provinces = [
        11, 12, 13, 14, 15, 21, 22, 23, 31, 32, 33, 34, 35, 36, 37, 41, 42, 43, 44, 45, 46, 50, 51,
        52, 53, 54, 61, 62, 63, 64, 65, 71, 81, 82, 83,
    ];
    let (year, month, day) = (num(6..10), num(10..12), num(12..14));
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let month_days = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    let date_ok = (1900..=2099).contains(&year)
        && (1..=12).contains(&month)
        && (1..=month_days[month as usize - 1]).contains(&day);
    // ISO 7064 MOD 11-2: weight of position i (from the left) is 2^(17-i) mod 11.
    let sum: u32 = d
        .iter()
        .enumerate()
        .map(|(i, &x)| u32::from(x) * (1u32 << (17 - i)) % 11)
        .sum();
    let want = (12 - sum % 11) % 11;
    provinces.contains(&num(0..2)) && date_ok && u32::from(check) == want
}

fn reference_luhn(d: &[u8]) -> bool {
    let doubled = [0, 2, 4, 6, 8, 1, 3, 5, 7, 9];
    let sum: usize = d
        .iter()
        .rev()
        .enumerate()
        .map(|(k, &x)| {
            if k % 2 == 1 {
                doubled[usize::from(x)]
            } else {
                usize::from(x)
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

fn reference_issuer(d: &[u8]) -> bool {
    let s: String = d.iter().map(|x| char::from(b'0' + x)).collect();
    let p = |k: usize| s[..k].parse::<u32>().unwrap();
    let n = s.len();
    match d[0] {
        4 => [13, 16, 19].contains(&n),
        2 => ((2221..=2720).contains(&p(4)) && n == 16) || (2200..=2204).contains(&p(4)),
        3 => match p(2) {
            34 | 37 => n == 15,
            36 | 38 | 39 => n >= 14,
            30 => (300..=305).contains(&p(3)) && n >= 14,
            35 => (3528..=3589).contains(&p(4)) && n >= 16,
            _ => false,
        },
        5 => ((51..=55).contains(&p(2)) && n == 16) || [50, 56, 57, 58].contains(&p(2)),
        6 => [60, 62, 63, 65, 67].contains(&p(2)) || (644..=649).contains(&p(3)),
        _ => false,
    }
}

/// What a standalone token of digits (and a final `X`) is, by the reference rules.
fn reference_digits(token: &str) -> Option<Category> {
    let x = token.ends_with('X');
    let d: Vec<u8> = token
        .bytes()
        .filter(u8::is_ascii_digit)
        .map(|c| c - b'0')
        .collect();
    if x {
        return reference_id(&d, 10).then_some(Category::CnResidentId);
    }
    if d.len() == 18 && reference_id(&d[..17], d[17]) {
        return Some(Category::CnResidentId);
    }
    if (13..=19).contains(&d.len()) && reference_issuer(&d) && reference_luhn(&d) {
        return Some(Category::BankCard);
    }
    if d.len() == 11 && d[0] == 1 && d[1] >= 3 {
        return Some(Category::Phone);
    }
    None
}

// ---------------------------------------------------------------------------------------
// Generators

fn digit_text(d: &[u8]) -> String {
    d.iter().map(|x| char::from(b'0' + x)).collect()
}

/// A digit token that is often valid: random digits, a card completed to pass Luhn, an ID
/// with a real date and its check character, or a mobile number.
fn digit_token() -> impl Strategy<Value = String> {
    let random = prop::collection::vec(0u8..10, 10..21).prop_map(|d| digit_text(&d));
    let card = (
        prop::sample::select(vec![
            "4", "51", "55", "2221", "34", "37", "6011", "62", "3530", "36",
        ]),
        12usize..19,
        prop::collection::vec(0u8..10, 19),
    )
        .prop_map(|(iin, n, rest)| {
            let mut d: Vec<u8> = iin.bytes().map(|c| c - b'0').collect();
            d.extend(&rest[..n.saturating_sub(d.len())]);
            let check = (0..10).find(|&c| {
                let mut full = d.clone();
                full.push(c);
                reference_luhn(&full)
            });
            d.push(check.unwrap());
            digit_text(&d)
        });
    let id = (
        prop::sample::select(vec![11u8, 31, 44, 65, 81, 19, 99]),
        prop::collection::vec(0u8..10, 4),
        1900u32..2100,
        1u32..13,
        1u32..32,
        prop::collection::vec(0u8..10, 3),
    )
        .prop_map(|(province, area, year, month, day, seq)| {
            let mut body = format!(
                "{province:02}{}{year:04}{month:02}{day:02}",
                digit_text(&area)
            );
            body.push_str(&digit_text(&seq));
            let d: Vec<u8> = body.bytes().map(|c| c - b'0').collect();
            let check = (0..=10u8).find(|&c| reference_id(&d, c)).unwrap_or(0);
            body.push(if check == 10 {
                'X'
            } else {
                char::from(b'0' + check)
            });
            body
        });
    let phone = (3u8..10, prop::collection::vec(0u8..10, 9))
        .prop_map(|(second, rest)| format!("1{second}{}", digit_text(&rest)));
    prop_oneof![random, card, id, phone]
}

/// Filler between tokens: words, CJK, emoji and punctuation that never form a finding.
fn filler() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![
        " and ",
        " the ",
        ", then ",
        ".\nSee ",
        " 请 ",
        "，号码 ",
        " 🙂 ",
        " résumé ",
        "\t(x) ",
        " \"quoted\" ",
        " a\\b ",
    ])
}

/// Values that are findings in any context used here, with their category.
/// Filler and planted values, in turn, as one text.
fn joined(items: &[(&str, Option<(String, Category)>)]) -> String {
    items
        .iter()
        .map(|(f, p)| format!("{f}{}", p.as_ref().map_or("", |(v, _)| v.as_str())))
        .collect()
}

fn planted() -> impl Strategy<Value = (String, Category)> {
    let fixed = prop::sample::select(vec![
        ("AKIAIOSFODNN7EXAMPLE", Category::SecretKey),
        ("ghp_16C7e42F292c6912E7710c838347Ae178B4a", Category::SecretKey),
        ("sk_live_4eC39HqLyjWDarjtT1zdp7dc", Category::SecretKey),
        ("postgres://app:S3cr3t!x@db.internal:5432/prod", Category::PasswordInUrl),
        ("+86 138 1234 5678", Category::Phone),
        ("4111 1111 1111 1111", Category::BankCard),
        (
            "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7VJTUt9Us8cKj\n-----END PRIVATE KEY-----",
            Category::PrivateKey,
        ),
    ]);
    let digits =
        digit_token().prop_filter_map("not a finding", |t| reference_digits(&t).map(|c| (t, c)));
    prop_oneof![fixed.prop_map(|(s, c)| (s.to_owned(), c)), digits]
}

/// `text` as a JSON string with every non-ASCII character `\u`-escaped (as clients that
/// default to ASCII output send it), so the scanner must see through escapes.
fn json_ascii(text: &str) -> String {
    let mut out = String::from("\"");
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if c.is_ascii() && !c.is_ascii_control() => out.push(c),
            c => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{u:04x}"));
                }
            }
        }
    }
    out.push('"');
    out
}

fn counts(text: &str) -> Vec<(Category, u32)> {
    scan(text, CategorySet::all()).iter().collect()
}

fn tally(cats: impl IntoIterator<Item = Category>) -> Vec<(Category, u32)> {
    let mut n = [0u32; 6];
    for c in cats {
        n[Category::ALL.iter().position(|&k| k == c).unwrap()] += 1;
    }
    Category::ALL
        .into_iter()
        .zip(n)
        .filter(|&(_, k)| k > 0)
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn digit_tokens_are_classified_as_the_reference_does(
        items in prop::collection::vec((filler(), digit_token()), 1..12),
    ) {
        let mut text = String::new();
        let mut want = Vec::new();
        for (fill, token) in &items {
            text.push_str(fill);
            text.push_str(token);
            want.extend(reference_digits(token));
        }
        text.push('.');
        prop_assert_eq!(counts(&text), tally(want), "{}", text);
    }

    #[test]
    fn planted_values_are_counted_exactly_raw_and_in_json(
        items in prop::collection::vec((filler(), proptest::option::of(planted())), 0..12),
    ) {
        let mut text = String::new();
        let mut want = Vec::new();
        for (fill, plant) in &items {
            text.push_str(fill);
            if let Some((value, category)) = plant {
                text.push_str(value);
                want.push(*category);
            }
        }
        text.push(' ');
        let want = tally(want);
        prop_assert_eq!(&counts(&text), &want, "{}", text);
        let json = serde_json::to_string(&text).unwrap();
        prop_assert_eq!(&counts(&json), &want, "{}", json);
        let ascii = json_ascii(&text);
        prop_assert_eq!(&counts(&ascii), &want, "{}", ascii);
    }

    #[test]
    fn findings_do_not_depend_on_block_alignment(
        items in prop::collection::vec((filler(), proptest::option::of(planted())), 0..8),
        pad in 0usize..130,
    ) {
        let text = joined(&items);
        let found = scan(&text, CategorySet::all());
        let shifted = format!("{}{text}", " ".repeat(pad));
        prop_assert_eq!(scan(&shifted, CategorySet::all()), found);
        let padded = format!("{text}{}", " ".repeat(pad));
        prop_assert_eq!(scan(&padded, CategorySet::all()), found);
    }

    #[test]
    fn a_category_subset_finds_the_subset_of_findings(
        items in prop::collection::vec((filler(), proptest::option::of(planted())), 0..8),
        mask in 0u8..64,
    ) {
        let text = joined(&items);
        let set = CategorySet::from_bits(mask);
        let all = scan(&text, CategorySet::all());
        let some = scan(&text, set);
        for c in Category::ALL {
            let want = if set.contains(c) { all.count(c) } else { 0 };
            prop_assert_eq!(some.count(c), want, "{:?}", c);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_text_equals_bytes(
        bytes in prop::collection::vec(any::<u8>(), 0..512),
        text in any::<String>(),
    ) {
        let _ = scan_bytes(&bytes, CategorySet::all());
        prop_assert_eq!(scan(&text, CategorySet::all()), scan_bytes(text.as_bytes(), CategorySet::all()));
    }
}
