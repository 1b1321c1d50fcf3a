//! Accept loop, TLS termination and graceful drain.

use std::fs::File;
use std::io::BufReader;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_rustls::TlsAcceptor;

use crate::config::TlsConfig;
use crate::engine::Shared;
use crate::error::Error;
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

/// Serve until `stop` delivers a grace period, then drain open connections for at most
/// that long. Connections still open afterwards are cancelled when the runtime shuts down.
pub(crate) async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    shared: Arc<Shared>,
    mut stop: oneshot::Receiver<Duration>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).keep_alive(true);
    builder.http2().timer(TokioTimer::new());
    let builder = Arc::new(builder);
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
                let _ = stream.set_nodelay(true);
                let watcher = graceful.watcher();
                let builder = builder.clone();
                let shared = shared.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    match tls {
                        None => serve_conn(&builder, watcher, stream, peer, shared).await,
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(stream).await {
                                serve_conn(&builder, watcher, stream, peer, shared).await;
                            }
                        }
                    }
                });
            }
        }
    };
    drop(listener);
    let _ = tokio::time::timeout(grace, graceful.shutdown()).await;
}

async fn serve_conn<I>(
    builder: &auto::Builder<TokioExecutor>,
    watcher: hyper_util::server::graceful::Watcher,
    io: I,
    peer: SocketAddr,
    shared: Arc<Shared>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let ip = peer.ip();
    let service = service_fn(move |req| proxy::handle(shared.clone(), ip, req));
    let conn = builder.serve_connection(TokioIo::new(io), service);
    let _ = watcher.watch(conn).await;
}
