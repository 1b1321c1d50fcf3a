//! Money: integer nano-units, reserve before forwarding, settle after.
//!
//! Prices are nano-units per million tokens; every product is taken in i128 so no
//! realistic price or token count can overflow, and each part is rounded up.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

/// `ceil(tokens * price / 1_000_000)`, saturating at the i64 range.
pub fn cost(tokens: u64, price: i64) -> i64 {
    cost_ppm(tokens, price, PPM_ONE)
}

/// A price factor of 1 (no discount or surcharge), in parts per million.
pub const PPM_ONE: u32 = 1_000_000;

/// `ceil(tokens * price * factor_ppm / 10^12)`: one part of a cost at an org's price
/// factor, rounded up once (never the price first and the cost after), saturating at the
/// i64 range.
pub fn cost_ppm(tokens: u64, price: i64, factor_ppm: u32) -> i64 {
    let base = i128::from(tokens) * i128::from(price);
    let (product, divisor) = if factor_ppm == PPM_ONE {
        (Some(base), 1_000_000i128)
    } else {
        (
            base.checked_mul(i128::from(factor_ppm)),
            1_000_000_000_000i128,
        )
    };
    let Some(product) = product else {
        // Only a product far beyond i64 after division overflows i128.
        return if base >= 0 { i64::MAX } else { i64::MIN };
    };
    let rounded = if product >= 0 {
        (product + divisor - 1) / divisor
    } else {
        // Prices are validated non-negative; floor toward zero keeps a bad one harmless.
        product / divisor
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
    usage_cost_at(usage, prices, PPM_ONE)
}

/// [`usage_cost`] at an org's price factor (parts per million), each part rounded up.
pub fn usage_cost_at(usage: Usage, prices: Prices, factor_ppm: u32) -> i64 {
    let cached = usage.cached.min(usage.prompt);
    cost_ppm(usage.prompt - cached, prices.input, factor_ppm)
        .saturating_add(cost_ppm(cached, prices.cached_input, factor_ppm))
        .saturating_add(cost_ppm(usage.completion, prices.output, factor_ppm))
}

/// Upper bound held before forwarding: the prompt estimate at the full input price plus
/// the largest output the request may produce.
pub fn reserve_amount(prompt_estimate: u64, max_out: u64, prices: Prices) -> i64 {
    reserve_amount_at(prompt_estimate, max_out, prices, PPM_ONE)
}

/// [`reserve_amount`] at an org's price factor.
pub fn reserve_amount_at(
    prompt_estimate: u64,
    max_out: u64,
    prices: Prices,
    factor_ppm: u32,
) -> i64 {
    cost_ppm(prompt_estimate, prices.input, factor_ppm).saturating_add(cost_ppm(
        max_out,
        prices.output,
        factor_ppm,
    ))
}

/// What a call is priced by besides tokens (images, audio, speech, rerank), as the
/// upstream reported it or, failing that, as the request asked.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Units {
    /// Images generated.
    pub images: u64,
    /// Audio in, milliseconds (priced per second, rounded up once for the call).
    pub audio_ms: u64,
    /// Characters of text turned into speech.
    pub characters: u64,
    /// Rerank search units.
    pub search_units: u64,
}

/// Unit prices of the deployment that serves a call, nano-units, the image price already
/// chosen for the requested size and quality.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UnitPrices {
    /// Per image.
    pub image: i64,
    /// Per second of audio in.
    pub audio_second: i64,
    /// Per million characters of speech input (as token prices are per million tokens).
    pub character: i64,
    /// Per search unit.
    pub search_unit: i64,
}

/// The cost of `units` at `prices` and an org's price factor, each part rounded up.
pub fn units_cost_at(units: Units, prices: UnitPrices, factor_ppm: u32) -> i64 {
    // Per-unit prices go through the per-million formula with the count scaled up, so the
    // factor is applied and rounded exactly as for tokens; audio is per second of
    // milliseconds, so its count is scaled by 1000 instead.
    let per_unit = |n: u64, price: i64| cost_ppm(n.saturating_mul(1_000_000), price, factor_ppm);
    per_unit(units.images, prices.image)
        .saturating_add(cost_ppm(
            units.audio_ms.saturating_mul(1000),
            prices.audio_second,
            factor_ppm,
        ))
        .saturating_add(cost_ppm(units.characters, prices.character, factor_ppm))
        .saturating_add(per_unit(units.search_units, prices.search_unit))
}

/// Spend budgets of a key or org, nano-units (`None` = no budget).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Budgets {
    /// Per UTC day.
    pub day: Option<i64>,
    /// Per UTC month.
    pub month: Option<i64>,
}

/// The snapshot's `usage`: spend in the current day and month as the ledger knew it, and
/// the engine's `spent` counter value already included in it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UsageMark {
    /// Days since the Unix epoch (UTC) that `spent_day` is for.
    pub day: i64,
    /// `YYYYMM` (UTC) that `spent_month` is for.
    pub month: i32,
    /// Ledger spend in `day`.
    pub spent_day: i64,
    /// Ledger spend in `month`.
    pub spent_month: i64,
    /// The engine `spent` value already counted in the two sums.
    pub spent_mark: i64,
}

/// Why a reservation was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReserveRefusal {
    /// The balance cannot cover it (402).
    Balance,
    /// It would exceed the day budget (429).
    BudgetDay,
    /// It would exceed the month budget (429).
    BudgetMonth,
    /// The balance may cover it, but this instance's money lease does not (yet): wait for
    /// a refill, or refuse.
    Lease,
}

/// The money lease of one org on one instance (docs/scale-out.md, "Money"): `hold` is
/// cumulative like `spent`, so `spent + reserved <= hold` is the local invariant.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// Money this instance may have spent plus reserved, as granted in Redis.
    pub hold: i64,
    /// Money reserved since the refiller last looked: the demand to keep headroom for.
    pub flow: i64,
    /// Reservations the lease refused since the refiller last looked, summed: what the
    /// requests waiting for a refill need.
    pub short: i64,
    /// The last grow was granted less than it asked for: the cap is held or spent, so a
    /// waiting request need not wait longer.
    pub starved: bool,
    /// The largest `flow` of recent ticks, decaying by an eighth a tick: headroom is kept
    /// for a rate that comes in bursts, not only for the last interval's.
    pub peak: i64,
    /// Ticks in a row with no reservation and nobody waiting; the headroom goes back to
    /// Redis after [`IDLE_TICKS_BEFORE_SHRINK`] of them, so sporadic traffic (one request
    /// a second) keeps its lease instead of paying a round trip each time.
    pub idle_ticks: u32,
}

/// Scheduled refiller ticks an org's money lease stays idle before its headroom goes back
/// to Redis (2 s at the default 100 ms interval).
pub const IDLE_TICKS_BEFORE_SHRINK: u32 = 20;

#[derive(Debug)]
struct Counters {
    spent: i64,
    reserved: i64,
    /// (day, `spent` when the engine first saw that day) for days the snapshot's usage
    /// does not cover yet.
    day_base: (i64, i64),
    /// The same for months.
    month_base: (i32, i64),
    /// Set when money is shared across gateways (org accounts only).
    lease: Option<Lease>,
    /// Set when budgets are shared across gateways.
    shared_spend: Option<SharedSpend>,
}

/// Spend of one key or org summed over all gateways in Redis, for budgets
/// (docs/scale-out.md, "Budgets").
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SharedSpend {
    /// The budgets the last reservation checked: only accounts with one are pushed.
    pub budgets: Budgets,
    /// The UTC day and month the global figures are for.
    pub day: i64,
    pub month: i32,
    /// Spend of all gateways in `day` / `month` as Redis last answered (this gateway's
    /// pushed spend included).
    pub global_day: i64,
    pub global_month: i64,
    /// Settled spend not yet sent to Redis.
    pub unpushed: i64,
    /// Spend sent and not yet acknowledged.
    pub pushing: i64,
    /// Redis did not answer the last push: the live gateways last counted, among which
    /// what was left of each budget is shared until it answers again (0 while it does).
    pub down_live: u64,
}

impl SharedSpend {
    /// Spend in the period: all gateways' as of the last push plus this gateway's since,
    /// and this gateway's share of what was left (`None`: no fallback) when Redis is down.
    fn check(&self, period_ok: bool, global: i64, limit: i64, wanted: i128) -> bool {
        let own = i128::from(self.unpushed) + i128::from(self.pushing);
        let global = if period_ok { i128::from(global) } else { 0 };
        if global + own + wanted > i128::from(limit) {
            return false;
        }
        if self.down_live > 0 {
            let left = (i128::from(limit) - global).max(0);
            return own + wanted <= left / i128::from(self.down_live);
        }
        true
    }
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            spent: 0,
            reserved: 0,
            day_base: (i64::MIN, 0),
            month_base: (i32::MIN, 0),
            lease: None,
            shared_spend: None,
        }
    }
}

impl Counters {
    /// Spend in `today`: the ledger's plus the engine's since the mark while the snapshot
    /// covers today; after a UTC day change, only the engine's own since the change.
    fn spent_day(&mut self, usage: &UsageMark, today: i64) -> i128 {
        let covered = (usage.day, usage.spent_day, usage.spent_mark);
        spent_in(self.spent, &mut self.day_base, covered, today)
    }

    /// [`Counters::spent_day`] for the UTC month `month`.
    fn spent_month(&mut self, usage: &UsageMark, month: i32) -> i128 {
        let covered = (usage.month, usage.spent_month, usage.spent_mark);
        spent_in(self.spent, &mut self.month_base, covered, month)
    }
}

/// Spend in the period `now` (a day or month number) of an account that has spent `spent`
/// since the engine started. While the snapshot's ledger figure covers `now` (`covered`:
/// its period, the ledger's spend in it, the engine's spend it already includes), that
/// figure plus what the engine spent since; once the period moved on, what the engine
/// spent since it did (`base`: the period and the engine's spend when it began).
#[inline]
fn spent_in<P: Copy + PartialOrd>(
    spent: i64,
    base: &mut (P, i64),
    covered: (P, i64, i64),
    now: P,
) -> i128 {
    let (period, ledger, mark) = covered;
    if period >= now {
        return i128::from(ledger) + i128::from(spent) - i128::from(mark);
    }
    if base.0 != now {
        *base = (now, spent);
    }
    i128::from(spent) - i128::from(base.1)
}

/// Live money counters of one organization (or of one key, for key budgets). They survive
/// snapshot swaps (the engine carries the same `Arc<OrgAccount>` over by org id or key
/// id), so in-flight reservations settle against the counters they were taken from.
#[derive(Debug, Default)]
pub struct OrgAccount {
    counters: Mutex<Counters>,
    /// Requests in flight that reserved nothing (every candidate deployment is free).
    unpriced: AtomicU32,
}

/// Requests of one org admitted with a zero reservation and still in flight. Money
/// bounds every priced request (its reservation must fit the balance); nothing bounds a
/// free one, so a loop through a zero-priced provider pointing back at the gateway, or
/// a flood of free calls, could hold every file descriptor. This cap is that bound.
pub const UNPRICED_IN_FLIGHT_PER_ORG: u32 = 256;

/// One in-flight slot of [`UNPRICED_IN_FLIGHT_PER_ORG`]; released on drop.
#[derive(Debug)]
pub struct UnpricedSlot(Arc<OrgAccount>);

impl Drop for UnpricedSlot {
    fn drop(&mut self) {
        self.0.unpriced.fetch_sub(1, Ordering::AcqRel);
    }
}

impl OrgAccount {
    /// An org account whose reservations must also fit a money lease granted from the
    /// shared cap (starting empty), when `leased`; a plain one otherwise.
    pub fn new(leased: bool) -> Self {
        let account = OrgAccount::default();
        if leased {
            let mut c = account.counters.lock();
            c.lease = Some(Lease::default());
            c.shared_spend = Some(SharedSpend::default());
        }
        account
    }

    /// A key's account: budgets shared across gateways when `shared`, no money lease (the
    /// org's account holds that).
    pub fn for_key(shared: bool) -> Self {
        let account = OrgAccount::default();
        if shared {
            account.counters.lock().shared_spend = Some(SharedSpend::default());
        }
        account
    }

    /// Take a slot for a request that reserves nothing, if fewer than `max` hold one.
    pub fn try_unpriced(self: &Arc<Self>, max: u32) -> Option<UnpricedSlot> {
        let prev = self.unpriced.fetch_add(1, Ordering::AcqRel);
        if prev >= max {
            self.unpriced.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(UnpricedSlot(Arc::clone(self)))
    }

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

    /// Take `amount` if it fits the day and month budgets (spend so far plus what is
    /// reserved) and, when `balance` is given as `(balance, spent_mark)`, the available
    /// balance; all checked and taken under one lock.
    pub fn try_reserve_within(
        &self,
        balance: Option<(i64, i64)>,
        budgets: Budgets,
        usage: &UsageMark,
        today: i64,
        month: i32,
        amount: i64,
    ) -> Result<(), ReserveRefusal> {
        let mut c = self.counters.lock();
        let wanted = i128::from(c.reserved) + i128::from(amount);
        if let Some(shared) = c.shared_spend.as_mut() {
            shared.budgets = budgets;
        }
        if let Some(limit) = budgets.day {
            if c.spent_day(usage, today) + wanted > i128::from(limit) {
                return Err(ReserveRefusal::BudgetDay);
            }
            if let Some(s) = &c.shared_spend {
                if !s.check(s.day == today, s.global_day, limit, wanted) {
                    return Err(ReserveRefusal::BudgetDay);
                }
            }
        }
        if let Some(limit) = budgets.month {
            if c.spent_month(usage, month) + wanted > i128::from(limit) {
                return Err(ReserveRefusal::BudgetMonth);
            }
            if let Some(s) = &c.shared_spend {
                if !s.check(s.month == month, s.global_month, limit, wanted) {
                    return Err(ReserveRefusal::BudgetMonth);
                }
            }
        }
        if let Some((balance, spent_mark)) = balance {
            let available = i128::from(balance)
                - (i128::from(c.spent) - i128::from(spent_mark))
                - i128::from(c.reserved);
            if available < i128::from(amount) {
                return Err(ReserveRefusal::Balance);
            }
            // A free request spends no money, so it needs no lease.
            let (spent, reserved) = (c.spent, c.reserved);
            if let Some(lease) = c.lease.as_mut().filter(|_| amount > 0) {
                let need = i128::from(spent) + i128::from(reserved) + i128::from(amount);
                if need > i128::from(lease.hold) {
                    lease.short = lease.short.saturating_add(amount);
                    return Err(ReserveRefusal::Lease);
                }
                lease.flow = lease.flow.saturating_add(amount);
            }
        }
        c.reserved = c.reserved.saturating_add(amount);
        Ok(())
    }

    /// Release a reservation and charge the real cost.
    pub fn settle(&self, reserved: i64, cost: i64) {
        let mut c = self.counters.lock();
        c.reserved = c.reserved.saturating_sub(reserved);
        c.spent = c.spent.saturating_add(cost);
        if let Some(shared) = c.shared_spend.as_mut() {
            shared.unpushed = shared.unpushed.saturating_add(cost);
        }
    }

    /// For the refiller: move the spend not yet sent into `pushing` and return it, when
    /// the account has a budget to share (`None` otherwise).
    pub fn spend_push_start(&self) -> Option<i64> {
        let mut c = self.counters.lock();
        let s = c.shared_spend.as_mut()?;
        if s.budgets.day.is_none() && s.budgets.month.is_none() {
            // Nothing checks it; a budget set later starts from the ledger's figure,
            // which the check takes whenever it is the larger.
            s.unpushed = 0;
            return None;
        }
        let n = std::mem::take(&mut s.unpushed);
        s.pushing = s.pushing.saturating_add(n);
        Some(n)
    }

    /// Redis took the push: the global figures of `day` and `month` are now these.
    pub fn spend_push_done(&self, day: i64, month: i32, global_day: i64, global_month: i64) {
        let mut c = self.counters.lock();
        if let Some(s) = c.shared_spend.as_mut() {
            *s = SharedSpend {
                day,
                month,
                global_day,
                global_month,
                pushing: 0,
                down_live: 0,
                ..*s
            };
        }
    }

    /// The push did not reach Redis: keep the spend for the next one, and share what was
    /// left of each budget with the `live` gateways until Redis answers.
    pub fn spend_push_failed(&self, live: u64) {
        let mut c = self.counters.lock();
        if let Some(s) = c.shared_spend.as_mut() {
            s.unpushed = s.unpushed.saturating_add(std::mem::take(&mut s.pushing));
            s.down_live = live.max(1);
        }
    }

    /// For the refiller: `(spent, reserved, lease)` with the lease's demand figures
    /// reset when `take_flow` (a scheduled tick), else only its `short`; `None` when the
    /// account holds no lease.
    pub fn lease_demand(&self, take_flow: bool) -> Option<(i64, i64, Lease)> {
        let mut c = self.counters.lock();
        let (spent, reserved) = (c.spent, c.reserved);
        let lease = c.lease.as_mut()?;
        if take_flow {
            lease.peak = lease.flow.max(lease.peak - lease.peak / 8);
            lease.idle_ticks = if lease.flow == 0 && lease.short == 0 {
                lease.idle_ticks.saturating_add(1)
            } else {
                0
            };
        }
        let seen = *lease;
        lease.short = 0;
        if take_flow {
            lease.flow = 0;
        }
        Some((spent, reserved, seen))
    }

    /// Raise the local hold to what Redis granted (never lower it: a lower figure is a
    /// stale answer, and Redis counts at least what the instance holds); `starved` when
    /// the grant fell short of the ask.
    pub fn grant(&self, hold: i64, starved: bool) {
        if let Some(lease) = self.counters.lock().lease.as_mut() {
            lease.hold = lease.hold.max(hold);
            lease.starved = starved;
        }
    }

    /// Whether the last grow fell short of its ask (see [`Lease::starved`]).
    pub fn lease_starved(&self) -> bool {
        self.counters.lock().lease.is_some_and(|l| l.starved)
    }

    /// Give back the headroom of an idle lease: lower the hold to `spent + reserved`
    /// locally, first, so no reservation can use what Redis is about to hand to others.
    /// Returns the new hold when it moved.
    pub fn shrink(&self) -> Option<i64> {
        let mut c = self.counters.lock();
        let used = c.spent.saturating_add(c.reserved);
        let lease = c.lease.as_mut()?;
        if lease.hold <= used {
            return None;
        }
        lease.hold = used;
        Some(used)
    }

    /// (spent since engine start, currently reserved).
    pub fn totals(&self) -> (i64, i64) {
        let c = self.counters.lock();
        (c.spent, c.reserved)
    }
}
