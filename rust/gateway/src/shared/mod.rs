//! Limits and money shared across gateways through Redis (docs/scale-out.md).
//!
//! Requests never talk to Redis: each live state (an org's money, a key's or org's rpm,
//! tpm and concurrency, spend for budgets) holds a lease that a background refiller keeps
//! ahead of demand and gives back when idle. A request whose lease is short wakes the
//! refiller and waits for it at most `wait_ms`; past that it is refused as the limit
//! refuses (402 for money when Redis answered; 503 `shared_state_unavailable` when it did
//! not: money fails closed beyond the lease already held). With Redis down, rates,
//! concurrency and budgets fall back to this gateway's share of the limit.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;
use tokio::sync::Notify;

use crate::billing::OrgAccount;
use crate::config::SharedConfig;
use crate::limits::{mono_ns, month_of_day, unix_now, yyyymmdd, LimitState, RateKind};

/// Heartbeats older than this many refill intervals no longer count a gateway as live.
const LIVE_INTERVALS: u64 = 30;

/// The live state the refiller looks after, listed afresh for each pass.
#[derive(Default)]
pub(crate) struct Scopes {
    /// Org accounts by org id (money).
    pub(crate) orgs: Vec<(String, Arc<OrgAccount>)>,
    /// Rate and concurrency state by hash tag (`k:<key id>`, `a:<application id>`, `o:<org id>`).
    pub(crate) limits: Vec<(String, Arc<LimitState>)>,
    /// Spend counters of keys, applications and orgs by hash tag, for budgets.
    pub(crate) spend: Vec<(String, Arc<OrgAccount>)>,
}

/// Shared-limits state of one engine: the configuration, Redis' health as last seen, the
/// refiller's wake-up and the waiters' notification, and the counters `/metrics` shows.
pub(crate) struct SharedLimits {
    pub(crate) config: SharedConfig,
    instance: String,
    /// The last round trip to Redis succeeded.
    up: AtomicBool,
    /// A request found its lease short: refill now rather than at the next tick.
    wake: Notify,
    /// A refill pass ended: requests waiting for their lease look again.
    refilled: Notify,
    /// Passes begun and ended: a waiter wants a pass that began after it asked, since one
    /// already under way may have read Redis before the change the waiter needs.
    passes_begun: AtomicU64,
    passes_ended: AtomicU64,
    pub(crate) round_trips: AtomicU64,
    pub(crate) round_trip_us: AtomicU64,
    pub(crate) round_trip_errors: AtomicU64,
    pub(crate) waits: AtomicU64,
    /// Requests refused because the lease ran out while Redis was unreachable.
    pub(crate) balance_fallbacks: AtomicU64,
    /// Key or org slot leases set to this gateway's share because Redis did not answer.
    pub(crate) slot_fallbacks: AtomicU64,
    /// Key or org rate leases refilled locally at this gateway's share, the same way.
    pub(crate) rate_fallbacks: AtomicU64,
    /// Gateways with a recent heartbeat, as last counted.
    pub(crate) live_gateways: AtomicU64,
}

/// The figures `/metrics` shows.
pub(crate) struct SharedGauges {
    pub(crate) up: bool,
    pub(crate) round_trips: u64,
    pub(crate) round_trip_seconds: f64,
    pub(crate) round_trip_errors: u64,
    pub(crate) waits: u64,
    pub(crate) balance_fallbacks: u64,
    pub(crate) slot_fallbacks: u64,
    pub(crate) rate_fallbacks: u64,
    pub(crate) live_gateways: u64,
}

impl SharedLimits {
    pub(crate) fn new(config: SharedConfig, instance: &str) -> Self {
        SharedLimits {
            config,
            instance: instance.to_owned(),
            up: AtomicBool::new(false),
            wake: Notify::new(),
            refilled: Notify::new(),
            passes_begun: AtomicU64::new(0),
            passes_ended: AtomicU64::new(0),
            round_trips: AtomicU64::new(0),
            round_trip_us: AtomicU64::new(0),
            round_trip_errors: AtomicU64::new(0),
            waits: AtomicU64::new(0),
            balance_fallbacks: AtomicU64::new(0),
            slot_fallbacks: AtomicU64::new(0),
            rate_fallbacks: AtomicU64::new(0),
            live_gateways: AtomicU64::new(0),
        }
    }

    pub(crate) fn up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    pub(crate) fn gauges(&self) -> SharedGauges {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        SharedGauges {
            up: self.up(),
            round_trips: load(&self.round_trips),
            // Exact below 2^53 µs.
            round_trip_seconds: load(&self.round_trip_us) as f64 / 1e6,
            round_trip_errors: load(&self.round_trip_errors),
            waits: load(&self.waits),
            balance_fallbacks: load(&self.balance_fallbacks),
            slot_fallbacks: load(&self.slot_fallbacks),
            rate_fallbacks: load(&self.rate_fallbacks),
            live_gateways: load(&self.live_gateways),
        }
    }

    /// The latest a request whose lease is short at `start` may wait for refills.
    pub(crate) fn wait_deadline(&self, start: Instant) -> Instant {
        start + Duration::from_millis(self.config.wait_ms)
    }

    /// Wake the refiller and wait until a pass that began after this call has ended, at
    /// most until `deadline`.
    pub(crate) async fn wait_for_refill(&self, deadline: Instant) {
        let wanted = self.passes_begun.load(Ordering::Acquire) + 1;
        self.wake.notify_one();
        loop {
            let refilled = self.refilled.notified();
            tokio::pin!(refilled);
            // Registered before the check, so a pass that ends in between is not missed.
            refilled.as_mut().enable();
            if self.passes_ended.load(Ordering::Acquire) >= wanted {
                return;
            }
            if tokio::time::timeout_at(deadline.into(), refilled)
                .await
                .is_err()
            {
                return;
            }
        }
    }

    fn org_key(&self, org: &str, what: &str) -> String {
        format!("{}{{o:{org}}}:{what}", self.config.key_prefix)
    }

    /// This gateway's share of a limit while Redis is down: `limit / live gateways`
    /// (as last counted), rounded down, so the shares of all gateways sum to at most the
    /// limit.
    fn share(&self, limit: u32) -> u32 {
        let live = self.live_gateways.load(Ordering::Relaxed).max(1);
        u32::try_from(u64::from(limit) / live).unwrap_or(limit)
    }
}

/// The refiller: one pass every `refill_interval_ms`, or at once when a request wakes it.
/// Runs on the engine's runtime until it shuts down. `scopes` lists the live state.
pub(crate) async fn refiller<F>(limits: Arc<SharedLimits>, mut scopes: F)
where
    F: FnMut() -> Arc<Scopes> + Send + 'static,
{
    let scripts = Scripts::load();
    let mut last_pass = Instant::now();
    let interval = Duration::from_millis(limits.config.refill_interval_ms);
    let timeout = Duration::from_millis(limits.config.timeout_ms);
    let mut conn: Option<ConnectionManager> = None;
    let mut next_tick = Instant::now();
    loop {
        let scheduled = tokio::select! {
            () = tokio::time::sleep_until(next_tick.into()) => true,
            () = limits.wake.notified() => false,
        };
        if scheduled {
            next_tick = Instant::now() + interval;
        }
        if conn.is_none() {
            conn = connect(&limits.config.redis_url, timeout).await;
        }
        let pass_number = limits.passes_begun.fetch_add(1, Ordering::AcqRel) + 1;
        let scopes = scopes();
        let elapsed_ms = u64::try_from(last_pass.elapsed().as_millis()).unwrap_or(u64::MAX);
        last_pass = Instant::now();
        let ok = match conn.as_mut() {
            Some(c) => {
                let pass = Pass {
                    limits: &limits,
                    conn: c,
                    scripts: &scripts,
                };
                pass.run(&scopes, scheduled).await
            }
            None => false,
        };
        if !ok {
            limits.round_trip_errors.fetch_add(1, Ordering::Relaxed);
            // Slots, rates and budgets fall back to this gateway's share; money keeps the
            // lease it holds.
            let live = limits.live_gateways.load(Ordering::Relaxed);
            for (_, account) in &scopes.spend {
                account.spend_push_failed(live);
            }
            for (_, state) in &scopes.limits {
                for kind in [RateKind::Requests, RateKind::Tokens] {
                    if state.rate_fallback(kind, |l| limits.share(l), elapsed_ms) {
                        limits.rate_fallbacks.fetch_add(1, Ordering::Relaxed);
                    }
                }
                if let Some((_, lease)) = state.slot_demand(false) {
                    if lease.limit > 0 {
                        state.set_slots(limits.share(lease.limit), false);
                        limits.slot_fallbacks.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        limits.up.store(ok, Ordering::Relaxed);
        limits.passes_ended.store(pass_number, Ordering::Release);
        limits.refilled.notify_waiters();
    }
}

async fn connect(url: &str, timeout: Duration) -> Option<ConnectionManager> {
    let client = redis::Client::open(url).ok()?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(1)
        .set_max_delay(timeout);
    tokio::time::timeout(timeout, ConnectionManager::new_with_config(client, config))
        .await
        .ok()?
        .ok()
}

struct Scripts {
    grow: Script,
    shrink: Script,
    slots: Script,
    rate: Script,
    spend: Script,
    heartbeat: Script,
}

impl Scripts {
    fn load() -> Self {
        Scripts {
            grow: Script::new(include_str!("money_grow.lua")),
            shrink: Script::new(include_str!("money_shrink.lua")),
            slots: Script::new(include_str!("slots_acquire.lua")),
            rate: Script::new(include_str!("rate_take.lua")),
            spend: Script::new(include_str!("spend_push.lua")),
            heartbeat: Script::new(include_str!("heartbeat.lua")),
        }
    }
}

/// One refill pass over every leased scope.
struct Pass<'a> {
    limits: &'a SharedLimits,
    conn: &'a mut ConnectionManager,
    scripts: &'a Scripts,
}

impl Pass<'_> {
    /// Heartbeat (on scheduled ticks), then top up or give back each lease. `false` when
    /// a round trip failed.
    async fn run(mut self, scopes: &Scopes, scheduled: bool) -> bool {
        if scheduled && !self.heartbeat().await {
            return false;
        }
        for (org, account) in &scopes.orgs {
            if !self.refill(org, account, scheduled).await {
                return false;
            }
        }
        if scheduled {
            let day = unix_now().div_euclid(86_400);
            for (tag, account) in &scopes.spend {
                if !self.spend(tag, account, day).await {
                    return false;
                }
            }
        }
        for (tag, state) in &scopes.limits {
            if !self.slots(tag, state, scheduled).await {
                return false;
            }
            for kind in [RateKind::Requests, RateKind::Tokens] {
                if !self.rate(tag, state, kind, scheduled).await {
                    return false;
                }
            }
        }
        true
    }

    /// Send the spend settled since the last push to the day and month totals and read
    /// them back (accounts with a budget only).
    async fn spend(&mut self, tag: &str, account: &OrgAccount, day: i64) -> bool {
        let Some(n) = account.spend_push_start() else {
            return true;
        };
        let month = month_of_day(day);
        let prefix = &self.limits.config.key_prefix;
        let mut inv = self
            .scripts
            .spend
            .key(format!("{prefix}{{{tag}}}:spend:d:{}", yyyymmdd(day)));
        inv.key(format!("{prefix}{{{tag}}}:spend:m:{month}")).arg(n);
        let reply: Option<(i64, i64)> = self.invoke(inv).await;
        let Some((global_day, global_month)) = reply else {
            return false;
        };
        account.spend_push_done(day, month, global_day, global_month);
        true
    }

    /// Keep units leased ahead of demand: twice the units used in the last interval, or
    /// what waiting requests need, at most `limit / live gateways` (or the largest single
    /// request waiting); give back units of an idle scope and units older than `lease_ttl_ms`;
    /// send the tokens used above what was taken.
    async fn rate(
        &mut self,
        tag: &str,
        state: &LimitState,
        kind: RateKind,
        scheduled: bool,
    ) -> bool {
        let now = mono_ns();
        let ttl_ns = self.limits.config.lease_ttl_ms.saturating_mul(1_000_000);
        let Some((seen, back, debt)) = state.rate_demand(kind, scheduled, now, ttl_ns) else {
            return true;
        };
        if seen.limit == 0 {
            return true;
        }
        let limit = u64::from(seen.limit);
        // Waiting requests in numbers do not raise the share (the other gateways are owed
        // theirs); one request bigger than the share does, or it could never pass.
        let cap = u64::from(self.limits.share(seen.limit))
            .max(seen.biggest)
            .clamp(1, limit);
        let demand = seen
            .used
            .saturating_mul(2)
            .max(seen.used.saturating_add(seen.short));
        let avail = seen.avail - back;
        let want = demand.min(cap).saturating_sub(avail);
        if want == 0 && back == 0 && debt == 0 {
            return true;
        }
        let Some(granted) = self
            .take_rate(tag, kind, seen.limit, want, back, debt)
            .await
        else {
            state.rate_owe(kind, debt);
            return false;
        };
        state.rate_grant(kind, granted, granted < want, now);
        true
    }

    /// Hold the slots in flight plus one spare (or what waiting requests need), within
    /// the limit less what the other live instances hold; refresh their expiry every
    /// scheduled tick; give them all back when the scope is idle.
    async fn slots(&mut self, tag: &str, state: &LimitState, scheduled: bool) -> bool {
        let Some((in_flight, lease)) = state.slot_demand(scheduled) else {
            return true;
        };
        if lease.limit == 0 {
            return true;
        }
        let busy = lease.peak.max(in_flight.saturating_add(lease.short));
        let target = if busy == 0 {
            0
        } else {
            lease.limit.min(busy.saturating_add(1))
        };
        if target == 0 && lease.granted == 0 {
            return true;
        }
        // A wake-up pass only grows; shrinking and refreshing wait for a scheduled one.
        if !scheduled && target <= lease.granted {
            return true;
        }
        if target < lease.granted {
            state.lower_slots(target);
        }
        let Some(granted) = self.hold_slots(tag, target, in_flight, lease.limit).await else {
            return false;
        };
        state.set_slots(granted, granted < target);
        true
    }

    /// Time one round trip into the metrics.
    /// Run one script, counting the round trip and its time; `None` when Redis did not
    /// answer in time (or answered an error).
    async fn invoke<T: redis::FromRedisValue>(
        &self,
        inv: redis::ScriptInvocation<'_>,
    ) -> Option<T> {
        let mut conn = self.conn.clone();
        let start = Instant::now();
        let out = inv.invoke_async(&mut conn).await;
        let us = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.limits.round_trips.fetch_add(1, Ordering::Relaxed);
        self.limits.round_trip_us.fetch_add(us, Ordering::Relaxed);
        out.ok()
    }

    /// The rate script on scope `tag`: take `want` units of the global bucket, give back
    /// `back` unused ones and charge `debt` owed; the units granted.
    async fn take_rate(
        &self,
        tag: &str,
        kind: RateKind,
        limit: u32,
        want: u64,
        back: u64,
        debt: u64,
    ) -> Option<u64> {
        let what = match kind {
            RateKind::Requests => "rpm",
            RateKind::Tokens => "tpm",
        };
        let key = format!("{}{{{tag}}}:{what}", self.limits.config.key_prefix);
        let mut inv = self.scripts.rate.key(key);
        inv.arg(limit).arg(want).arg(back).arg(debt);
        self.invoke(inv).await
    }

    /// The slots script on scope `tag`: hold `target` slots (`in_flight` of them in use)
    /// within `limit` less the other live instances' slots; the slots granted.
    async fn hold_slots(&self, tag: &str, target: u32, in_flight: u32, limit: u32) -> Option<u32> {
        let key = format!("{}{{{tag}}}:conc", self.limits.config.key_prefix);
        let mut inv = self.scripts.slots.key(key);
        inv.arg(&self.limits.instance)
            .arg(target)
            .arg(in_flight)
            .arg(limit)
            .arg(self.limits.config.lease_ttl_ms);
        let reply: Option<(u32, u32)> = self.invoke(inv).await;
        reply.map(|(granted, _others)| granted)
    }

    /// Say this instance is live and count the live ones (a sorted set scored by
    /// heartbeat time on Redis' clock).
    async fn heartbeat(&mut self) -> bool {
        let key = format!("{}gateways", self.limits.config.key_prefix);
        let ttl_ms = self.limits.config.refill_interval_ms * LIVE_INTERVALS;
        let mut inv = self.scripts.heartbeat.key(key);
        inv.arg(&self.limits.instance).arg(ttl_ms);
        let live: Option<u64> = self.invoke(inv).await;
        match live {
            Some(n) => {
                self.limits.live_gateways.store(n, Ordering::Relaxed);
                true
            }
            None => false,
        }
    }

    /// Keep headroom ahead of demand: twice the money reserved in a recent busy interval
    /// (a decaying peak), and at least what the requests waiting on the lease need. An org
    /// that reserved nothing for `IDLE_TICKS_BEFORE_SHRINK` intervals gives its headroom
    /// back.
    async fn refill(&mut self, org: &str, account: &OrgAccount, scheduled: bool) -> bool {
        let Some((spent, reserved, lease)) = account.lease_demand(scheduled) else {
            return true;
        };
        let used = spent.saturating_add(reserved);
        let headroom = lease.hold.saturating_sub(used);
        let target = lease
            .peak
            .max(lease.flow)
            .saturating_mul(2)
            .max(lease.short.saturating_add(lease.flow));
        if target > headroom {
            let want = target - headroom;
            let mut inv = self.scripts.grow.key(self.limits.org_key(org, "cap"));
            inv.key(self.limits.org_key(org, "hold"))
                .arg(&self.limits.instance)
                .arg(want)
                .arg(lease.hold);
            let reply: Option<(i64, i64)> = self.invoke(inv).await;
            let Some((granted, hold)) = reply else {
                return false;
            };
            account.grant(hold, granted < want);
        } else if scheduled && lease.idle_ticks >= crate::billing::IDLE_TICKS_BEFORE_SHRINK {
            return self.shrink_money(org, account).await;
        }
        true
    }

    /// Give back the money headroom of an org's lease.
    async fn shrink_money(&mut self, org: &str, account: &OrgAccount) -> bool {
        let Some(hold) = account.shrink() else {
            return true;
        };
        let mut inv = self.scripts.shrink.key(self.limits.org_key(org, "hold"));
        inv.arg(&self.limits.instance).arg(hold);
        let reply: Option<i64> = self.invoke(inv).await;
        // Lowered locally already: a lost reply leaves Redis counting more than this
        // instance may use, which is slack, never overspend.
        reply.is_some()
    }

    /// Stopping: hand back every spare slot and every unused rate unit of a scope.
    async fn release_limits(&mut self, tag: &str, state: &LimitState) {
        if let Some((in_flight, lease)) = state.slot_demand(false) {
            if lease.limit > 0 && lease.granted > 0 {
                state.lower_slots(0);
                self.hold_slots(tag, in_flight, in_flight, lease.limit)
                    .await;
            }
        }
        for kind in [RateKind::Requests, RateKind::Tokens] {
            let Some((limit, back, debt)) = state.rate_release(kind) else {
                continue;
            };
            self.take_rate(tag, kind, limit, 0, back, debt).await;
        }
    }
}

/// On a graceful stop, once requests have drained: hand back what the leases hold beyond
/// what was spent or is still in flight (money headroom, spare slots, unused rate units),
/// so the other gateways can use it at once instead of after it lapses or the control
/// plane retires this instance. Best effort: Redis may be down.
pub(crate) async fn release(limits: &SharedLimits, scopes: Scopes) {
    let timeout = Duration::from_millis(limits.config.timeout_ms);
    let Some(mut conn) = connect(&limits.config.redis_url, timeout).await else {
        return;
    };
    let scripts = Scripts::load();
    let mut pass = Pass {
        limits,
        conn: &mut conn,
        scripts: &scripts,
    };
    for (org, account) in &scopes.orgs {
        if !pass.shrink_money(org, account).await {
            return;
        }
    }
    for (tag, state) in &scopes.limits {
        pass.release_limits(tag, state).await;
    }
}
