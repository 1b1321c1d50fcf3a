//! Billing math: exact integers, ceil, reserve/settle under concurrency.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use onetoken_gateway::billing::{cost, reserve_amount, usage_cost, OrgAccount, Prices, Usage};

#[test]
fn cost_rounds_up_per_part() {
    assert_eq!(cost(0, 500_000_000), 0);
    assert_eq!(cost(1, 1), 1, "any fraction of a nano-unit rounds up");
    assert_eq!(cost(1_000_000, 1), 1);
    assert_eq!(cost(1_000_001, 1), 2);
    assert_eq!(cost(7, 500_000_000), 3500);
    let p = Prices {
        input: 3,
        output: 7,
        cached_input: 1,
    };
    // input: 90 uncached * 3 / 1e6 -> 1; cached: 10 * 1 -> 1; output: 5 * 7 -> 1.
    assert_eq!(
        usage_cost(
            Usage {
                prompt: 100,
                completion: 5,
                cached: 10
            },
            p
        ),
        3
    );
    assert_eq!(
        usage_cost(
            Usage {
                prompt: 5,
                completion: 0,
                cached: 50
            },
            p
        ),
        1,
        "cached is capped at prompt"
    );
}

#[test]
fn cost_uses_i128_and_saturates() {
    // u64::MAX tokens at a large price overflows i64 in the product but not in i128.
    assert_eq!(cost(u64::MAX, i64::MAX), i64::MAX);
    let big = cost(10_000_000_000, 1_000_000_000_000);
    assert_eq!(big, 10_000_000_000_000_000);
}

#[test]
fn reserve_is_prompt_at_input_plus_max_output() {
    let p = Prices {
        input: 500_000_000,
        output: 1_500_000_000,
        cached_input: 0,
    };
    assert_eq!(reserve_amount(10, 100, p), 5000 + 150_000);
}

#[test]
fn reserve_and_settle_with_spent_mark() {
    let a = OrgAccount::default();
    assert!(a.try_reserve(100, 0, 60));
    assert!(!a.try_reserve(100, 0, 41), "60 held, 40 left");
    assert!(a.try_reserve(100, 0, 40));
    a.settle(60, 10);
    assert_eq!(a.totals(), (10, 40));
    a.settle(40, 40);
    assert_eq!(a.totals(), (50, 0));
    // Balance 100 already reflects spend up to mark 50: all 100 are available again.
    assert!(!a.try_reserve(100, 0, 51));
    assert!(a.try_reserve(100, 50, 100));
    assert!(!a.try_reserve(100, 50, 1));
}

#[test]
fn concurrent_reserves_never_exceed_the_balance() {
    let account = Arc::new(OrgAccount::default());
    let balance = 10_000;
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let a = account.clone();
            std::thread::spawn(move || (0..5_000).filter(|_| a.try_reserve(balance, 0, 7)).count())
        })
        .collect();
    let granted: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(granted, (balance / 7) as usize);
    assert!(account.totals().1 <= balance);
}
