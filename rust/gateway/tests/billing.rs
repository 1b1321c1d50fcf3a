//! Billing math: exact integers, ceil, reserve/settle under concurrency.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use onetoken_gateway::billing::{
    cost, reserve_amount, units_cost_at, usage_cost, OrgAccount, Prices, UnitPrices, Units, Usage,
    PPM_ONE,
};

#[test]
fn unit_costs_are_exact_per_unit_and_round_up_once_per_part() {
    let prices = UnitPrices {
        image: 40_000_000,
        audio_second: 100_000,
        character: 15_000_000_000,
        search_unit: 2_000_000,
    };
    let units = |images, audio_ms, characters, search_units| Units {
        images,
        audio_ms,
        characters,
        search_units,
    };
    assert_eq!(units_cost_at(Units::default(), prices, PPM_ONE), 0);
    assert_eq!(units_cost_at(units(3, 0, 0, 0), prices, PPM_ONE), 120_000_000);
    assert_eq!(units_cost_at(units(0, 0, 0, 7), prices, PPM_ONE), 14_000_000);
    // 1.5 s at 100_000 per second; one millisecond is 100 nano-units.
    assert_eq!(units_cost_at(units(0, 1_500, 0, 0), prices, PPM_ONE), 150_000);
    assert_eq!(units_cost_at(units(0, 1, 0, 0), prices, PPM_ONE), 100);
    // 15 per character (per million: 15e9); one character more than a whole number of
    // nano-units still rounds up.
    assert_eq!(units_cost_at(units(0, 0, 1_000, 0), prices, PPM_ONE), 15_000_000);
    let cheap = UnitPrices {
        audio_second: 1,
        ..UnitPrices::default()
    };
    assert_eq!(units_cost_at(units(0, 1, 0, 0), cheap, PPM_ONE), 1);
    // A 10% discount applies to each part, rounded up once.
    assert_eq!(units_cost_at(units(3, 0, 0, 0), prices, 900_000), 108_000_000);
    let odd = UnitPrices {
        image: 3,
        ..UnitPrices::default()
    };
    assert_eq!(units_cost_at(units(1, 0, 0, 0), odd, 500_000), 2);
    // Huge counts saturate instead of wrapping.
    assert_eq!(
        units_cost_at(units(u64::MAX, 0, 0, 0), prices, PPM_ONE),
        i64::MAX
    );
}

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

#[test]
fn price_factor_is_applied_to_the_exact_product_and_rounded_once() {
    use onetoken_gateway::billing::{cost_ppm, reserve_amount_at, usage_cost_at, PPM_ONE};
    assert_eq!(cost_ppm(7, 500_000_000, 900_000), 3150);
    // 1 token at 1/M with 10% off is 0.9e-6 nano-units: rounds up to 1, once.
    assert_eq!(cost_ppm(1, 1, 900_000), 1);
    // Rounding the price first would give ceil(3 * 0.9) = 3 per million; exact is 2.7.
    assert_eq!(cost_ppm(1_000_000, 3, 900_000), 3);
    assert_eq!(cost_ppm(10_000_000, 3, 900_000), 27);
    assert_eq!(
        cost_ppm(123_457, 987_654_321, PPM_ONE),
        cost(123_457, 987_654_321)
    );
    assert_eq!(
        cost_ppm(1_000_000, 1_000, 1_500_000),
        1_500,
        "surcharges too"
    );
    assert_eq!(cost_ppm(5, 7, 0), 0);
    assert_eq!(
        cost_ppm(u64::MAX, i64::MAX, u32::MAX),
        i64::MAX,
        "saturates"
    );
    let p = Prices {
        input: 3,
        output: 7,
        cached_input: 1,
    };
    let u = Usage {
        prompt: 2_000_000,
        completion: 1_000_000,
        cached: 1_000_000,
    };
    // input 1e6*3*0.5 = 1.5 -> 2; cached 1e6*1*0.5 = 0.5 -> 1; output 1e6*7*0.5 = 3.5 -> 4.
    assert_eq!(usage_cost_at(u, p, 500_000), 7);
    assert_eq!(usage_cost_at(u, p, PPM_ONE), usage_cost(u, p));
    assert_eq!(reserve_amount_at(1_000_000, 1_000_000, p, 500_000), 2 + 4);
}

#[test]
fn budgets_count_ledger_engine_and_reserved_spend() {
    use onetoken_gateway::billing::{Budgets, ReserveRefusal, UsageMark};
    let a = OrgAccount::default();
    let today = 20_784;
    let usage = UsageMark {
        day: today,
        month: 202_611,
        spent_day: 900,
        spent_month: 5_000,
        spent_mark: 0,
    };
    let day = Budgets {
        day: Some(1_000),
        month: None,
    };
    assert_eq!(
        a.try_reserve_within(None, day, &usage, today, 202_611, 60),
        Ok(())
    );
    assert_eq!(
        a.try_reserve_within(None, day, &usage, today, 202_611, 41),
        Err(ReserveRefusal::BudgetDay),
        "900 spent + 60 reserved + 41 > 1000"
    );
    a.settle(60, 50);
    // 900 + 50 (engine, not yet in the ledger) = 950.
    assert_eq!(
        a.try_reserve_within(None, day, &usage, today, 202_611, 50),
        Ok(())
    );
    a.settle(50, 0);
    // The snapshot catches up: the ledger now holds the 50 (spent_mark 50).
    let caught_up = UsageMark {
        spent_day: 950,
        spent_mark: 50,
        ..usage
    };
    assert_eq!(
        a.try_reserve_within(None, day, &caught_up, today, 202_611, 51),
        Err(ReserveRefusal::BudgetDay)
    );
    // Next UTC day, before a new snapshot: only the engine's own spend since then counts.
    assert_eq!(
        a.try_reserve_within(None, day, &usage, today + 1, 202_611, 1_000),
        Ok(())
    );
    a.settle(1_000, 700);
    assert_eq!(
        a.try_reserve_within(None, day, &usage, today + 1, 202_611, 301),
        Err(ReserveRefusal::BudgetDay)
    );
    // Month budget and balance, in that order.
    let month = Budgets {
        day: None,
        month: Some(5_800),
    };
    assert_eq!(
        a.try_reserve_within(None, month, &usage, today + 1, 202_611, 100),
        Err(ReserveRefusal::BudgetMonth),
        "5000 + 750 + 100 > 5800"
    );
    assert_eq!(
        a.try_reserve_within(
            Some((10, 0)),
            Budgets::default(),
            &usage,
            today,
            202_611,
            11
        ),
        Err(ReserveRefusal::Balance)
    );
    assert_eq!(a.totals().1, 0, "refusals hold nothing");
}

#[test]
fn unpriced_requests_in_flight_are_capped_per_org() {
    use onetoken_gateway::billing::{OrgAccount, UNPRICED_IN_FLIGHT_PER_ORG};
    let account = std::sync::Arc::new(OrgAccount::default());
    let held: Vec<_> = (0..UNPRICED_IN_FLIGHT_PER_ORG)
        .map(|_| account.try_unpriced(UNPRICED_IN_FLIGHT_PER_ORG).unwrap())
        .collect();
    assert!(account.try_unpriced(UNPRICED_IN_FLIGHT_PER_ORG).is_none());
    drop(held);
    assert!(account.try_unpriced(UNPRICED_IN_FLIGHT_PER_ORG).is_some());
}

#[test]
fn shared_budgets_count_every_gateway_and_share_what_was_left_when_redis_is_down() {
    use onetoken_gateway::billing::{Budgets, ReserveRefusal, UsageMark};
    let a = OrgAccount::for_key(true);
    let today = 20_784;
    let usage = UsageMark {
        day: today,
        month: 202_611,
        ..UsageMark::default()
    };
    let day = Budgets {
        day: Some(1_000),
        month: None,
    };
    let reserve = |n| a.try_reserve_within(None, day, &usage, today, 202_611, n);
    // Nothing to push until a reservation saw the budget.
    assert_eq!(a.spend_push_start(), None);
    assert_eq!(reserve(0), Ok(()));
    // The other gateways spent 600 today (the ledger does not know yet).
    assert_eq!(a.spend_push_start(), Some(0));
    a.spend_push_done(today, 202_611, 600, 600);
    assert_eq!(reserve(401), Err(ReserveRefusal::BudgetDay), "600 + 401");
    assert_eq!(reserve(100), Ok(()));
    a.settle(100, 100);
    // Own spend counts before it is pushed, and while it is on its way.
    assert_eq!(
        reserve(301),
        Err(ReserveRefusal::BudgetDay),
        "600 + 100 + 301"
    );
    assert_eq!(a.spend_push_start(), Some(100));
    assert_eq!(
        reserve(301),
        Err(ReserveRefusal::BudgetDay),
        "in flight to Redis"
    );
    // Redis does not answer; four gateways were live: this one may spend a quarter of
    // the 400 left at the last sync, counting the 100 not yet pushed.
    a.spend_push_failed(4);
    assert_eq!(
        reserve(1),
        Err(ReserveRefusal::BudgetDay),
        "100 of a 100 share"
    );
    // Back: the pushed total says the others spent nothing more.
    assert_eq!(a.spend_push_start(), Some(100));
    a.spend_push_done(today, 202_611, 700, 700);
    assert_eq!(reserve(300), Ok(()));
    // A new UTC day: yesterday's total no longer counts.
    a.settle(300, 300);
    assert_eq!(a.spend_push_start(), Some(300));
    a.spend_push_done(today, 202_611, 1_000, 1_000);
    let tomorrow = usage;
    assert_eq!(
        a.try_reserve_within(None, day, &tomorrow, today + 1, 202_611, 1_000),
        Ok(())
    );
}
