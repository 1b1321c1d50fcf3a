//! Properties of the token counter on generated text: it never panics, and its count is
//! the one tiktoken's own o200k_base encoder (`encode_ordinary`) gives, on arbitrary
//! Unicode and on text shaped like prompts (words, numbers, code, CJK, whitespace runs).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::LazyLock;

use onetoken_gateway::tokens;
use proptest::prelude::*;
use tiktoken_rs::CoreBPE;

static REFERENCE: LazyLock<CoreBPE> = LazyLock::new(|| tiktoken_rs::o200k_base().unwrap());

fn reference(text: &str) -> usize {
    REFERENCE.encode_ordinary(text).len()
}

/// Text built from the pieces the o200k pattern tells apart: words in every case, runs of
/// digits, contractions, punctuation, whitespace runs and line ends, CJK, accents, emoji.
fn prompt_text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        "[a-z]{1,12}",
        "[A-Z][a-z]{0,8}",
        "[A-Z]{2,6}",
        "[0-9]{1,9}",
        "'(s|t|re|ve|m|ll|d|S|T)",
        "[ ]{1,4}",
        "[\t\n\r]{1,3}",
        "[!-/:-@\\[-`{-~]{1,4}",
        "[\u{4e00}-\u{9fa5}]{1,8}",
        "[\u{3040}-\u{30ff}]{1,6}",
        "[àéîõüçñ]{1,3}",
        "[\u{1F600}-\u{1F64F}]",
        "[\u{0300}-\u{036F}]",
    ];
    prop::collection::vec(piece, 0..40).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn count_equals_tiktoken_on_prompt_shaped_text(text in prompt_text()) {
        prop_assert_eq!(tokens::count(&text), reference(&text), "{:?}", text);
    }

    #[test]
    fn count_equals_tiktoken_on_arbitrary_unicode(text in any::<String>()) {
        prop_assert_eq!(tokens::count(&text), reference(&text), "{:?}", text);
    }

    #[test]
    fn count_is_bounded_by_the_bytes(text in prompt_text()) {
        let n = tokens::count(&text);
        // Every byte is a token at worst, and any text is at least one token.
        prop_assert!(n <= text.len());
        prop_assert_eq!(n == 0, text.is_empty());
    }

    #[test]
    fn lossy_text_from_arbitrary_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let text = String::from_utf8_lossy(&bytes);
        prop_assert_eq!(tokens::count(&text), reference(&text));
    }
}
