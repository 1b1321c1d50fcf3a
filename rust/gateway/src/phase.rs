//! CPU time of the request path by phase (`phase_timing`): the thread CPU clock read
//! around each phase's synchronous work, so a profile of the hot path needs no sampler.
//! Off by default; off, a phase costs one branch and reads no clock.
//!
//! A phase that awaits is measured poll by poll, so time spent waiting (for the body,
//! for the upstream) is not counted, only the work done when it runs. Work outside the
//! phases (hyper reading and writing the connection, the upstream connection's own task)
//! is not attributed: the process's CPU minus the sum of the phases.

use std::fmt::Write;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::Duration;

use cpu_time::ThreadTime;

use crate::engine::Shared;
use crate::trace::PhaseSpan;

/// Declares the phases once: the enum, [`Phase::ALL`] and [`PHASE_NAMES`] in request
/// order.
macro_rules! phases {
    ($($(#[$doc:meta])* $variant:ident => $name:literal,)*) => {
        /// The phases of one request, in the order they run.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub(crate) enum Phase {
            $($(#[$doc])* $variant,)*
        }

        /// The phases' names in `/metrics`, in request order (the order of [`Phase`]).
        pub const PHASE_NAMES: [&str; 8] = [$($name,)*];

        impl Phase {
            pub(crate) const ALL: [Phase; 8] = [$(Phase::$variant,)*];
        }
    };
}

phases! {
    /// The endpoint, the request head, loops and blocked addresses.
    Admit => "admit",
    /// The API key and what it may do.
    Authenticate => "authenticate",
    /// The body: parsed, checked, the model and the deployments it may reach, the guard.
    Route => "route",
    /// Token estimates, limits, budgets and the balance reservation.
    Reserve => "reserve",
    /// Upstream attempts until one answers.
    Forward => "forward",
    /// The answer to the client: collected and metered, or each poll of a stream.
    Relay => "relay",
    /// The cost, charged against what was reserved.
    Settle => "settle",
    /// The call record, built and written.
    Record => "record",
}

impl Phase {
    pub(crate) fn as_str(self) -> &'static str {
        PHASE_NAMES[self as usize]
    }
}

/// CPU nanoseconds spent in each phase, over every request.
#[derive(Default)]
pub(crate) struct PhaseCpu {
    ns: [AtomicU64; Phase::ALL.len()],
}

impl PhaseCpu {
    /// Charge the CPU time since `from` to `phase`, less `nested` nanoseconds that a
    /// phase run inside it has already counted; returns the time charged (0 when `from`
    /// was taken with timing off).
    pub(crate) fn charge(&self, phase: Phase, from: Mark, nested: u64) -> u64 {
        self.charge_until(phase, from, nested).0
    }

    /// As `charge`, also returning the reading that ended the phase, so a phase that
    /// follows at once can start from it instead of reading the clock again.
    pub(crate) fn charge_until(&self, phase: Phase, from: Mark, nested: u64) -> (u64, Mark) {
        let Some(from) = from.0 else {
            return (0, Mark(None));
        };
        let Some(now) = thread_cpu() else {
            return (0, Mark(None));
        };
        let ns = u64::try_from(now.saturating_sub(from).as_nanos())
            .unwrap_or(u64::MAX)
            .saturating_sub(read_cost_ns())
            .saturating_sub(nested);
        self.ns[phase as usize].fetch_add(ns, Ordering::Relaxed);
        (ns, Mark(Some(now)))
    }

    pub(crate) fn seconds(&self, phase: Phase) -> f64 {
        self.ns[phase as usize].load(Ordering::Relaxed) as f64 / 1e9
    }

    pub(crate) fn render(&self, out: &mut String) {
        let name = "onetoken_phase_cpu_seconds_total";
        let _ = writeln!(
            out,
            "# HELP {name} Thread CPU time of the request path by phase (0 unless phase_timing)."
        );
        let _ = writeln!(out, "# TYPE {name} counter");
        for p in Phase::ALL {
            let _ = writeln!(
                out,
                "{name}{{phase=\"{}\"}} {}",
                p.as_str(),
                self.seconds(p)
            );
        }
    }
}

/// A reading of the thread CPU clock, taken only when timing is on.
#[derive(Clone, Copy, Default)]
pub(crate) struct Mark(Option<Duration>);

impl Mark {
    pub(crate) fn now(timing: bool) -> Mark {
        Mark(if timing { thread_cpu() } else { None })
    }
}

/// The phase counters of an engine and whether `phase_timing` is on, for the phases of
/// one request.
pub(crate) struct PhaseClock<'a> {
    cpu: &'a PhaseCpu,
    on: bool,
    /// The reading that ended the previous phase when the next one follows in the same
    /// poll: it starts there, so back-to-back phases cost one clock read each, not two
    /// (a read is a system call, about a microsecond on a virtual machine).
    last: Mark,
    /// The phases' wall-clock spans, when the request is traced.
    pub(crate) spans: Option<Vec<PhaseSpan>>,
}

impl<'a> PhaseClock<'a> {
    pub(crate) fn new(shared: &'a Shared, traced: bool) -> Self {
        PhaseClock {
            cpu: &shared.metrics.phase_cpu,
            on: shared.config.phase_timing,
            last: Mark(None),
            spans: traced.then(|| Vec::with_capacity(Phase::ALL.len())),
        }
    }

    /// A traced phase ends: its span closes now.
    fn close(&mut self, span: Option<PhaseSpan>) {
        if let (Some(spans), Some(mut span)) = (self.spans.as_mut(), span) {
            span.end = std::time::Instant::now();
            spans.push(span);
        }
    }

    fn start(&mut self) -> Mark {
        match std::mem::take(&mut self.last) {
            Mark(Some(t)) => Mark(Some(t)),
            Mark(None) => Mark::now(self.on),
        }
    }

    /// Run a synchronous phase.
    pub(crate) fn time<T>(&mut self, phase: Phase, f: impl FnOnce() -> T) -> T {
        let span = self
            .spans
            .is_some()
            .then(|| PhaseSpan::open(phase.as_str()));
        let from = self.start();
        let out = f();
        self.last = self.cpu.charge_until(phase, from, 0).1;
        self.close(span);
        out
    }

    /// Run a phase that awaits, timing each poll.
    pub(crate) fn timed<F: Future>(&mut self, phase: Phase, fut: F) -> Timed<'_, 'a, F> {
        Timed {
            clock: self,
            phase,
            span: None,
            fut,
        }
    }
}

pin_project_lite::pin_project! {
    /// A phase that awaits, timed poll by poll. The time between polls is another task's,
    /// so only a poll that completes hands its reading on. A struct rather than an async
    /// fn: the phase's future lives here once, instead of once as the argument and again
    /// pinned, which made every request copy kilobytes of future state.
    pub(crate) struct Timed<'c, 'a, F> {
        clock: &'c mut PhaseClock<'a>,
        phase: Phase,
        // Opened at the first poll of a traced request.
        span: Option<PhaseSpan>,
        #[pin]
        fut: F,
    }
}

impl<F: Future> Future for Timed<'_, '_, F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        if this.clock.spans.is_some() && this.span.is_none() {
            *this.span = Some(PhaseSpan::open(this.phase.as_str()));
        }
        let from = this.clock.start();
        let out = this.fut.poll(cx);
        let (_, end) = this.clock.cpu.charge_until(*this.phase, from, 0);
        if out.is_ready() {
            this.clock.last = end;
            let span = this.span.take();
            this.clock.close(span);
        }
        out
    }
}

/// The part of one clock read that lands inside the interval it bounds, taken off every
/// interval so that a phase doing little does not show the clock's own cost. Measured
/// once: the least difference between back-to-back reads.
fn read_cost_ns() -> u64 {
    static COST: OnceLock<u64> = OnceLock::new();
    *COST.get_or_init(|| {
        (0..64)
            .filter_map(|_| {
                let a = thread_cpu()?;
                let b = thread_cpu()?;
                u64::try_from(b.saturating_sub(a).as_nanos()).ok()
            })
            .min()
            .unwrap_or(0)
    })
}

/// CPU time of this thread; `None` where the clock is missing (then nothing is counted).
fn thread_cpu() -> Option<Duration> {
    ThreadTime::try_now().ok().map(|t| t.as_duration())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spin(d: Duration) {
        let from = thread_cpu().unwrap_or_default();
        while thread_cpu().unwrap_or_default().saturating_sub(from) < d {
            std::hint::black_box(0u64);
        }
    }

    fn clock(cpu: &PhaseCpu, on: bool) -> PhaseClock<'_> {
        PhaseClock {
            cpu,
            on,
            last: Mark(None),
            spans: None,
        }
    }

    #[test]
    fn counts_only_when_on_and_leaves_out_nested_work() {
        let cpu = PhaseCpu::default();
        clock(&cpu, false).time(Phase::Admit, || spin(Duration::from_millis(2)));
        assert_eq!(cpu.seconds(Phase::Admit), 0.0);
        clock(&cpu, true).time(Phase::Admit, || spin(Duration::from_millis(2)));
        assert!(cpu.seconds(Phase::Admit) >= 0.0019);
        let from = Mark::now(true);
        spin(Duration::from_millis(2));
        let ns = cpu.charge(Phase::Relay, from, 1_000_000);
        assert!((500_000..1_000_000_000).contains(&ns), "{ns}");
        assert_eq!(cpu.seconds(Phase::Relay), ns as f64 / 1e9);
        let mut text = String::new();
        cpu.render(&mut text);
        assert!(text.contains("onetoken_phase_cpu_seconds_total{phase=\"record\"} 0\n"));
    }

    #[test]
    fn a_phase_hands_its_reading_on_only_within_one_poll() {
        let cpu = PhaseCpu::default();
        let mut on = clock(&cpu, true);
        on.time(Phase::Admit, || ());
        assert!(on.last.0.is_some());
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        {
            let fut = std::pin::pin!(on.timed(Phase::Forward, std::future::pending::<()>()));
            assert!(fut.poll(&mut cx).is_pending());
        }
        // The next poll comes after other tasks ran: it reads the clock afresh.
        assert!(on.last.0.is_none());
        {
            let fut = std::pin::pin!(on.timed(Phase::Relay, std::future::ready(())));
            assert!(fut.poll(&mut cx).is_ready());
        }
        assert!(on.last.0.is_some());
        let mut off = clock(&cpu, false);
        off.time(Phase::Admit, || ());
        assert!(off.last.0.is_none());
    }
}
