//! Admission limits per key, per application and per org: requests and tokens per minute (GCRA), concurrent
//! requests, and day/month spend budgets.
//!
//! Limit *values* come from the snapshot; limit *state* lives in [`LimitState`] and
//! [`OrgAccount`] objects carried over by id from one snapshot to the next, so a swap
//! keeps the counters and a changed limit applies to the very next request.
//!
//! GCRA keeps one atomic "theoretical arrival time" per limit and updates it with a CAS,
//! so the hot path takes no lock for rates or concurrency. It is the token bucket of
//! capacity `limit` refilled continuously at `limit` per minute: a client may spend the
//! whole limit at once, after which requests are admitted only as fast as the bucket
//! refills. There is no window edge, so no double burst at one; over any interval `t`
//! at most `limit + limit * t / 60s` units pass.

use std::collections::HashMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use http::{HeaderMap, HeaderValue};

use crate::billing::{Budgets, OrgAccount, ReserveRefusal};
use crate::error::ApiError;
use crate::snapshot::Key;

/// The GCRA period: limits are per minute.
pub(crate) const PERIOD_NS: u64 = 60_000_000_000;

/// Limit values of one key or org, compiled from the snapshot (`null` = no limit).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Limits {
    pub(crate) rpm: Option<u32>,
    pub(crate) tpm: Option<u32>,
    pub(crate) concurrency: Option<u32>,
    pub(crate) budgets: Budgets,
}

/// Live rate and concurrency state of one key or org.
#[derive(Debug, Default)]
pub(crate) struct LimitState {
    requests: Gcra,
    tokens: Gcra,
    in_flight: AtomicU32,
    /// Concurrency slots granted from the shared count (limits shared through Redis).
    pub(crate) slots: Option<parking_lot::Mutex<SlotLease>>,
    /// Units of the global rpm and tpm buckets leased (limits shared through Redis).
    pub(crate) rates: Option<parking_lot::Mutex<RateLeases>>,
}

/// Which rate a lease is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RateKind {
    Requests,
    Tokens,
}

/// rpm and tpm leases of one key or org.
#[derive(Debug, Default)]
pub(crate) struct RateLeases {
    pub(crate) requests: UnitLease,
    pub(crate) tokens: UnitLease,
}

impl RateLeases {
    pub(crate) fn of(&mut self, kind: RateKind) -> &mut UnitLease {
        match kind {
            RateKind::Requests => &mut self.requests,
            RateKind::Tokens => &mut self.tokens,
        }
    }
}

/// Units of one global per-minute bucket this instance took from Redis and has not used
/// yet (docs/scale-out.md, "Rates").
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct UnitLease {
    /// Units left to admit against.
    pub(crate) avail: u64,
    /// The scope's limit as the last request saw it (0: none seen yet).
    pub(crate) limit: u32,
    /// Units admitted since the refiller's last scheduled look.
    pub(crate) used: u64,
    /// Units refused for want of a lease since the refiller last looked.
    pub(crate) short: u64,
    /// The largest single take among those (a request may need more than a share).
    pub(crate) biggest: u64,
    /// Units used above what admission charged (tpm corrected at settle), owed to the
    /// global bucket with the next refill.
    pub(crate) debt: u64,
    /// The last take was granted less than it asked for: the global bucket is empty.
    pub(crate) starved: bool,
    /// When (ns on `mono_ns`) the oldest units in `avail` were leased; they go back to
    /// Redis `lease_ttl_ms` later.
    pub(crate) since: u64,
    /// Thousandths of a unit credited locally while Redis is down.
    pub(crate) credit_milli: u64,
}

/// Concurrency slots this instance may fill for one key or org, granted from the hash of
/// slots per instance in Redis (docs/scale-out.md, "Concurrency").
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SlotLease {
    /// Requests this instance may have in flight.
    pub(crate) granted: u32,
    /// The scope's concurrency limit as the last request saw it (0: none seen yet).
    pub(crate) limit: u32,
    /// Requests refused for want of a slot since the refiller last looked.
    pub(crate) short: u32,
    /// Most requests in flight at once since the refiller last looked.
    pub(crate) peak: u32,
    /// The last acquire was granted less than it asked for: the global limit is full.
    pub(crate) starved: bool,
}

impl LimitState {
    /// Live state, holding slot and rate leases when limits are shared (`leased`).
    pub(crate) fn new(leased: bool) -> Self {
        LimitState {
            slots: leased.then(Default::default),
            rates: leased.then(Default::default),
            ..LimitState::default()
        }
    }

    /// Take `units` of the `kind` lease; `Err(starved)` when it holds too few.
    fn lease_take(&self, kind: RateKind, units: u64, limit: u32) -> Result<(), bool> {
        let Some(rates) = &self.rates else {
            return Ok(());
        };
        let mut rates = rates.lock();
        let lease = rates.of(kind);
        lease.limit = limit;
        if lease.avail < units {
            lease.short = lease.short.saturating_add(units);
            lease.biggest = lease.biggest.max(units);
            return Err(lease.starved);
        }
        lease.avail -= units;
        lease.used = lease.used.saturating_add(units);
        Ok(())
    }

    /// Give back `units` a request took and did not use.
    fn lease_give(&self, kind: RateKind, units: u64) {
        if let Some(rates) = &self.rates {
            let mut rates = rates.lock();
            let lease = rates.of(kind);
            lease.avail = lease.avail.saturating_add(units);
        }
    }

    /// `units` used above what was taken: out of what is left, the rest owed to Redis.
    fn lease_over(&self, kind: RateKind, units: u64) {
        if let Some(rates) = &self.rates {
            let mut rates = rates.lock();
            let lease = rates.of(kind);
            let covered = lease.avail.min(units);
            lease.avail -= covered;
            lease.debt = lease.debt.saturating_add(units - covered);
        }
    }

    /// For the refiller: (requests in flight, the slot lease), resetting what it counts
    /// per look: `short` always, `peak` (to what is in flight) on a scheduled tick.
    pub(crate) fn slot_demand(&self, scheduled: bool) -> Option<(u32, SlotLease)> {
        let mut lease = self.slots.as_ref()?.lock();
        let in_flight = self.in_flight.load(Ordering::Acquire);
        let seen = *lease;
        lease.short = 0;
        if scheduled {
            lease.peak = in_flight;
        }
        Some((in_flight, seen))
    }

    /// For the refiller: the `kind` lease as it stood, the units it gives back now and
    /// the debt it sends now. Resets `short`; on a scheduled tick also `used`, takes the
    /// debt out, and gives back every unit when the scope was idle for the interval or
    /// the units are older than `ttl_ns` (so no unit is spent long after it was leased).
    pub(crate) fn rate_demand(
        &self,
        kind: RateKind,
        scheduled: bool,
        now: u64,
        ttl_ns: u64,
    ) -> Option<(UnitLease, u64, u64)> {
        let mut rates = self.rates.as_ref()?.lock();
        let lease = rates.of(kind);
        let seen = *lease;
        lease.short = 0;
        lease.biggest = 0;
        if !scheduled {
            return Some((seen, 0, 0));
        }
        lease.used = 0;
        let debt = std::mem::take(&mut lease.debt);
        let idle = seen.used == 0 && seen.short == 0;
        let old = now.saturating_sub(seen.since) >= ttl_ns;
        let back = if seen.avail > 0 && (idle || old) {
            std::mem::take(&mut lease.avail)
        } else {
            0
        };
        Some((seen, back, debt))
    }

    /// Add what Redis granted to the `kind` lease.
    pub(crate) fn rate_grant(&self, kind: RateKind, granted: u64, starved: bool, now: u64) {
        if let Some(rates) = &self.rates {
            let mut rates = rates.lock();
            let lease = rates.of(kind);
            if lease.avail == 0 {
                lease.since = now;
            }
            lease.avail = lease.avail.saturating_add(granted);
            lease.starved = starved;
        }
    }

    /// Stopping: empty the `kind` lease; `(limit, units to give back, debt)` when it
    /// has anything to send.
    pub(crate) fn rate_release(&self, kind: RateKind) -> Option<(u32, u64, u64)> {
        let mut rates = self.rates.as_ref()?.lock();
        let lease = rates.of(kind);
        if lease.limit == 0 || (lease.avail == 0 && lease.debt == 0) {
            return None;
        }
        let back = std::mem::take(&mut lease.avail);
        Some((lease.limit, back, std::mem::take(&mut lease.debt)))
    }

    /// A refill that did not reach Redis: keep the debt for the next one.
    pub(crate) fn rate_owe(&self, kind: RateKind, debt: u64) {
        if let Some(rates) = &self.rates {
            let mut rates = rates.lock();
            let lease = rates.of(kind);
            lease.debt = lease.debt.saturating_add(debt);
        }
    }

    /// Redis down: credit this gateway's `share` of the limit per minute for `elapsed_ms`,
    /// holding at most `share` units at once (a bucket of the share's size). Returns
    /// whether the lease has a limit (so it fell back).
    pub(crate) fn rate_fallback(
        &self,
        kind: RateKind,
        share: impl Fn(u32) -> u32,
        elapsed_ms: u64,
    ) -> bool {
        let Some(rates) = &self.rates else {
            return false;
        };
        let mut rates = rates.lock();
        let lease = rates.of(kind);
        if lease.limit == 0 {
            return false;
        }
        let share = u64::from(share(lease.limit));
        lease.credit_milli = lease
            .credit_milli
            .saturating_add(share.saturating_mul(elapsed_ms) / 60);
        let units = lease.credit_milli / 1000;
        lease.credit_milli %= 1000;
        let topped = lease.avail.saturating_add(units).min(share);
        lease.avail = lease.avail.max(topped);
        true
    }

    /// Lower the slots granted to `to`, never below what is in flight, before Redis is
    /// told: no request may take a slot Redis is about to count as free.
    pub(crate) fn lower_slots(&self, to: u32) {
        if let Some(slots) = &self.slots {
            let mut lease = slots.lock();
            lease.granted = to.max(self.in_flight.load(Ordering::Acquire));
        }
    }

    /// Take Redis' answer (or, with Redis down, this gateway's share of the limit).
    pub(crate) fn set_slots(&self, granted: u32, starved: bool) {
        if let Some(slots) = &self.slots {
            let mut lease = slots.lock();
            lease.granted = granted;
            lease.starved = starved;
        }
    }
}

/// Which lease a request found short.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LeaseKind {
    Money,
    Slots,
    Rate,
}

/// Live per-id state that survives snapshot swaps; the compile step looks ids up here and
/// inserts new ones.
#[derive(Debug, Default)]
pub(crate) struct LiveCounters {
    /// Money counters by org id.
    pub(crate) orgs: HashMap<String, Arc<OrgAccount>>,
    /// New org accounts hold a money lease (limits shared through Redis).
    pub(crate) leased: bool,
    /// Spend counters by key id (for key budgets).
    pub(crate) keys: HashMap<String, Arc<OrgAccount>>,
    pub(crate) org_limits: HashMap<String, Arc<LimitState>>,
    pub(crate) key_limits: HashMap<String, Arc<LimitState>>,
    /// Spend counters by application id (for application budgets).
    pub(crate) apps: HashMap<String, Arc<OrgAccount>>,
    pub(crate) app_limits: HashMap<String, Arc<LimitState>>,
}

/// Nanoseconds on a process-wide monotonic clock (never 0, so 0 can mean "empty").
pub(crate) fn mono_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    u64::try_from(epoch.elapsed().as_nanos())
        .unwrap_or(u64::MAX)
        .saturating_add(1)
}

/// Wall-clock unix seconds (budgets follow UTC days and months).
pub(crate) fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// One GCRA limit: `tat` is the theoretical arrival time (ns on [`mono_ns`]); the bucket
/// is full when `tat <= now` and empty when `tat - now == PERIOD_NS`.
///
/// `tat` is measured in time at the rate of `limit`. When a snapshot changes the limit,
/// the state is rescaled once so the *number* of units used carries over (4 of 4 used
/// becomes 4 of 600 used, not "full"), and the new limit applies to the next request.
#[derive(Debug, Default)]
pub(crate) struct Gcra {
    tat: AtomicU64,
    limit: AtomicU32,
    /// Serialises the rare rescale; the take path only reads `limit`.
    rescale: parking_lot::Mutex<()>,
}

/// Outcome of a GCRA check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Take {
    /// Admitted; `units` were charged (to refund or correct later).
    Ok { units: u64 },
    /// Refused; the same request fits again after `retry_ns`.
    Wait { retry_ns: u64 },
}

/// Time one unit of a `limit`-per-minute budget is worth, for `n` units, rounded up.
fn increment(n: u64, limit: u32) -> u64 {
    let inc = (u128::from(n) * u128::from(PERIOD_NS)).div_ceil(u128::from(limit.max(1)));
    u64::try_from(inc).unwrap_or(u64::MAX)
}

impl Gcra {
    /// Take `n` units of a `limit`-per-minute budget at `now`. A request larger than the
    /// whole budget is charged as the whole budget, so it passes only with a full bucket.
    pub(crate) fn try_take(&self, now: u64, n: u64, limit: u32) -> Take {
        if limit == 0 {
            // A limit of zero refuses everything (a suspended key or org).
            return Take::Wait {
                retry_ns: PERIOD_NS,
            };
        }
        self.sync_limit(now, limit);
        let inc = increment(n.min(u64::from(limit)), limit);
        let mut tat = self.tat.load(Ordering::Relaxed);
        loop {
            let new = tat.max(now).saturating_add(inc);
            let ahead = new - now;
            if ahead > PERIOD_NS {
                return Take::Wait {
                    retry_ns: ahead - PERIOD_NS,
                };
            }
            match self
                .tat
                .compare_exchange_weak(tat, new, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => {
                    return Take::Ok {
                        units: n.min(u64::from(limit)),
                    }
                }
                Err(actual) => tat = actual,
            }
        }
    }

    fn sync_limit(&self, now: u64, limit: u32) {
        if self.limit.load(Ordering::Acquire) == limit {
            return;
        }
        let _serial = self.rescale.lock();
        let old = self.limit.load(Ordering::Acquire);
        if old == limit {
            return;
        }
        if old != 0 {
            let used = self.tat.load(Ordering::Acquire).saturating_sub(now);
            let scaled = u128::from(used) * u128::from(old) / u128::from(limit);
            let scaled = u64::try_from(scaled).unwrap_or(u64::MAX);
            self.tat
                .store(now.saturating_add(scaled), Ordering::Release);
        }
        self.limit.store(limit, Ordering::Release);
    }

    /// Give back `units` (a request admitted here was refused further on, or used less
    /// than it was charged).
    pub(crate) fn refund(&self, units: u64) {
        let inc = increment(units, self.limit.load(Ordering::Acquire));
        let _ = self
            .tat
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |t| {
                Some(t.saturating_sub(inc))
            });
    }

    /// Add `units` unconditionally (usage above the admission estimate): the bucket may
    /// go into debt, which delays the next requests.
    pub(crate) fn charge(&self, now: u64, units: u64) {
        let inc = increment(units, self.limit.load(Ordering::Acquire));
        let _ = self
            .tat
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |t| {
                Some(t.max(now).saturating_add(inc))
            });
    }

    /// (units left, ns until full) for a `limit`-per-minute budget at `now`.
    pub(crate) fn status(&self, now: u64, limit: u32) -> (u64, u64) {
        let used = self.tat.load(Ordering::Relaxed).saturating_sub(now);
        let free = PERIOD_NS.saturating_sub(used);
        let left = u128::from(free) * u128::from(limit) / u128::from(PERIOD_NS);
        (u64::try_from(left).unwrap_or(u64::MAX), used)
    }
}

/// A request refused at admission: the error, plus the headers that tell the client when
/// to come back. Holds numbers only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub(crate) error: ApiError,
    retry_after_s: Option<u64>,
    /// (limit, remaining, ns until full) of the scope that refused.
    requests: Option<(u32, u64, u64)>,
    tokens: Option<(u32, u64, u64)>,
    /// A lease was short (the limit itself was not): which, and whether its last refill
    /// came back with less than it asked for. The caller may wait for a refill and try
    /// again.
    pub(crate) lease_short: Option<(LeaseKind, bool)>,
    /// The message when an application's limit refused, naming that limit (a fixed text:
    /// the client would otherwise blame its key, whose own limits were not reached).
    pub(crate) message: Option<&'static str>,
}

impl Refusal {
    fn plain(error: ApiError) -> Self {
        Refusal {
            error,
            retry_after_s: None,
            requests: None,
            tokens: None,
            lease_short: None,
            message: None,
        }
    }

    /// The money lease ran out while Redis is unreachable: 503
    /// `shared_state_unavailable`, retry in a second.
    pub(crate) fn shared_unavailable() -> Self {
        Refusal {
            retry_after_s: Some(1),
            ..Refusal::plain(ApiError::SharedStateUnavailable)
        }
    }

    /// Whether the response carries a `Retry-After`.
    pub(crate) fn has_retry_after(&self) -> bool {
        self.retry_after_s.is_some()
    }

    /// Too many requests in flight: 429 `concurrency_limited`, retry in a second.
    pub(crate) fn busy() -> Self {
        Refusal {
            retry_after_s: Some(1),
            ..Refusal::plain(ApiError::ConcurrencyLimited)
        }
    }

    /// Whether the record's `rate_limit` column says `limited`.
    pub(crate) fn is_limited(&self) -> bool {
        matches!(
            self.error,
            ApiError::RateLimited | ApiError::ConcurrencyLimited | ApiError::BudgetExceeded
        )
    }

    /// `Retry-After` and `x-ratelimit-*` on the error response.
    pub(crate) fn apply(&self, headers: &mut HeaderMap) {
        let mut buf = String::with_capacity(16);
        let mut put = |name: &'static str, buf: &str| {
            if let Ok(v) = HeaderValue::from_str(buf) {
                headers.insert(name, v);
            }
        };
        if let Some(s) = self.retry_after_s {
            buf.clear();
            let _ = write!(buf, "{s}");
            put("retry-after", &buf);
        }
        for (dim, names) in [
            (
                self.requests,
                [
                    "x-ratelimit-limit-requests",
                    "x-ratelimit-remaining-requests",
                    "x-ratelimit-reset-requests",
                ],
            ),
            (
                self.tokens,
                [
                    "x-ratelimit-limit-tokens",
                    "x-ratelimit-remaining-tokens",
                    "x-ratelimit-reset-tokens",
                ],
            ),
        ] {
            let Some((limit, remaining, reset_ns)) = dim else {
                continue;
            };
            buf.clear();
            let _ = write!(buf, "{limit}");
            put(names[0], &buf);
            buf.clear();
            let _ = write!(buf, "{remaining}");
            put(names[1], &buf);
            buf.clear();
            write_duration(&mut buf, reset_ns);
            put(names[2], &buf);
        }
    }
}

/// OpenAI's reset format: `20ms`, `1.5s`, `6m0s`.
fn write_duration(out: &mut String, ns: u64) {
    let ms = ns.div_ceil(1_000_000);
    if ms < 1000 {
        let _ = write!(out, "{ms}ms");
        return;
    }
    let (m, rest_ms) = (ms / 60_000, ms % 60_000);
    if m > 0 {
        let _ = write!(out, "{m}m{}s", rest_ms.div_ceil(1000));
        return;
    }
    let (s, frac) = (rest_ms / 1000, rest_ms % 1000);
    if frac == 0 {
        let _ = write!(out, "{s}s");
    } else {
        let frac = format!("{frac:03}");
        let _ = write!(out, "{s}.{}s", frac.trim_end_matches('0'));
    }
}

/// Whole seconds for `Retry-After`, rounded up, at least 1.
fn retry_secs(ns: u64) -> u64 {
    ns.div_ceil(1_000_000_000).max(1)
}

/// What one admitted request holds: its concurrency slots (released on drop), its token
/// charges (corrected at settle) and its key- and application-budget reservations.
#[derive(Default)]
pub(crate) struct Admission {
    slots: [Option<Arc<LimitState>>; 3],
    requests: [Option<Arc<LimitState>>; 3],
    /// (state, tokens charged).
    tokens: [Option<(Arc<LimitState>, u64)>; 3],
    /// (key account, amount), then (application account, amount).
    reservations: [Option<(Arc<OrgAccount>, i64)>; 2],
}

impl Admission {
    fn release_slots(&mut self) {
        for s in self.slots.iter_mut().filter_map(Option::take) {
            s.in_flight.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Undo everything taken (the request is refused further on).
    fn rollback(&mut self) {
        for s in self.requests.iter_mut().filter_map(Option::take) {
            s.requests.refund(1);
            s.lease_give(RateKind::Requests, 1);
        }
        for (s, charged) in self.tokens.iter_mut().filter_map(Option::take) {
            s.tokens.refund(charged);
            s.lease_give(RateKind::Tokens, charged);
        }
        for (account, amount) in self.reservations.iter_mut().filter_map(Option::take) {
            account.settle(amount, 0);
        }
        self.release_slots();
    }

    /// The request is over: charge the key's and the application's spend, correct the
    /// token charge to the tokens actually billed, free the concurrency slots.
    pub(crate) fn settle(&mut self, cost: i64, tokens_used: u64) {
        for (account, amount) in self.reservations.iter_mut().filter_map(Option::take) {
            account.settle(amount, cost);
        }
        for (s, charged) in self.tokens.iter_mut().filter_map(Option::take) {
            if tokens_used > charged {
                s.tokens.charge(mono_ns(), tokens_used - charged);
                s.lease_over(RateKind::Tokens, tokens_used - charged);
            } else {
                s.tokens.refund(charged - tokens_used);
                s.lease_give(RateKind::Tokens, charged - tokens_used);
            }
        }
        self.requests = Default::default();
        self.release_slots();
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        // Settle is always called when a record is emitted; this only guards the slots
        // and the budget reservations if a request is dropped some other way.
        for (account, amount) in self.reservations.iter_mut().filter_map(Option::take) {
            account.settle(amount, 0);
        }
        self.release_slots();
    }
}

fn rate_refusal(state: &LimitState, limits: &Limits, now: u64, retry_ns: u64) -> Refusal {
    let dim = |g: &Gcra, limit: Option<u32>| {
        limit.map(|l| {
            let (left, reset) = g.status(now, l);
            (l, left, reset)
        })
    };
    Refusal {
        error: ApiError::RateLimited,
        retry_after_s: Some(retry_secs(retry_ns)),
        requests: dim(&state.requests, limits.rpm),
        tokens: dim(&state.tokens, limits.tpm),
        lease_short: None,
        message: None,
    }
}

/// Which scope of [`admit_at`] a limit belongs to: the application's refusals say so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owner {
    Key,
    Application,
    Org,
}

impl Refusal {
    /// Name the application's limit in the message when it is the one that refused.
    fn by(self, owner: Owner, rate: Option<RateKind>) -> Self {
        if owner != Owner::Application {
            return self;
        }
        let message = match (self.error, rate) {
            (ApiError::RateLimited, Some(RateKind::Tokens)) => {
                "The application's tokens-per-minute limit is exceeded; retry after the Retry-After delay."
            }
            (ApiError::RateLimited, _) => {
                "The application's requests-per-minute limit is exceeded; retry after the Retry-After delay."
            }
            (ApiError::ConcurrencyLimited, _) => {
                "Too many concurrent requests for this key's application."
            }
            _ => return self,
        };
        Refusal {
            message: Some(message),
            ..self
        }
    }
}

/// Admit a request of `tokens` (prompt estimate plus max output) that needs a reservation
/// of `amount`: concurrency, then requests, then tokens per minute, for the key and then
/// its org; then budgets and the org balance, reserving `amount` on both the key and the
/// org (the org reservation is the caller's to settle). Anything refused undoes what was
/// taken before it.
pub(crate) fn admit(key: &Key, tokens: u64, amount: i64) -> Result<Admission, Refusal> {
    admit_at(key, tokens, amount, mono_ns(), unix_now())
}

pub(crate) fn admit_at(
    key: &Key,
    tokens: u64,
    amount: i64,
    now: u64,
    unix_now: i64,
) -> Result<Admission, Refusal> {
    let org = &key.org;
    let app = key.application.as_deref();
    // Key, then application, then org: the narrowest scope refuses first.
    let scopes: [Option<(Owner, &Limits, &Arc<LimitState>)>; 3] = [
        Some((Owner::Key, &key.limits, &key.limiter)),
        app.map(|a| (Owner::Application, &a.limits, &a.limiter)),
        Some((Owner::Org, &org.limits, &org.limiter)),
    ];
    let scopes = || {
        scopes
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.map(|(owner, limits, state)| (i, owner, limits, state)))
    };
    let mut adm = Admission::default();

    for (i, owner, limits, state) in scopes() {
        if let (Some(limit), Some(slots)) = (limits.concurrency, &state.slots) {
            // Shared: the slot is taken under the lease's lock, so the refiller never
            // lowers `granted` below what is in flight.
            let mut lease = slots.lock();
            lease.limit = limit;
            let n = state.in_flight.load(Ordering::Acquire) + 1;
            if n > limit || n > lease.granted {
                let short = (n <= limit).then(|| {
                    lease.short = lease.short.saturating_add(1);
                    (LeaseKind::Slots, lease.starved)
                });
                drop(lease);
                adm.rollback();
                return Err(Refusal {
                    retry_after_s: Some(1),
                    lease_short: short,
                    ..Refusal::plain(ApiError::ConcurrencyLimited)
                }
                .by(owner, None));
            }
            state.in_flight.fetch_add(1, Ordering::AcqRel);
            lease.peak = lease.peak.max(n);
            adm.slots[i] = Some(Arc::clone(state));
            continue;
        }
        let n = state.in_flight.fetch_add(1, Ordering::AcqRel) + 1;
        adm.slots[i] = Some(Arc::clone(state));
        if limits.concurrency.is_some_and(|c| n > c) {
            adm.rollback();
            return Err(Refusal {
                retry_after_s: Some(1),
                ..Refusal::plain(ApiError::ConcurrencyLimited)
            }
            .by(owner, None));
        }
    }
    let requests = Some(RateKind::Requests);
    for (i, owner, limits, state) in scopes() {
        let Some(rpm) = limits.rpm else { continue };
        match state.requests.try_take(now, 1, rpm) {
            Take::Ok { .. } => {
                if let Err(starved) = state.lease_take(RateKind::Requests, 1, rpm) {
                    state.requests.refund(1);
                    adm.rollback();
                    return Err(Refusal {
                        lease_short: Some((LeaseKind::Rate, starved)),
                        ..rate_refusal(state, limits, now, 0)
                    }
                    .by(owner, requests));
                }
                adm.requests[i] = Some(Arc::clone(state));
            }
            Take::Wait { retry_ns } => {
                adm.rollback();
                return Err(rate_refusal(state, limits, now, retry_ns).by(owner, requests));
            }
        }
    }
    let tokens_kind = Some(RateKind::Tokens);
    for (i, owner, limits, state) in scopes() {
        let Some(tpm) = limits.tpm else { continue };
        match state.tokens.try_take(now, tokens, tpm) {
            Take::Ok { units } => {
                if let Err(starved) = state.lease_take(RateKind::Tokens, units, tpm) {
                    state.tokens.refund(units);
                    adm.rollback();
                    return Err(Refusal {
                        lease_short: Some((LeaseKind::Rate, starved)),
                        ..rate_refusal(state, limits, now, 0)
                    }
                    .by(owner, tokens_kind));
                }
                adm.tokens[i] = Some((Arc::clone(state), units));
            }
            Take::Wait { retry_ns } => {
                adm.rollback();
                return Err(rate_refusal(state, limits, now, retry_ns).by(owner, tokens_kind));
            }
        }
    }

    let day = unix_now.div_euclid(86_400);
    let month = month_of_day(day);
    let refused = |r: ReserveRefusal| match r {
        ReserveRefusal::Balance => Refusal::plain(ApiError::InsufficientBalance),
        ReserveRefusal::Lease => Refusal {
            lease_short: Some((LeaseKind::Money, org.account.lease_starved())),
            ..Refusal::plain(ApiError::InsufficientBalance)
        },
        ReserveRefusal::BudgetDay => Refusal {
            retry_after_s: Some(u64::try_from((day + 1) * 86_400 - unix_now).unwrap_or(1)),
            ..Refusal::plain(ApiError::BudgetExceeded)
        },
        ReserveRefusal::BudgetMonth => Refusal {
            retry_after_s: Some(
                u64::try_from(next_month_start(day) * 86_400 - unix_now).unwrap_or(1),
            ),
            ..Refusal::plain(ApiError::BudgetExceeded)
        },
    };
    if let Err(r) =
        key.account
            .try_reserve_within(None, key.limits.budgets, &key.usage, day, month, amount)
    {
        adm.rollback();
        return Err(refused(r));
    }
    adm.reservations[0] = Some((Arc::clone(&key.account), amount));
    if let Some(app) = app {
        if let Err(r) =
            app.account
                .try_reserve_within(None, app.limits.budgets, &app.usage, day, month, amount)
        {
            adm.rollback();
            let message = match r {
                ReserveRefusal::BudgetMonth => "The application's month budget is exhausted.",
                _ => "The application's day budget is exhausted.",
            };
            return Err(Refusal {
                message: Some(message),
                ..refused(r)
            });
        }
        adm.reservations[1] = Some((Arc::clone(&app.account), amount));
    }
    if let Err(r) = org.account.try_reserve_within(
        Some((org.balance, org.spent_mark)),
        org.limits.budgets,
        &org.usage,
        day,
        month,
        amount,
    ) {
        adm.rollback();
        return Err(refused(r));
    }
    Ok(adm)
}

/// Civil date of a day number (days since 1970-01-01), as (year, month 1..=12, day).
fn civil(day: i64) -> (i64, u32, u32) {
    // Howard Hinnant's days_from_civil inverse.
    let z = day + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (
        y,
        u32::try_from(m).unwrap_or(1),
        u32::try_from(d).unwrap_or(1),
    )
}

/// `YYYYMMDD` (UTC) of a day number, for the names of the shared day totals.
pub(crate) fn yyyymmdd(day: i64) -> i64 {
    let (y, m, d) = civil(day);
    y * 10_000 + i64::from(m) * 100 + i64::from(d)
}

/// `YYYYMM` (UTC) of a day number, the `usage.month` encoding.
pub(crate) fn month_of_day(day: i64) -> i32 {
    let (y, m, _) = civil(day);
    i32::try_from(y * 100 + i64::from(m)).unwrap_or(i32::MAX)
}

/// Day number of the first day of the month after the one holding `day`.
fn next_month_start(day: i64) -> i64 {
    let (_, _, d) = civil(day);
    // Jump past the end of this month, then back to day 1 of the next one.
    let later = day - i64::from(d) + 32;
    let (_, _, d2) = civil(later);
    later - i64::from(d2) + 1
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    const S: u64 = 1_000_000_000;

    fn ok(t: Take) -> bool {
        matches!(t, Take::Ok { .. })
    }

    /// A limiter that has just admitted `n` single units at `now` under `limit`.
    fn admitted(n: usize, now: u64, limit: u32) -> Gcra {
        let g = Gcra::default();
        for _ in 0..n {
            assert!(ok(g.try_take(now, 1, limit)));
        }
        g
    }

    fn wait(t: Take) -> Option<u64> {
        match t {
            Take::Wait { retry_ns } => Some(retry_ns),
            Take::Ok { .. } => None,
        }
    }

    #[test]
    fn gcra_allows_the_limit_then_refills_smoothly() {
        let t0 = 1_000 * S;
        // rpm 60: 60 at once, the 61st waits exactly one emission interval (1 s).
        let g = admitted(60, t0, 60);
        assert_eq!(wait(g.try_take(t0, 1, 60)), Some(S), "61st admitted");
        // Just before the refill: still refused; at it: one passes, and only one.
        assert!(!ok(g.try_take(t0 + S - 1, 1, 60)));
        assert!(ok(g.try_take(t0 + S, 1, 60)));
        assert!(!ok(g.try_take(t0 + S, 1, 60)));
    }

    #[test]
    fn no_double_burst_across_a_minute_boundary() {
        // A fixed window would admit 60 at 0:59.9 and 60 more at 1:00.0. GCRA admits the
        // first 60 and then one per second.
        let g = Gcra::default();
        let edge = 60 * S;
        let mut admitted = 0;
        for i in 0..200u64 {
            // 200 attempts spread over 0.2 s around the boundary.
            if ok(g.try_take(edge - S / 10 + i * S / 1000, 1, 60)) {
                admitted += 1;
            }
        }
        assert_eq!(admitted, 60);
        // Over the next minute at most one per second gets through.
        let mut later = 0;
        for ms in 0..60_000u64 {
            if ok(g.try_take(edge + S / 10 + ms * S / 1000, 1, 60)) {
                later += 1;
            }
        }
        assert!((59..=61).contains(&later), "{later}");
    }

    #[test]
    fn tokens_oversized_requests_refunds_and_debt() {
        let g = Gcra::default();
        let t0 = 10 * S;
        // Larger than the whole budget: charged as the whole budget, only when full.
        assert!(ok(g.try_take(t0, 5_000, 1_000)));
        assert!(!ok(g.try_take(t0, 1, 1_000)));
        g.refund(1_000);
        assert!(ok(g.try_take(t0, 1_000, 1_000)));
        // Debt beyond a full period delays even a 1-token request until it is paid off.
        g.charge(t0, 500);
        assert_eq!(
            wait(g.try_take(t0, 1, 1_000)),
            Some(30 * S + increment(1, 1_000)),
            "admitted in debt"
        );
        let (left, reset) = g.status(t0, 1_000);
        assert_eq!((left, reset), (0, 90 * S));
    }

    #[test]
    fn status_counts_remaining_units() {
        let t0 = 5 * S;
        let g = admitted(10, t0, 600);
        assert_eq!(g.status(t0, 600), (590, S));
    }

    #[test]
    fn a_changed_limit_keeps_the_count_used() {
        let t0 = 5 * S;
        let g = admitted(4, t0, 4);
        assert!(!ok(g.try_take(t0, 1, 4)));
        // Raised: 4 of 600 used, admitted at once.
        assert!(ok(g.try_take(t0, 1, 600)));
        assert_eq!(g.status(t0, 600), (595, S / 2));
        // Lowered below the 5 used: refused until 3 have drained at the new rate.
        assert_eq!(
            wait(g.try_take(t0, 1, 2)),
            Some(120 * S),
            "admitted over a lowered limit"
        );
    }

    #[test]
    fn concurrent_takes_never_exceed_the_budget() {
        let g = Arc::new(Gcra::default());
        let now = 77 * S;
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let g = g.clone();
                std::thread::spawn(move || {
                    (0..1000).filter(|_| ok(g.try_take(now, 1, 500))).count()
                })
            })
            .collect();
        let total: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(total, 500);
    }

    /// A compiled snapshot of org `o` with application `a` (`limits`, spend so far
    /// `spent_day` on day [`APP_DAY`]), keys `k1` and `k2` in it and `k3` outside it.
    fn app_snapshot(limits: &str, spent_day: i64) -> crate::snapshot::Snapshot {
        let key = |n: u8, app: &str| {
            format!(
                r#"{{"hash":"{h}","key_id":"k{n}","display":"d","org_id":"o","account_id":"acc",
                "status":"active","expires_at":null,"allowed_models":null,"application_id":{app}}}"#,
                h = format!("{n:02x}").repeat(32),
            )
        };
        let month = month_of_day(APP_DAY);
        let doc = format!(
            r#"{{"version":1,
            "orgs":[{{"id":"o","status":"active","balance":1000000000,"spent_mark":0}}],
            "applications":[{{"id":"a","org_id":"o","limits":{limits},
              "usage":{{"day":{APP_DAY},"month":{month},"spent_day":{spent_day},"spent_month":{spent_day},"spent_mark":0}}}}],
            "keys":[{},{},{}],"providers":[],"models":[]}}"#,
            key(1, "\"a\""),
            key(2, "\"a\""),
            key(3, "null"),
        );
        let doc = crate::snapshot::parse(doc.as_bytes()).unwrap();
        let (snap, dropped) = crate::snapshot::Snapshot::compile(
            doc,
            &mut LiveCounters::default(),
            &crate::upstream::ClientCache::default(),
        );
        assert!(dropped.is_empty(), "{dropped:?}");
        snap
    }

    const APP_DAY: i64 = 20_794;

    fn key<'a>(snap: &'a crate::snapshot::Snapshot, id: &str) -> &'a Key {
        snap.keys.values().find(|k| k.key_id == id).unwrap()
    }

    fn admit_app(
        snap: &crate::snapshot::Snapshot,
        id: &str,
        amount: i64,
    ) -> Result<Admission, Refusal> {
        admit_at(key(snap, id), 10, amount, 500 * S, APP_DAY * 86_400 + 3_600)
    }

    #[test]
    fn an_application_rate_limit_counts_all_its_keys_and_no_other() {
        let snap = app_snapshot(r#"{"rpm":2}"#, 0);
        assert!(admit_app(&snap, "k1", 0).is_ok());
        assert!(admit_app(&snap, "k2", 0).is_ok());
        let refused = admit_app(&snap, "k1", 0).err().unwrap();
        assert_eq!(refused.error, ApiError::RateLimited);
        assert!(
            refused
                .message
                .unwrap()
                .contains("application's requests-per-minute"),
            "{refused:?}"
        );
        assert_eq!(
            refused.requests.map(|r| r.0),
            Some(2),
            "the application's limit in headers"
        );
        assert!(
            admit_app(&snap, "k2", 0).is_err(),
            "the other key shares it"
        );
        // A key outside the application is not affected.
        for _ in 0..5 {
            assert!(admit_app(&snap, "k3", 0).is_ok());
        }
    }

    #[test]
    fn an_application_concurrency_limit_holds_across_keys() {
        let snap = app_snapshot(r#"{"concurrency":1}"#, 0);
        let held = admit_app(&snap, "k1", 0).unwrap();
        let refused = admit_app(&snap, "k2", 0).err().unwrap();
        assert_eq!(refused.error, ApiError::ConcurrencyLimited);
        assert!(refused.message.unwrap().contains("application"));
        // The refusal gave back the key's own slot.
        assert_eq!(
            key(&snap, "k2").limiter.in_flight.load(Ordering::Acquire),
            0
        );
        drop(held);
        assert!(admit_app(&snap, "k2", 0).is_ok());
    }

    #[test]
    fn an_application_budget_is_shared_and_exact() {
        // 40 of 100 spent today already (the ledger's figure).
        let snap = app_snapshot(r#"{"budget_day":100}"#, 40);
        let mut first = admit_app(&snap, "k1", 50).unwrap();
        let refused = admit_app(&snap, "k2", 11).err().unwrap();
        assert_eq!(refused.error, ApiError::BudgetExceeded);
        assert_eq!(
            refused.message,
            Some("The application's day budget is exhausted.")
        );
        // The key's reservation taken before the application refused was given back.
        assert_eq!(key(&snap, "k2").account.totals(), (0, 0));
        assert!(refused.retry_after_s.is_some());
        // Settling below the reservation frees the rest: 40 + 30 spent, 30 left exactly.
        first.settle(30, 10);
        assert!(admit_app(&snap, "k2", 31).is_err());
        let mut second = admit_app(&snap, "k2", 30).unwrap();
        second.settle(30, 10);
        assert_eq!(
            key(&snap, "k1")
                .application
                .as_ref()
                .unwrap()
                .account
                .totals(),
            (60, 0)
        );
        assert!(admit_app(&snap, "k1", 1).is_err());
        // Outside the application: only the org's balance applies.
        assert!(admit_app(&snap, "k3", 1_000).is_ok());
    }

    #[test]
    fn parallel_requests_never_overspend_an_application_budget() {
        let snap = Arc::new(app_snapshot(r#"{"budget_day":10000}"#, 0));
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let snap = Arc::clone(&snap);
                std::thread::spawn(move || {
                    let id = if t % 2 == 0 { "k1" } else { "k2" };
                    let mut admitted = 0i64;
                    for _ in 0..1000 {
                        if let Ok(mut adm) = admit_app(&snap, id, 7) {
                            adm.settle(7, 1);
                            admitted += 1;
                        }
                    }
                    admitted
                })
            })
            .collect();
        let admitted: i64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
        // Exactly as many as fit: 10000 / 7, never one more.
        assert_eq!(admitted, 10_000 / 7);
        let app = key(&snap, "k1").application.clone().unwrap();
        assert_eq!(app.account.totals(), (7 * (10_000 / 7), 0));
    }

    #[test]
    fn durations_and_calendar() {
        let f = |ns| {
            let mut s = String::new();
            write_duration(&mut s, ns);
            s
        };
        assert_eq!(f(20_000_000), "20ms");
        assert_eq!(f(1), "1ms");
        assert_eq!(f(S), "1s");
        assert_eq!(f(1_500 * 1_000_000), "1.5s");
        assert_eq!(f(360 * S), "6m0s");
        assert_eq!(retry_secs(1), 1);
        assert_eq!(retry_secs(S + 1), 2);
        // 2026-11-30 is day 20_787; the fixture's usage day 20_784 is 2026-11-27.
        assert_eq!(civil(0), (1970, 1, 1));
        assert_eq!(month_of_day(20_784), 202_611);
        assert_eq!(civil(20_787), (2026, 11, 30));
        assert_eq!(civil(next_month_start(20_784)), (2026, 12, 1));
        assert_eq!(civil(next_month_start(20_818)), (2027, 1, 1));
        // Leap day.
        assert_eq!(civil(next_month_start(19_782)), (2024, 3, 1));
        assert_eq!(civil(19_782), (2024, 2, 29));
    }
}
