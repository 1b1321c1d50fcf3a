//! The bundled fake model provider: an OpenAI-compatible HTTP server (HTTP/1.1 and h2 on
//! one port) for tests, `onetoken serve --demo` and benchmarks. docs/mock-upstream.md is
//! its spec; per-request behaviour is driven by the `"mock"` object in the request body.
//!
//! It is the baseline every benchmark row is compared with, so replies are written as bytes
//! into one buffer and nothing is spawned per stream.

mod audio;
mod body;
mod handler;
mod json;
mod protocols;
mod units;

use std::future::Future;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpSocket};
use tokio::runtime::Runtime;

pub use body::{ConnectionCut, MockBody};

pub use handler::SeenHeaders;
use handler::Shared;

/// Listen backlog: large enough that a burst of thousands of connections from a load test
/// is not refused by the kernel before the accept loop catches up.
const BACKLOG: u32 = 4096;

/// How long `stop` waits for the runtime's threads when it is allowed to block.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// Server-wide defaults; each request may override them under `"mock"`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MockDefaults {
    /// Content chunks in a stream, and tokens in a JSON reply.
    pub chunks: u32,
    /// Pause before each stream chunk, in milliseconds.
    pub delay_ms: u64,
    /// Pause before the response headers, in milliseconds.
    pub latency_ms: u64,
}

impl Default for MockDefaults {
    fn default() -> Self {
        MockDefaults {
            chunks: 8,
            delay_ms: 0,
            latency_ms: 0,
        }
    }
}

/// A running mock upstream on its own tokio runtime. Dropping it stops it.
pub struct MockServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    // `None` once stopped; a mutex (not a `&mut self` API) so the server can be shared
    // across threads and stopped from any of them.
    runtime: Mutex<Option<Runtime>>,
}

impl MockServer {
    /// Bind `listen` ("host:port", port 0 for any) synchronously, so a bad or busy address
    /// fails here, then serve in the background.
    pub fn start(listen: &str, defaults: MockDefaults) -> Result<MockServer, String> {
        let (runtime, addr, shared) = serve(listen, defaults)?;
        Ok(MockServer {
            addr,
            shared,
            runtime: Mutex::new(Some(runtime)),
        })
    }

    /// The bound address (with the real port when started on port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// API requests received so far (every path except `/healthz`, so readiness probes do
    /// not disturb tests that assert call counts).
    pub fn request_count(&self) -> u64 {
        self.shared.requests.load(Ordering::Relaxed)
    }

    /// Bytes of audio uploads (transcriptions, translations) received so far, counted as
    /// they arrive: a test sees an upload reach the upstream while its client still sends.
    pub fn upload_bytes(&self) -> u64 {
        self.shared.upload_bytes.load(Ordering::Relaxed)
    }

    /// From now on, keep the headers of every API request (for tests that check what an
    /// upstream is sent).
    pub fn record_headers(&self) {
        self.shared.recording.store(true, Ordering::Relaxed);
    }

    /// The headers of each API request received since [`Self::record_headers`] (or the
    /// last call of this), oldest first.
    pub fn take_headers(&self) -> Vec<SeenHeaders> {
        std::mem::take(
            &mut *self
                .shared
                .seen
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// Stop listening and drop every connection, in-flight streams included. Idempotent.
    /// Outside an async context it waits until the port is closed; inside one it cannot
    /// block, so the runtime winds down in the background.
    pub fn stop(&self) {
        let runtime = self
            .runtime
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(runtime) = runtime {
            if tokio::runtime::Handle::try_current().is_ok() {
                runtime.shutdown_background();
            } else {
                runtime.shutdown_timeout(STOP_GRACE);
            }
        }
    }
}

impl Drop for MockServer {
    fn drop(&mut self) {
        self.stop();
    }
}

impl std::fmt::Debug for MockServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockServer")
            .field("addr", &self.addr)
            .field("requests", &self.request_count())
            .finish()
    }
}

/// Bind `listen` synchronously (a bad or busy address fails here) and serve it on a new
/// runtime: the runtime, the bound address and the state the connections share.
fn serve(
    listen: &str,
    defaults: MockDefaults,
) -> Result<(Runtime, SocketAddr, Arc<Shared>), String> {
    let runtime = build_runtime()?;
    let listener = {
        // Registering the socket with the reactor needs the runtime's context.
        let _guard = runtime.enter();
        bind(listen)?
    };
    let addr = listener
        .local_addr()
        .map_err(|e| format!("mock upstream: no local address for {listen}: {e}"))?;
    let shared = Arc::new(Shared {
        defaults,
        requests: AtomicU64::new(0),
        upload_bytes: AtomicU64::new(0),
        recording: AtomicBool::new(false),
        seen: Mutex::new(Vec::new()),
    });
    runtime.spawn(accept_loop(listener, Arc::clone(&shared)));
    Ok((runtime, addr, shared))
}

/// Serve in the foreground until `shutdown` completes (for CLIs: pass a signal future).
/// Binds before anything else, then prints one line with the address to stderr.
pub fn serve_blocking(
    listen: &str,
    defaults: MockDefaults,
    shutdown: impl Future<Output = ()>,
) -> Result<(), String> {
    let (runtime, addr, _) = serve(listen, defaults)?;
    eprintln!("onetoken mock upstream listening on http://{addr}");
    runtime.block_on(shutdown);
    runtime.shutdown_timeout(STOP_GRACE);
    Ok(())
}

fn build_runtime() -> Result<Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("mock-upstream")
        .build()
        .map_err(|e| format!("mock upstream: cannot build the tokio runtime: {e}"))
}

/// Bind with an explicit backlog (std's fixed 128 refuses connection bursts).
fn bind(listen: &str) -> Result<TcpListener, String> {
    let addr = listen
        .to_socket_addrs()
        .map_err(|e| format!("mock upstream: bad listen address {listen:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("mock upstream: {listen:?} resolves to no address"))?;
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(|e| format!("mock upstream: cannot create a socket: {e}"))?;
    socket
        .set_reuseaddr(true)
        .map_err(|e| format!("mock upstream: cannot set SO_REUSEADDR: {e}"))?;
    socket
        .bind(addr)
        .map_err(|e| format!("mock upstream: cannot bind {addr}: {e}"))?;
    socket
        .listen(BACKLOG)
        .map_err(|e| format!("mock upstream: cannot listen on {addr}: {e}"))
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    // One builder for every connection: HTTP/1.1 keep-alive and h2 (prior knowledge)
    // are detected from the first bytes.
    let builder = Arc::new(auto::Builder::new(TokioExecutor::new()));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(_) => {
                // Usually EMFILE under a connection flood: back off instead of spinning.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        // Small replies and SSE events must leave at once, not wait for Nagle.
        let _ = stream.set_nodelay(true);
        let shared = Arc::clone(&shared);
        let builder = Arc::clone(&builder);
        tokio::spawn(async move {
            let service = service_fn(move |req| handler::handle(req, Arc::clone(&shared)));
            // A failed connection (client gone, deliberate cut) concerns only itself.
            let _ = builder
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
