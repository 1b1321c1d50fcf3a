//! Sensitive-content guard on arbitrary bytes: never panics, the text and byte entry
//! points agree, and what is found does not depend on where the text falls relative to
//! the scanner's 64-byte blocks.

use onetoken_gateway::guard::{scan, scan_bytes, CategorySet};

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let all = CategorySet::all();
        let found = scan_bytes(data, all);
        if let Ok(text) = std::str::from_utf8(data) {
            assert_eq!(scan(text, all), found);
        }
        let mut shifted = vec![b' '; 1 + data.first().map_or(0, |b| usize::from(b % 64))];
        shifted.extend_from_slice(data);
        assert_eq!(
            scan_bytes(&shifted, all),
            found,
            "depends on block alignment"
        );
    });
}
