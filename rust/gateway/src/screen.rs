//! The org's sensitive-content guard applied to a parsed request: every string value of
//! the request document is scanned in memory (message text, system prompts, content
//! parts, tool arguments, embedding input, whatever the client protocol calls them), and
//! only categories and counts come out.

use std::sync::OnceLock;

use serde_json::{Map, Value};

use crate::guard::{self, Category, CategorySet, Findings};
use crate::snapshot::GuardMode;

/// An org's compiled guard setting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct OrgGuard {
    pub(crate) mode: GuardMode,
    pub(crate) categories: CategorySet,
}

/// What the guard decided for one request.
pub(crate) enum Verdict {
    /// Nothing to do (guard off, or nothing found).
    Pass,
    /// Forward, and keep these findings on the record.
    Flag(Findings),
    /// Refuse with this message (it names the categories found, nothing else).
    Block(&'static str),
}

impl OrgGuard {
    /// Scan `doc` under this setting. Costs one branch when the guard is off.
    pub(crate) fn check(&self, doc: &Map<String, Value>) -> Verdict {
        if self.mode == GuardMode::Off || self.categories.is_empty() {
            return Verdict::Pass;
        }
        let mut findings = Findings::default();
        for v in doc.values() {
            scan_value(v, self.categories, &mut findings);
        }
        if findings.is_empty() {
            return Verdict::Pass;
        }
        match self.mode {
            GuardMode::Block => Verdict::Block(block_message(findings.categories())),
            GuardMode::Flag | GuardMode::Off => Verdict::Flag(findings),
        }
    }
}

/// Strings are scanned; numbers, booleans and object keys are not content.
fn scan_value(v: &Value, categories: CategorySet, out: &mut Findings) {
    match v {
        Value::String(s) => out.merge(&guard::scan(s, categories)),
        Value::Array(items) => items.iter().for_each(|i| scan_value(i, categories, out)),
        Value::Object(map) => map.values().for_each(|i| scan_value(i, categories, out)),
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
}

/// The block message for a set of categories: one fixed text per subset, built once.
fn block_message(found: CategorySet) -> &'static str {
    static TABLE: OnceLock<Vec<String>> = OnceLock::new();
    let table = TABLE.get_or_init(|| {
        (0..1u8 << Category::ALL.len())
            .map(|mask| {
                let set = CategorySet::from_bits(mask);
                format!(
                    "The request was blocked by the organization's sensitive-content policy \
                     (categories: {set})."
                )
            })
            .collect()
    });
    let index = Category::ALL
        .into_iter()
        .enumerate()
        .filter(|(_, c)| found.contains(*c))
        .fold(0usize, |m, (i, _)| m | 1 << i);
    table.get(index).map_or(
        "The request was blocked by the organization's sensitive-content policy.",
        String::as_str,
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    const CARD: &str = "4111 1111 1111 1111";

    fn doc(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => panic!("not an object"),
        }
    }

    #[test]
    fn off_flag_block() {
        let d = doc(serde_json::json!({
            "model": "m", "max_tokens": 4111111111111111u64,
            "messages": [{"role": "user", "content": [{"type": "text", "text": format!("card {CARD}")}]}]
        }));
        let all = CategorySet::all();
        let off = OrgGuard {
            mode: GuardMode::Off,
            categories: all,
        };
        assert!(matches!(off.check(&d), Verdict::Pass));
        let flag = OrgGuard {
            mode: GuardMode::Flag,
            categories: all,
        };
        match flag.check(&d) {
            // The number-valued field is not content: one card, from the text.
            Verdict::Flag(f) => assert_eq!(f.flags(), "bank_card:1"),
            _ => panic!("expected a flag"),
        }
        let block = OrgGuard {
            mode: GuardMode::Block,
            categories: all,
        };
        match block.check(&d) {
            Verdict::Block(m) => {
                assert!(m.contains("(categories: bank_card)"), "{m}");
                assert!(!m.contains("4111"));
            }
            _ => panic!("expected a block"),
        }
        let phones_only = OrgGuard {
            mode: GuardMode::Block,
            categories: CategorySet::only(Category::Phone),
        };
        assert!(matches!(phones_only.check(&d), Verdict::Pass));
    }

    #[test]
    fn every_subset_has_its_message() {
        let both = CategorySet::only(Category::Phone).with(Category::SecretKey);
        assert!(block_message(both).ends_with("(categories: secret_key,phone)."));
        assert!(block_message(CategorySet::all()).contains("cn_resident_id"));
    }
}
