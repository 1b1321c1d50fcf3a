//! Accept loop, connection limits, PROXY protocol, TLS termination and graceful drain.

use std::convert::Infallible;
use std::fs::File;
use std::io::BufReader;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio_rustls::TlsAcceptor;

use crate::body::RespBody;
use crate::client_ip::{client_ip, read_proxy_v2};
use crate::config::{EngineConfig, TlsConfig};
use crate::conn::{Activity, Limits, TimedIo, Tracked};
use crate::engine::Shared;
use crate::error::{error_body, json_response, ApiError, Error};
use crate::ipset::IpSet;
use crate::proxy;

/// Build the TLS acceptor from PEM files (ALPN: h2, http/1.1).
pub(crate) fn tls_acceptor(cfg: &TlsConfig) -> Result<TlsAcceptor, Error> {
    let open = |path: &str| {
        File::open(path)
            .map(BufReader::new)
            .map_err(|e| Error::Tls(format!("{path}: {e}")))
    };
    let certs = rustls_pemfile::certs(&mut open(&cfg.cert_path)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Tls(format!("{}: {e}", cfg.cert_path)))?;
    if certs.is_empty() {
        return Err(Error::Tls(format!(
            "{}: no certificate found",
            cfg.cert_path
        )));
    }
    let key = rustls_pemfile::private_key(&mut open(&cfg.key_path)?)
        .map_err(|e| Error::Tls(format!("{}: {e}", cfg.key_path)))?
        .ok_or_else(|| Error::Tls(format!("{}: no private key found", cfg.key_path)))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| Error::Tls(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The connection-level settings, compiled once at start.
pub(crate) struct ServeConfig {
    pub(crate) tls: Option<TlsAcceptor>,
    pub(crate) trusted_proxies: Arc<IpSet>,
    pub(crate) proxy_protocol: bool,
    pub(crate) max_connections: usize,
    pub(crate) limits: Limits,
    pub(crate) max_header_bytes: usize,
}

impl ServeConfig {
    pub(crate) fn from_config(cfg: &EngineConfig) -> Result<Self, Error> {
        Ok(ServeConfig {
            tls: cfg.tls.as_ref().map(tls_acceptor).transpose()?,
            trusted_proxies: Arc::new(cfg.proxies()?),
            proxy_protocol: cfg.proxy_protocol,
            max_connections: cfg.max_connections,
            limits: Limits {
                first_request: Duration::from_millis(cfg.header_read_timeout_ms),
                idle: Duration::from_millis(cfg.idle_timeout_ms),
            },
            max_header_bytes: cfg.max_header_bytes,
        })
    }
}

/// An open connection, counted in the `connections_open` gauge while it lives.
struct Open(Arc<Shared>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0
            .metrics
            .connections_open
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serve until `stop` delivers a grace period, then drain open connections for at most
/// that long. Connections still open afterwards are cancelled when the runtime shuts down.
pub(crate) async fn serve(
    listener: TcpListener,
    serve_cfg: ServeConfig,
    shared: Arc<Shared>,
    mut stop: oneshot::Receiver<Duration>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // hyper answers a bare 431 for a head too big to buffer; the gateway's own check
    // (the OpenAI-shaped 431 in `request_defect`) sits well below that.
    let head_buffer = serve_cfg.max_header_bytes.saturating_mul(4).max(8192);
    builder
        .http1()
        .timer(TokioTimer::new())
        .keep_alive(true)
        .header_read_timeout(serve_cfg.limits.first_request)
        .max_buf_size(head_buffer);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(head_buffer).unwrap_or(u32::MAX));
    let builder = Arc::new(builder);
    let serve_cfg = Arc::new(serve_cfg);
    let graceful = GracefulShutdown::new();

    let grace = loop {
        tokio::select! {
            grace = &mut stop => break grace.unwrap_or(Duration::ZERO),
            accepted = listener.accept() => {
                let Ok((stream, peer)) = accepted else {
                    // Out of descriptors or similar: back off instead of spinning.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                };
                let metrics = &shared.metrics;
                let open = metrics.connections_open.fetch_add(1, Ordering::Relaxed);
                let open_guard = Open(shared.clone());
                if usize::try_from(open).unwrap_or(usize::MAX) >= serve_cfg.max_connections {
                    metrics.connections_refused.fetch_add(1, Ordering::Relaxed);
                    drop(stream);
                    continue;
                }
                let _ = stream.set_nodelay(true);
                let watcher = graceful.watcher();
                let builder = builder.clone();
                let shared = shared.clone();
                let serve_cfg = serve_cfg.clone();
                tokio::spawn(async move {
                    let _open = open_guard;
                    accept_conn(&builder, watcher, stream, peer, shared, &serve_cfg).await;
                });
            }
        }
    };
    drop(listener);
    let _ = tokio::time::timeout(grace, graceful.shutdown()).await;
}

/// Time limits, the PROXY header and TLS, then HTTP.
async fn accept_conn(
    builder: &auto::Builder<TokioExecutor>,
    watcher: hyper_util::server::graceful::Watcher,
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    cfg: &ServeConfig,
) {
    let activity = Activity::new();
    let counted = shared.clone();
    let on_expire = Box::new(move || {
        counted
            .metrics
            .connections_timed_out
            .fetch_add(1, Ordering::Relaxed);
    });
    let mut io = TimedIo::new(stream, activity.clone(), cfg.limits, on_expire);
    let mut conn_ip = peer.ip();
    if cfg.proxy_protocol {
        // The header's address is believed from a trusted balancer only; from anyone
        // else it is read (the listener requires it) and ignored.
        match read_proxy_v2(&mut io).await {
            Ok(Some(src)) if cfg.trusted_proxies.contains(conn_ip, 0) => conn_ip = src.ip(),
            Ok(_) => {}
            Err(_) => return,
        }
    }
    let conn = Conn {
        activity,
        ip: conn_ip,
        trusted: cfg.trusted_proxies.clone(),
    };
    match &cfg.tls {
        None => serve_conn(builder, watcher, io, conn, shared).await,
        Some(acceptor) => {
            // The handshake is bounded by the first-request limit of `TimedIo`.
            if let Ok(stream) = acceptor.accept(io).await {
                serve_conn(builder, watcher, stream, conn, shared).await;
            }
        }
    }
}

/// What a connection's requests share.
struct Conn {
    activity: Arc<Activity>,
    /// The TCP peer, or the source a trusted PROXY header named.
    ip: IpAddr,
    trusted: Arc<IpSet>,
}

async fn serve_conn<I>(
    builder: &auto::Builder<TokioExecutor>,
    watcher: hyper_util::server::graceful::Watcher,
    io: I,
    conn: Conn,
    shared: Arc<Shared>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req: Request<Incoming>| {
        let in_flight = conn.activity.begin();
        let ip = client_ip(conn.ip, req.headers(), &conn.trusted);
        let shared = shared.clone();
        async move {
            let resp = proxy::handle(shared, ip, req).await?;
            Ok::<_, Infallible>(resp.map(|body| Tracked::new(body, in_flight)))
        }
    });
    let conn = builder.serve_connection(TokioIo::new(io), service);
    let _ = watcher.watch(conn).await;
}

/// A request head larger than `max_header_bytes`: refused with 431 (as Envoy and nginx
/// answer) and the connection closed.
///
/// A request with both `Content-Length` and `Transfer-Encoding` needs nothing here: hyper
/// follows RFC 9112 section 6.3, reading the body as chunked, dropping `Content-Length`
/// and closing the connection after the response, so nothing smuggled after the body is
/// ever read as a request.
pub(crate) fn request_defect<B>(req: &Request<B>, max_header_bytes: usize) -> Option<ApiError> {
    let uri_len = req.uri().path_and_query().map_or(0, |p| p.as_str().len());
    let head = req
        .headers()
        .iter()
        // Name, ": ", value and CRLF, as on the HTTP/1 wire.
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum::<usize>()
        + uri_len;
    (head > max_header_bytes).then_some(ApiError::HeadersTooLarge)
}

/// The metrics listener: `GET /metrics` and `GET /healthz`, nothing else.
pub(crate) async fn serve_metrics(listener: TcpListener, shared: Arc<Shared>) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10));
    let builder = Arc::new(builder);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        };
        let shared = shared.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let resp = match (req.method(), req.uri().path()) {
                    (&Method::GET, "/metrics") => {
                        let mut resp =
                            Response::new(RespBody::from(Bytes::from(shared.metrics_text())));
                        resp.headers_mut().insert(
                            header::CONTENT_TYPE,
                            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                        );
                        resp
                    }
                    (&Method::GET, "/healthz") => health(&shared),
                    _ => json_response(
                        ApiError::NotFound.status(),
                        error_body(ApiError::NotFound, None, None),
                    ),
                };
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = builder
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// `GET /healthz`: 200 while a snapshot serves (also when the control plane is unreachable:
/// the gateway keeps serving on its last good snapshot, and says how old it is), 503 before
/// the first snapshot and while stopping.
pub(crate) fn health(shared: &Shared) -> Response<RespBody> {
    let version = shared.snapshot.load().version;
    let control = if shared.control.reachable() {
        "ok"
    } else {
        "unreachable"
    };
    let (status, body) = if shared.draining.load(Ordering::Relaxed) {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"status": "draining", "control": control}),
        )
    } else if version == 0 {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"status": "starting", "control": control}),
        )
    } else {
        (
            StatusCode::OK,
            json!({
                "status": "ok",
                "control": control,
                "snapshot_version": version,
                "snapshot_age_seconds": shared.control.snapshot_age_seconds(),
            }),
        )
    };
    json_response(status, Bytes::from(body.to_string()))
}
