//! The upstream HTTP client: one pooled hyper client per connect timeout and address
//! scope, shared by every snapshot so a config swap keeps warm connections.
//!
//! Every new connection goes through [`GuardedConnector`]: the host is resolved once,
//! every address it resolves to is checked, and the TCP connection is made to a checked
//! address itself, so a name that resolves differently a moment later (DNS rebinding)
//! cannot slip an internal address past the check.

use std::collections::HashMap;
use std::error::Error as StdError;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Scheme, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use parking_lot::Mutex;
use tokio::net::TcpStream;

use crate::error::{ApiError, Error};
use crate::ipset::IpSet;
use crate::protocol::upload::{Upload, UploadError};
use crate::routing::{DeploymentStats, ProviderState};

pub(crate) type HttpClient = Client<HttpsConnector<GuardedConnector>, UpBody>;

/// An upstream request's body: a whole JSON body, or an audio upload streamed through
/// from the client.
pub(crate) enum UpBody {
    Whole(Full<Bytes>),
    Upload(Box<Upload<Incoming>>),
}

impl From<Full<Bytes>> for UpBody {
    fn from(b: Full<Bytes>) -> Self {
        UpBody::Whole(b)
    }
}

impl Body for UpBody {
    type Data = Bytes;
    type Error = UploadError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, UploadError>>> {
        match self.get_mut() {
            UpBody::Whole(b) => Pin::new(b)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(|never| match never {}))),
            UpBody::Upload(u) => Pin::new(u.as_mut()).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpBody::Whole(b) => b.is_end_stream(),
            UpBody::Upload(u) => u.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpBody::Whole(b) => b.size_hint(),
            UpBody::Upload(u) => u.size_hint(),
        }
    }
}

type BoxError = Box<dyn StdError + Send + Sync>;

/// Name resolution for upstream hosts. The engine uses the system resolver; tests inject
/// a stub so no name ever has to resolve to an internal address for real.
pub trait Resolve: Send + Sync + 'static {
    /// Addresses of `host` (never an IP literal: those are not resolved).
    fn resolve(
        &self,
        host: &str,
        port: u16,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<SocketAddr>>> + Send>>;
}

/// `getaddrinfo` on tokio's blocking pool, as hyper's own connector does.
pub(crate) struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve(
        &self,
        host: &str,
        port: u16,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<SocketAddr>>> + Send>> {
        let host = host.to_owned();
        Box::pin(async move { Ok(tokio::net::lookup_host((host, port)).await?.collect()) })
    }
}

/// Whose provider a connection serves: the operator's allow-list applies to platform
/// providers only, never to one an org configured itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum AddressScope {
    Platform,
    Org,
}

/// The upstream host resolved to an address the gateway may not connect to.
#[derive(Debug)]
pub(crate) struct AddressRefused;

impl std::fmt::Display for AddressRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("upstream address refused")
    }
}

impl StdError for AddressRefused {}

/// Addresses no upstream may have unless the operator allows them: loopback, private,
/// link-local (cloud metadata), shared (CGNAT), multicast, broadcast, unspecified,
/// reserved, documentation and benchmark ranges.
fn v4_refused(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    a == 0
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || (a == 100 && b & 0xc0 == 64)
        || (a == 192 && b == 0 && c == 0)
        || (a == 198 && b & 0xfe == 18)
        || ip.is_documentation()
        || ip.is_multicast()
        // 240.0.0.0/4, broadcast included.
        || a >= 240
}

/// The IPv6 counterparts, plus every form that carries an IPv4 address (mapped,
/// compatible, NAT64, 6to4), judged by the address it carries, and Teredo.
fn v6_refused(ip: Ipv6Addr) -> bool {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return v4_refused(v4);
    }
    let s = ip.segments();
    let embedded = |hi: u16, lo: u16| {
        let [a, b] = hi.to_be_bytes();
        let [c, d] = lo.to_be_bytes();
        v4_refused(Ipv4Addr::new(a, b, c, d))
    };
    match s {
        // ::/96: unspecified, loopback and the deprecated IPv4-compatible form.
        [0, 0, 0, 0, 0, 0, _, _] => true,
        // NAT64 well-known prefix.
        [0x64, 0xff9b, 0, 0, 0, 0, hi, lo] => embedded(hi, lo),
        // Local-use NAT64.
        [0x64, 0xff9b, 1, ..] => true,
        // Discard-only.
        [0x100, 0, 0, 0, ..] => true,
        // Teredo, benchmarking, documentation.
        [0x2001, 0, ..] | [0x2001, 2, 0, ..] | [0x2001, 0xdb8, ..] => true,
        // 6to4: the IPv4 address in bits 16..48.
        [0x2002, hi, lo, ..] => embedded(hi, lo),
        // ULA fc00::/7, link-local fe80::/10, site-local fec0::/10, multicast ff00::/8.
        [first, ..] => {
            first & 0xfe00 == 0xfc00
                || first & 0xffc0 == 0xfe80
                || first & 0xffc0 == 0xfec0
                || first & 0xff00 == 0xff00
        }
    }
}

/// Whether `ip` is a public unicast address, one an upstream or a webhook may have without
/// the operator's allow-list. The control plane checks tenants' URLs with this same rule.
pub fn address_is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => !v4_refused(v4),
        IpAddr::V6(v6) => !v6_refused(v6),
    }
}

/// Whether a connection to `ip` is allowed; `allow` is the operator's allow-list, given
/// for platform providers only.
pub(crate) fn permitted(ip: IpAddr, allow: Option<&IpSet>) -> bool {
    address_is_public(ip) || allow.is_some_and(|set| set.contains(ip, 0))
}

/// The TCP connector under TLS: resolve, check every address, connect to a checked one.
#[derive(Clone)]
pub(crate) struct GuardedConnector {
    http: HttpConnector,
    resolver: Arc<dyn Resolve>,
    /// The operator's allow-list when serving platform providers; `None` for org scope.
    allow: Option<Arc<IpSet>>,
}

impl GuardedConnector {
    async fn connect(self, dst: Uri) -> Result<TokioIo<TcpStream>, BoxError> {
        let host = dst
            .host()
            .ok_or("upstream URL without a host")?
            .trim_start_matches('[')
            .trim_end_matches(']');
        let https = dst.scheme() == Some(&Scheme::HTTPS);
        let port = dst.port_u16().unwrap_or(if https { 443 } else { 80 });
        let addrs = match host.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => self.resolver.resolve(host, port).await?,
        };
        if addrs.is_empty() {
            return Err("upstream host resolves to no address".into());
        }
        // One refused address refuses the name: a public name has no business resolving
        // to an internal address, and trying the others would let a rebinding race pick.
        if !addrs
            .iter()
            .all(|a| permitted(a.ip(), self.allow.as_deref()))
        {
            return Err(Box::new(AddressRefused));
        }
        let mut http = self.http;
        let mut last: Option<BoxError> = None;
        for addr in addrs {
            // An IP literal is never resolved again by the inner connector: this is the
            // address that was checked. TLS still verifies (and sends SNI for) the name.
            let pinned = Uri::builder()
                .scheme(if https { Scheme::HTTPS } else { Scheme::HTTP })
                .authority(addr.to_string())
                .path_and_query("/")
                .build()?;
            match tower_service::Service::call(&mut http, pinned).await {
                Ok(io) => return Ok(io),
                Err(e) => last = Some(Box::new(e)),
            }
        }
        Err(last.unwrap_or_else(|| "no upstream address".into()))
    }
}

impl tower_service::Service<Uri> for GuardedConnector {
    type Response = TokioIo<TcpStream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // The inner connector is always ready and the resolver is called per connection.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        Box::pin(self.clone().connect(dst))
    }
}

/// Clients keyed by connect timeout (the one connector setting that varies by provider)
/// and scope, plus the live routing state of providers and deployments, which must
/// survive snapshot swaps like the connection pools do.
pub(crate) struct ClientCache {
    clients: Mutex<HashMap<(Duration, AddressScope), HttpClient>>,
    providers: Mutex<HashMap<String, Arc<ProviderState>>>,
    deployments: Mutex<HashMap<(String, String), Arc<DeploymentStats>>>,
    resolver: Arc<dyn Resolve>,
    /// `upstream_private_cidrs`.
    allow: Arc<IpSet>,
}

/// The strictest cache: no private range allowed, the system resolver. Snapshot
/// validation compiles through it without connecting anywhere.
impl Default for ClientCache {
    fn default() -> Self {
        ClientCache::new(IpSet::default(), Arc::new(SystemResolver))
    }
}

impl ClientCache {
    pub(crate) fn new(allow: IpSet, resolver: Arc<dyn Resolve>) -> Self {
        ClientCache {
            clients: Mutex::default(),
            providers: Mutex::default(),
            deployments: Mutex::default(),
            resolver,
            allow: Arc::new(allow),
        }
    }

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

    pub(crate) fn get(
        &self,
        connect_timeout: Duration,
        scope: AddressScope,
    ) -> Result<HttpClient, Error> {
        let mut clients = self.clients.lock();
        if let Some(c) = clients.get(&(connect_timeout, scope)) {
            return Ok(c.clone());
        }
        let allow = (scope == AddressScope::Platform).then(|| self.allow.clone());
        let client = build_client(connect_timeout, self.resolver.clone(), allow)?;
        clients.insert((connect_timeout, scope), client.clone());
        Ok(client)
    }
}

fn build_client(
    connect_timeout: Duration,
    resolver: Arc<dyn Resolve>,
    allow: Option<Arc<IpSet>>,
) -> Result<HttpClient, Error> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    http.set_keepalive(Some(Duration::from_secs(60)));
    let guarded = GuardedConnector {
        http,
        resolver,
        allow,
    };
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(Arc::new(rustls::crypto::ring::default_provider()))
        .map_err(|e| Error::Tls(format!("client TLS setup: {e}")))?
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(guarded);
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
        if e.is::<AddressRefused>() {
            return ApiError::UpstreamAddressRefused;
        }
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn ok(s: &str, allow: Option<&IpSet>) -> bool {
        permitted(s.parse().unwrap(), allow)
    }

    #[test]
    fn internal_addresses_are_refused_in_every_form() {
        for bad in [
            "0.0.0.0",
            "0.1.2.3",
            "127.0.0.1",
            "127.255.0.9",
            "10.0.0.1",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "100.127.255.255",
            "192.0.0.8",
            "192.0.2.1",
            "198.18.0.1",
            "198.19.255.255",
            "198.51.100.1",
            "203.0.113.1",
            "224.0.0.1",
            "240.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::ffff:10.0.0.1",
            "::10.0.0.1",
            "64:ff9b::a00:1",
            "64:ff9b:1::1",
            "2002:a00:1::",
            "2002:7f00:1::",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "fec0::1",
            "ff02::1",
            "2001:db8::1",
            "2001::1",
            "2001:2::1",
            "100::1",
        ] {
            assert!(!ok(bad, None), "{bad} must be refused");
        }
        for good in [
            "8.8.8.8",
            "1.1.1.1",
            "100.63.255.255",
            "100.128.0.0",
            "172.32.0.1",
            "198.20.0.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::",
        ] {
            assert!(ok(good, None), "{good} is public");
        }
    }

    #[test]
    fn allow_list_opens_only_its_ranges() {
        let allow = IpSet::from_entries([("127.0.0.0/8", None)]).unwrap();
        assert!(ok("127.0.0.1", Some(&allow)));
        assert!(ok("::ffff:127.0.0.1", Some(&allow)));
        assert!(!ok("::1", Some(&allow)));
        assert!(!ok("169.254.169.254", Some(&allow)));
        assert!(!ok("10.0.0.1", Some(&allow)));
        assert!(ok("8.8.8.8", Some(&allow)));
    }

    struct Stub(Vec<SocketAddr>);

    impl Resolve for Stub {
        fn resolve(
            &self,
            _host: &str,
            _port: u16,
        ) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<SocketAddr>>> + Send>> {
            let addrs = self.0.clone();
            Box::pin(async move { Ok(addrs) })
        }
    }

    #[tokio::test]
    async fn connector_refuses_before_connecting() {
        for addr in ["10.0.0.1:80", "169.254.169.254:80", "[::ffff:127.0.0.1]:80"] {
            let connector = GuardedConnector {
                http: HttpConnector::new(),
                resolver: Arc::new(Stub(vec![addr.parse().unwrap()])),
                allow: None,
            };
            let err = connector
                .connect("http://upstream.test/v1".parse().unwrap())
                .await
                .err()
                .unwrap();
            assert!(err.is::<AddressRefused>(), "{addr}: {err}");
        }
    }
}
