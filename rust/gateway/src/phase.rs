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
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use cpu_time::ThreadTime;

use crate::engine::Shared;

/// The phases of one request, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// The endpoint, the request head, loops and blocked addresses.
    Admit,
    /// The API key and what it may do.
    Authenticate,
    /// The body: parsed, checked, the model and the deployments it may reach, the guard.
    Route,
    /// Token estimates, limits, budgets and the balance reservation.
    Reserve,
    /// Upstream attempts until one answers.
    Forward,
    /// The answer to the client: collected and metered, or each poll of a stream.
    Relay,
    /// The cost, charged against what was reserved.
    Settle,
    /// The call record, built and written.
    Record,
}

impl Phase {
    pub(crate) const ALL: [Phase; 8] = [
        Phase::Admit,
        Phase::Authenticate,
        Phase::Route,
        Phase::Reserve,
        Phase::Forward,
        Phase::Relay,
        Phase::Settle,
        Phase::Record,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Phase::Admit => "admit",
            Phase::Authenticate => "authenticate",
            Phase::Route => "route",
            Phase::Reserve => "reserve",
            Phase::Forward => "forward",
            Phase::Relay => "relay",
            Phase::Settle => "settle",
            Phase::Record => "record",
        }
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
        let (Some(from), Some(now)) = (from.0, from.0.and_then(|_| thread_cpu())) else {
            return 0;
        };
        let ns = u64::try_from(now.saturating_sub(from).as_nanos())
            .unwrap_or(u64::MAX)
            .saturating_sub(nested);
        self.ns[phase as usize].fetch_add(ns, Ordering::Relaxed);
        ns
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
#[derive(Clone, Copy)]
pub(crate) struct Mark(Option<Duration>);

impl Mark {
    pub(crate) fn now(timing: bool) -> Mark {
        Mark(if timing { thread_cpu() } else { None })
    }
}

/// The phase counters of an engine and whether `phase_timing` is on.
#[derive(Clone, Copy)]
pub(crate) struct PhaseClock<'a> {
    cpu: &'a PhaseCpu,
    on: bool,
}

impl<'a> PhaseClock<'a> {
    pub(crate) fn new(shared: &'a Shared) -> Self {
        PhaseClock {
            cpu: &shared.metrics.phase_cpu,
            on: shared.config.phase_timing,
        }
    }

    /// Run a synchronous phase.
    pub(crate) fn time<T>(self, phase: Phase, f: impl FnOnce() -> T) -> T {
        let from = Mark::now(self.on);
        let out = f();
        self.cpu.charge(phase, from, 0);
        out
    }

    /// Run a phase that awaits, timing each poll.
    pub(crate) async fn timed<F: Future>(self, phase: Phase, fut: F) -> F::Output {
        let mut fut = std::pin::pin!(fut);
        std::future::poll_fn(|cx| {
            let from = Mark::now(self.on);
            let out = fut.as_mut().poll(cx);
            self.cpu.charge(phase, from, 0);
            out
        })
        .await
    }
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

    #[test]
    fn counts_only_when_on_and_leaves_out_nested_work() {
        let cpu = PhaseCpu::default();
        let off = PhaseClock {
            cpu: &cpu,
            on: false,
        };
        let on = PhaseClock {
            cpu: &cpu,
            on: true,
        };
        off.time(Phase::Admit, || spin(Duration::from_millis(2)));
        assert_eq!(cpu.seconds(Phase::Admit), 0.0);
        on.time(Phase::Admit, || spin(Duration::from_millis(2)));
        assert!(cpu.seconds(Phase::Admit) >= 0.002);
        let from = Mark::now(true);
        spin(Duration::from_millis(2));
        let ns = cpu.charge(Phase::Relay, from, 1_000_000);
        assert!((1_000_000..1_000_000_000).contains(&ns), "{ns}");
        assert_eq!(cpu.seconds(Phase::Relay), ns as f64 / 1e9);
        let mut text = String::new();
        cpu.render(&mut text);
        assert!(text.contains("onetoken_phase_cpu_seconds_total{phase=\"record\"} 0\n"));
    }
}
