//! Money: integer nano-units, reserve before forwarding, settle after.
//!
//! Prices are nano-units per million tokens; every product is taken in i128 so no
//! realistic price or token count can overflow, and each part is rounded up.

use parking_lot::Mutex;

/// `ceil(tokens * price / 1_000_000)`, saturating at the i64 range.
pub fn cost(tokens: u64, price: i64) -> i64 {
    let product = i128::from(tokens) * i128::from(price);
    let rounded = if product >= 0 {
        (product + 999_999) / 1_000_000
    } else {
        // Prices are validated non-negative; floor toward zero keeps a bad one harmless.
        product / 1_000_000
    };
    i64::try_from(rounded).unwrap_or(if rounded > 0 { i64::MAX } else { i64::MIN })
}

/// Token usage of one call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Prompt tokens, cached ones included.
    pub prompt: u64,
    /// Output tokens.
    pub completion: u64,
    /// Prompt tokens served from the provider's cache.
    pub cached: u64,
}

/// Per-million-token prices of a model, nano-units.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Prices {
    /// Uncached prompt tokens.
    pub input: i64,
    /// Output tokens.
    pub output: i64,
    /// Cached prompt tokens.
    pub cached_input: i64,
}

/// Total cost: uncached input, cached input and output, each rounded up separately.
pub fn usage_cost(usage: Usage, prices: Prices) -> i64 {
    let cached = usage.cached.min(usage.prompt);
    cost(usage.prompt - cached, prices.input)
        .saturating_add(cost(cached, prices.cached_input))
        .saturating_add(cost(usage.completion, prices.output))
}

/// Upper bound held before forwarding: the prompt estimate at the full input price plus
/// the largest output the request may produce.
pub fn reserve_amount(prompt_estimate: u64, max_out: u64, prices: Prices) -> i64 {
    cost(prompt_estimate, prices.input).saturating_add(cost(max_out, prices.output))
}

#[derive(Debug, Default)]
struct Counters {
    spent: i64,
    reserved: i64,
}

/// Live money counters of one organization. They survive snapshot swaps (the engine
/// carries the same `Arc<OrgAccount>` over by org id), so in-flight reservations settle
/// against the counters they were taken from.
#[derive(Debug, Default)]
pub struct OrgAccount {
    counters: Mutex<Counters>,
}

impl OrgAccount {
    /// Take `amount` if `balance - (spent - spent_mark) - reserved >= amount`, checked
    /// and taken under one lock.
    pub fn try_reserve(&self, balance: i64, spent_mark: i64, amount: i64) -> bool {
        let mut c = self.counters.lock();
        let available = i128::from(balance)
            - (i128::from(c.spent) - i128::from(spent_mark))
            - i128::from(c.reserved);
        if available < i128::from(amount) {
            return false;
        }
        c.reserved = c.reserved.saturating_add(amount);
        true
    }

    /// Release a reservation and charge the real cost.
    pub fn settle(&self, reserved: i64, cost: i64) {
        let mut c = self.counters.lock();
        c.reserved = c.reserved.saturating_sub(reserved);
        c.spent = c.spent.saturating_add(cost);
    }

    /// (spent since engine start, currently reserved).
    pub fn totals(&self) -> (i64, i64) {
        let c = self.counters.lock();
        (c.spent, c.reserved)
    }
}
