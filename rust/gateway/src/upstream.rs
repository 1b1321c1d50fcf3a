//! The upstream HTTP client: one pooled hyper client per connect timeout, shared by every
//! snapshot so a config swap keeps warm connections.

use std::collections::HashMap;
use std::error::Error as StdError;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use parking_lot::Mutex;

use crate::error::{ApiError, Error};
use crate::routing::{DeploymentStats, ProviderState};

pub(crate) type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Clients keyed by connect timeout (the one connector setting that varies by provider),
/// plus the live routing state of providers and deployments, which must survive
/// snapshot swaps like the connection pools do.
#[derive(Default)]
pub(crate) struct ClientCache {
    clients: Mutex<HashMap<Duration, HttpClient>>,
    providers: Mutex<HashMap<String, Arc<ProviderState>>>,
    deployments: Mutex<HashMap<(String, String), Arc<DeploymentStats>>>,
}

impl ClientCache {
    /// Breaker and in-flight count of a provider, by id.
    pub(crate) fn provider_state(&self, id: &str) -> Arc<ProviderState> {
        self.providers
            .lock()
            .entry(id.to_owned())
            .or_default()
            .clone()
    }

    /// Latency average of a deployment, by provider id and upstream model.
    pub(crate) fn deployment_stats(&self, provider: &str, model: &str) -> Arc<DeploymentStats> {
        self.deployments
            .lock()
            .entry((provider.to_owned(), model.to_owned()))
            .or_default()
            .clone()
    }

    pub(crate) fn get(&self, connect_timeout: Duration) -> Result<HttpClient, Error> {
        let mut clients = self.clients.lock();
        if let Some(c) = clients.get(&connect_timeout) {
            return Ok(c.clone());
        }
        let client = build_client(connect_timeout)?;
        clients.insert(connect_timeout, client.clone());
        Ok(client)
    }
}

fn build_client(connect_timeout: Duration) -> Result<HttpClient, Error> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    http.set_keepalive(Some(Duration::from_secs(60)));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(Arc::new(rustls::crypto::ring::default_provider()))
        .map_err(|e| Error::Tls(format!("client TLS setup: {e}")))?
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(1024)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(https))
}

/// Map a failed upstream request: a connect timeout is a timeout, any other connect
/// failure means unreachable. Error texts are never surfaced.
pub(crate) fn classify(err: &hyper_util::client::legacy::Error) -> ApiError {
    let mut source: Option<&(dyn StdError + 'static)> = err.source();
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::TimedOut {
                return ApiError::UpstreamTimeout;
            }
        }
        source = e.source();
    }
    if err.is_connect() {
        ApiError::UpstreamUnreachable
    } else {
        ApiError::UpstreamError
    }
}
