//! The engine: owns the tokio runtime, the listener, the live snapshot and the record
//! journal. Start takes the spool dir's locks and binds synchronously; stop drains, shuts
//! the runtime down, then releases the locks.

use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use tokio::runtime::Runtime;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::auth::KeyRing;
use crate::billing::OrgAccount;
use crate::config::EngineConfig;
use crate::error::Error;
use crate::journal::SpoolLocks;
use crate::limits::{LimitState, LiveCounters};
use crate::metrics::{Gauges, Metrics};
use crate::records::Records;
use crate::restrict::Redactor;
use crate::shared::{self as shared_limits, Scopes, SharedLimits};
use crate::snapshot::{self, Dropped, Snapshot};
use crate::trace::{self, Tracer};
use crate::upstream::{ClientCache, Resolve, SystemResolver};
use crate::{server, tokens};

/// State shared by every request.
pub(crate) struct Shared {
    pub(crate) config: EngineConfig,
    pub(crate) keyring: KeyRing,
    /// Transforms the client address and User-Agent of restricted calls.
    pub(crate) redactor: Redactor,
    pub(crate) snapshot: ArcSwap<Snapshot>,
    /// Entries the serving snapshot left out, reported to the control plane and counted
    /// in `/metrics`.
    dropped: Mutex<Vec<Dropped>>,
    /// Live counters by org and key id; the compile step reuses them so they survive swaps.
    accounts: Mutex<LiveCounters>,
    clients: ClientCache,
    pub(crate) records: Records,
    pub(crate) metrics: Metrics,
    instance_id: String,
    seq: AtomicU64,
    /// Stop has begun: `/healthz` reports draining.
    pub(crate) draining: AtomicBool,
    /// The grace period is over: abandoned requests are recorded as `shutting_down`.
    pub(crate) aborting: AtomicBool,
    pub(crate) control: ControlStatus,
    /// Money shared with the other gateways through Redis (`config.shared`).
    pub(crate) shared_limits: Option<Arc<SharedLimits>>,
    /// Traces over OTLP (`config.otel`).
    pub(crate) tracer: Option<Arc<Tracer>>,
}

/// What the engine knows of its control plane, for `/healthz` and `/metrics`: whether the
/// last exchange reached it, and when the serving snapshot was last confirmed current (a
/// newer one loaded, or a poll that reached the control plane).
pub(crate) struct ControlStatus {
    reachable: AtomicBool,
    confirmed: Mutex<Option<Instant>>,
}

impl ControlStatus {
    fn new() -> Self {
        ControlStatus {
            // The config and first snapshot come from the control plane, so it was
            // reachable when the engine was made; the gateway reports otherwise.
            reachable: AtomicBool::new(true),
            confirmed: Mutex::new(None),
        }
    }

    fn set(&self, reachable: bool) {
        self.reachable.store(reachable, Ordering::Relaxed);
        if reachable {
            self.confirm();
        }
    }

    fn confirm(&self) {
        *self.confirmed.lock() = Some(Instant::now());
    }

    pub(crate) fn reachable(&self) -> bool {
        self.reachable.load(Ordering::Relaxed)
    }

    /// Seconds since the serving snapshot was last confirmed current (millisecond
    /// resolution); 0 before the first snapshot.
    pub(crate) fn snapshot_age_seconds(&self) -> f64 {
        let millis = self.confirmed.lock().map_or(0, |t| t.elapsed().as_millis());
        // Exact below 2^53 ms (285,000 years).
        millis as f64 / 1000.0
    }
}

impl Shared {
    pub(crate) fn next_request_id(&self) -> String {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        format!("req_{}{:010x}", self.instance_id, n)
    }

    pub(crate) fn metrics_text(&self) -> String {
        let mut text = self.metrics.render(&Gauges {
            records_total: self.records.total.load(Ordering::Relaxed),
            snapshot_version: self.snapshot.load().version,
            snapshot_dropped: self.dropped.lock().len() as u64,
            journal_segments: self.records.journal_segments(),
            journal_errors: self.records.journal_errors(),
            control_reachable: self.control.reachable(),
            snapshot_age_seconds: self.control.snapshot_age_seconds(),
            shared: self.shared_limits.as_ref().map(|s| s.gauges()),
        });
        if let Some(tracer) = &self.tracer {
            tracer.render(&mut text);
        }
        text
    }

    /// The live state the refiller looks after: org accounts, and the rate and
    /// concurrency state of keys, applications and orgs by hash tag.
    fn scopes(&self) -> Scopes {
        let accounts = self.accounts.lock();
        let tagged = |prefix: &str, states: &HashMap<String, Arc<LimitState>>| {
            states
                .iter()
                .map(|(id, s)| (format!("{prefix}:{id}"), Arc::clone(s)))
                .collect::<Vec<_>>()
        };
        let mut limits = tagged("k", &accounts.key_limits);
        limits.extend(tagged("a", &accounts.app_limits));
        limits.extend(tagged("o", &accounts.org_limits));
        let spending = |prefix: &str, accounts: &HashMap<String, Arc<OrgAccount>>| {
            accounts
                .iter()
                .map(|(id, a)| (format!("{prefix}:{id}"), Arc::clone(a)))
                .collect::<Vec<_>>()
        };
        let mut spend = spending("k", &accounts.keys);
        spend.extend(spending("a", &accounts.apps));
        spend.extend(spending("o", &accounts.orgs));
        Scopes {
            spend,
            orgs: accounts
                .orgs
                .iter()
                .map(|(id, a)| (id.clone(), Arc::clone(a)))
                .collect(),
            limits,
        }
    }
}

enum Phase {
    Idle,
    Running {
        runtime: Runtime,
        server: JoinHandle<()>,
        stop: oneshot::Sender<Duration>,
        addr: SocketAddr,
        metrics_addr: Option<SocketAddr>,
        locks: SpoolLocks,
    },
    Stopped,
}

/// Counters for the control plane.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Records emitted since start.
    pub records_total: u64,
    /// Requests being served.
    pub in_flight: u64,
    /// Version of the snapshot serving (0 before the first).
    pub snapshot_version: u64,
    /// Journal segment files this instance opened.
    pub journal_segments: u64,
    /// Records lost because their journal append failed.
    pub journal_errors: u64,
}

/// The gateway. `Send + Sync`; every method may be called from any thread.
pub struct Engine {
    shared: Arc<Shared>,
    phase: Mutex<Phase>,
    /// Serialises snapshot compilation so versions only move forward.
    load_lock: Mutex<()>,
}

impl Engine {
    /// Validate the configuration and build an engine (not yet serving).
    pub fn new(config: EngineConfig) -> Result<Self, Error> {
        Self::with_resolver(config, Arc::new(SystemResolver))
    }

    /// `new` with the resolver for upstream host names replaced (tests use a stub, so no
    /// name has to resolve to an internal address for real).
    pub fn with_resolver(config: EngineConfig, resolver: Arc<dyn Resolve>) -> Result<Self, Error> {
        config.validate()?;
        let secrets = config.secrets()?;
        let instance_id = format!("{:016x}", rand::random::<u64>());
        let records = Records::new(&config.spool_dir, &instance_id);
        let shared_limits = config
            .shared
            .clone()
            .map(|c| Arc::new(SharedLimits::new(c, &instance_id)));
        let accounts = LiveCounters {
            leased: shared_limits.is_some(),
            ..LiveCounters::default()
        };
        let shared = Arc::new(Shared {
            keyring: KeyRing::new(&secrets),
            redactor: Redactor::new(&config.secret()?),
            snapshot: ArcSwap::from_pointee(Snapshot::empty()),
            dropped: Mutex::new(Vec::new()),
            accounts: Mutex::new(accounts),
            clients: ClientCache::new(config.private_cidrs()?, resolver),
            records,
            metrics: Metrics::default(),
            instance_id,
            seq: AtomicU64::new(0),
            draining: AtomicBool::new(false),
            aborting: AtomicBool::new(false),
            control: ControlStatus::new(),
            shared_limits,
            tracer: config.otel.clone().map(|c| Arc::new(Tracer::new(c))),
            config,
        });
        Ok(Engine {
            shared,
            phase: Mutex::new(Phase::Idle),
            load_lock: Mutex::new(()),
        })
    }

    /// Bind the listener (errors at once), build the runtime and serve in the background.
    /// Returns the bound address.
    pub fn start(&self) -> Result<SocketAddr, Error> {
        let mut phase = self.phase.lock();
        match *phase {
            Phase::Idle => {}
            Phase::Running { .. } => return Err(Error::State("engine is already running".into())),
            Phase::Stopped => {
                return Err(Error::State("engine was stopped; create a new one".into()))
            }
        }
        let config = &self.shared.config;
        let serve_cfg = server::ServeConfig::from_config(config)?;
        // Before anything can emit a record: a segment whose instance is not live would
        // look complete to a reader.
        let locks = SpoolLocks::acquire(
            Path::new(&config.spool_dir),
            &self.shared.instance_id,
            config.shared.is_some(),
        )?;
        let socket = bind(&config.listen)?;
        let metrics_socket = config.metrics_listen.as_deref().map(bind).transpose()?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.worker_threads)
            .thread_name("onetoken-worker")
            .enable_all()
            .build()
            .map_err(|e| Error::State(format!("cannot build runtime: {e}")))?;
        let listeners = {
            let _guard = runtime.enter();
            listen(socket, &config.listen).and_then(|main| {
                let metrics = metrics_socket
                    .map(|s| listen(s, config.metrics_listen.as_deref().unwrap_or_default()))
                    .transpose()?;
                Ok((main, metrics))
            })
        };
        let ((listener, addr), metrics) = match listeners {
            Ok(ok) => ok,
            Err(e) => {
                // Never drop a runtime in place: start may be called from async code.
                runtime.shutdown_background();
                return Err(e);
            }
        };
        let metrics_addr = metrics.as_ref().map(|(_, a)| *a);
        if let Some((metrics_listener, _)) = metrics {
            runtime.spawn(server::serve_metrics(metrics_listener, self.shared.clone()));
        }
        if let Some(limits) = &self.shared.shared_limits {
            let shared = self.shared.clone();
            // Live state changes only when a snapshot is compiled: list it again then.
            let mut listed: Option<(u64, Arc<Scopes>)> = None;
            runtime.spawn(shared_limits::refiller(limits.clone(), move || {
                let version = shared.snapshot.load().version;
                match &listed {
                    Some((v, scopes)) if *v == version => Arc::clone(scopes),
                    _ => {
                        let scopes = Arc::new(shared.scopes());
                        listed = Some((version, Arc::clone(&scopes)));
                        scopes
                    }
                }
            }));
        }
        if let Some(tracer) = &self.shared.tracer {
            let shared = self.shared.clone();
            let started = trace::unix_ns();
            runtime.spawn(trace::export(tracer.clone(), move || {
                shared.metrics.otlp(started, trace::unix_ns())
            }));
        }
        // Load the vocabulary before the first request needs it.
        tokens::warm_up();
        let (stop, stop_rx) = oneshot::channel();
        let server = runtime.spawn(server::serve(
            listener,
            serve_cfg,
            self.shared.clone(),
            stop_rx,
        ));
        *phase = Phase::Running {
            runtime,
            server,
            stop,
            addr,
            metrics_addr,
            locks,
        };
        Ok(addr)
    }

    /// Compile and swap in a snapshot; returns the version now serving. Entries that do
    /// not hold up are left out ([`Engine::snapshot_dropped`] lists them); a document that
    /// does not parse leaves the current snapshot serving; one not newer than it is ignored.
    pub fn load_snapshot(&self, json: &[u8]) -> Result<u64, Error> {
        let doc = snapshot::parse(json)?;
        let _serial = self.load_lock.lock();
        let current = self.shared.snapshot.load().version;
        if doc.version <= current {
            return Ok(current);
        }
        let (compiled, dropped) = {
            let mut accounts = self.shared.accounts.lock();
            Snapshot::compile(doc, &mut accounts, &self.shared.clients)
        };
        let version = compiled.version;
        self.shared.snapshot.store(Arc::new(compiled));
        *self.shared.dropped.lock() = dropped;
        self.shared.control.confirm();
        Ok(version)
    }

    /// Whether the gateway's last exchange with the control plane succeeded. Call it after
    /// every snapshot poll: `true` also confirms the serving snapshot as current (a 304
    /// says so as much as a new snapshot does), `false` lets its age grow. The engine keeps
    /// serving on its last good snapshot either way; `/healthz` and `/metrics` report it.
    pub fn set_control_status(&self, reachable: bool) {
        self.shared.control.set(reachable);
    }

    /// The entries the serving snapshot left out (empty when every entry compiled).
    pub fn snapshot_dropped(&self) -> Vec<Dropped> {
        self.shared.dropped.lock().clone()
    }

    /// [`Engine::stop`] with the configured grace period (`shutdown_grace_ms`).
    pub fn drain(&self) {
        self.stop(Duration::from_millis(self.shared.config.shutdown_grace_ms));
    }

    /// Stop accepting, let in-flight requests finish for up to `grace`, then cancel the
    /// rest (each still leaves its record) and shut the runtime down; then release the
    /// spool dir's locks, which makes every segment of this instance complete for readers.
    /// Blocking; idempotent.
    pub fn stop(&self, grace: Duration) {
        let running = {
            let mut phase = self.phase.lock();
            match std::mem::replace(&mut *phase, Phase::Stopped) {
                Phase::Running {
                    runtime,
                    server,
                    stop,
                    locks,
                    ..
                } => Some((runtime, server, stop, locks)),
                Phase::Idle | Phase::Stopped => None,
            }
        };
        let Some((runtime, server, stop, locks)) = running else {
            return;
        };
        let shared = self.shared.clone();
        shared.draining.store(true, Ordering::Relaxed);
        // Blocking on the runtime is not allowed from inside an async context, so the
        // drain runs on a plain thread whatever thread calls stop.
        let drain = std::thread::spawn(move || {
            let _ = stop.send(grace);
            let _ = runtime.block_on(async {
                tokio::time::timeout(grace + Duration::from_secs(1), server).await
            });
            if let Some(limits) = &shared.shared_limits {
                let scopes = shared.scopes();
                let _ = runtime.block_on(async {
                    let bound = Duration::from_millis(limits.config.timeout_ms * 4);
                    tokio::time::timeout(bound, shared_limits::release(limits, scopes)).await
                });
            }
            if let Some(tracer) = &shared.tracer {
                let _ = runtime.block_on(async {
                    tokio::time::timeout(Duration::from_secs(5), trace::flush(tracer)).await
                });
            }
            shared.aborting.store(true, Ordering::Relaxed);
            // Dropping the remaining tasks drops their bodies, which emits their records.
            runtime.shutdown_timeout(Duration::from_secs(2));
        });
        let _ = drain.join();
        self.shared.records.stop();
        drop(locks);
    }

    /// Prometheus exposition text (the same as `GET /metrics`).
    pub fn metrics_text(&self) -> String {
        self.shared.metrics_text()
    }

    /// `(org id, spent since engine start, currently reserved)` for every known org.
    pub fn org_spend(&self) -> Vec<(String, i64, i64)> {
        spend_of(&self.shared.accounts.lock().orgs)
    }

    /// `(key id, spent since engine start, currently reserved)` for every known key: the
    /// counters that key budgets compare with `keys[].usage.spent_mark`.
    pub fn key_spend(&self) -> Vec<(String, i64, i64)> {
        spend_of(&self.shared.accounts.lock().keys)
    }

    /// `(application id, spent since engine start, currently reserved)` for every known
    /// application: the counters that application budgets compare with
    /// `applications[].usage.spent_mark`.
    pub fn application_spend(&self) -> Vec<(String, i64, i64)> {
        spend_of(&self.shared.accounts.lock().apps)
    }

    /// Counters for the control plane.
    pub fn stats(&self) -> Stats {
        let s = &self.shared;
        Stats {
            journal_segments: s.records.journal_segments(),
            journal_errors: s.records.journal_errors(),
            records_total: s.records.total.load(Ordering::Relaxed),
            in_flight: u64::try_from(s.metrics.in_flight.load(Ordering::Relaxed)).unwrap_or(0),
            snapshot_version: s.snapshot.load().version,
        }
    }

    /// The bound address while running.
    pub fn address(&self) -> Option<SocketAddr> {
        match &*self.phase.lock() {
            Phase::Running { addr, .. } => Some(*addr),
            _ => None,
        }
    }

    /// The bound address of the metrics listener (`metrics_listen`) while running.
    pub fn metrics_address(&self) -> Option<SocketAddr> {
        match &*self.phase.lock() {
            Phase::Running { metrics_addr, .. } => *metrics_addr,
            _ => None,
        }
    }

    /// Whether the engine is serving.
    pub fn running(&self) -> bool {
        matches!(&*self.phase.lock(), Phase::Running { .. })
    }

    /// Unique per engine; names its journal files.
    pub fn instance_id(&self) -> &str {
        &self.shared.instance_id
    }
}

/// `(id, spent since engine start, currently reserved)` for each account, by id.
fn spend_of(accounts: &HashMap<String, Arc<OrgAccount>>) -> Vec<(String, i64, i64)> {
    let mut out: Vec<(String, i64, i64)> = accounts
        .iter()
        .map(|(id, a)| {
            let (spent, reserved) = a.totals();
            (id.clone(), spent, reserved)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Pending connections the kernel may queue (the std default of 128 refuses bursts).
const BACKLOG: u32 = 4096;

/// Bind synchronously so a bad or busy address fails in `start` itself.
fn bind(listen: &str) -> Result<tokio::net::TcpSocket, Error> {
    let addr = listen
        .to_socket_addrs()
        .map_err(|e| Error::Bind(format!("{listen}: {e}")))?
        .next()
        .ok_or_else(|| Error::Bind(format!("{listen}: resolves to no address")))?;
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .map_err(|e| Error::Bind(format!("{listen}: {e}")))?;
    socket
        .set_reuseaddr(true)
        .map_err(|e| Error::Bind(format!("{listen}: {e}")))?;
    socket
        .set_nodelay(true)
        .map_err(|e| Error::Bind(format!("{listen}: {e}")))?;
    socket
        .bind(addr)
        .map_err(|e| Error::Bind(format!("{listen}: {e}")))?;
    Ok(socket)
}

/// Listen on a bound socket; returns the listener and its address.
fn listen(
    socket: tokio::net::TcpSocket,
    listen: &str,
) -> Result<(tokio::net::TcpListener, SocketAddr), Error> {
    socket
        .listen(BACKLOG)
        .and_then(|l| l.local_addr().map(|a| (l, a)))
        .map_err(|e| Error::Bind(format!("{listen}: {e}")))
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.stop(Duration::ZERO);
    }
}
