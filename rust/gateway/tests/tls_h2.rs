//! Transport specs: TLS termination (with a certificate made at test time) and HTTP/2,
//! both over TLS (ALPN) and in cleartext with prior knowledge (h2c).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod harness;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use harness::*;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use onetoken_gateway::{Engine, Error, TlsConfig};
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::json;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// A self-signed certificate for `localhost` written as PEM files into `dir`.
struct Cert {
    der: CertificateDer<'static>,
    cert_path: String,
    key_path: String,
}

fn self_signed(dir: &tempdir::Dir) -> Cert {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let cert_path = dir.0.join("cert.pem");
    let key_path = dir.0.join("key.pem");
    std::fs::write(&cert_path, ck.cert.pem()).unwrap();
    std::fs::write(&key_path, ck.signing_key.serialize_pem()).unwrap();
    Cert {
        der: ck.cert.der().clone(),
        cert_path: cert_path.to_str().unwrap().to_owned(),
        key_path: key_path.to_str().unwrap().to_owned(),
    }
}

/// The spec gateway terminating TLS with `cert`.
fn start_tls(cert: &Cert) -> Gateway {
    let tls = json!({"cert_path": cert.cert_path, "key_path": cert.key_path});
    Gateway::builder().config(|c| c["tls"] = tls).start()
}

/// A TLS client that trusts only `cert` and offers `alpn`.
async fn tls_connect(addr: SocketAddr, cert: &Cert, alpn: &[&[u8]]) -> TlsStream<TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.der.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = TcpStream::connect(addr).await.unwrap();
    TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap()
}

/// HTTP/1.1 over an established TLS stream.
async fn send_h1(io: TlsStream<TcpStream>, req: Request<Full<Bytes>>) -> Response<Incoming> {
    http1(io).await.send_request(req).await.unwrap()
}

/// An HTTP/2 connection (over TLS or cleartext); requests are sent on its one sender.
async fn h2_sender<I>(io: I) -> hyper::client::conn::http2::SendRequest<Full<Bytes>>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
            .await
            .unwrap();
    tokio::spawn(conn);
    sender
}

/// HTTP/2 requests need an absolute URI (scheme and authority become pseudo-headers).
fn h2_request(
    scheme: &str,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: String,
) -> Request<Full<Bytes>> {
    let mut b = Request::builder()
        .method(method)
        .uri(format!("{scheme}://localhost{path}"))
        .header("user-agent", "spec-test/1.0");
    if let Some(k) = key {
        b = b.header("authorization", format!("Bearer {k}"));
    }
    b.body(Full::new(Bytes::from(body))).unwrap()
}

async fn collect(resp: Response<Incoming>) -> Reply {
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Reply {
        status,
        headers,
        body,
    }
}

/// Read a streamed body frame by frame: (frames received, whole text).
async fn collect_frames(resp: Response<Incoming>) -> (usize, String) {
    let mut body = resp.into_body();
    let mut frames = 0;
    let mut text = String::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            frames += 1;
            text.push_str(&String::from_utf8_lossy(&data));
        }
    }
    (frames, text)
}

fn assert_chat_ok(r: &Reply) {
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["content"], "tok tok ");
    assert!(r.headers.contains_key("x-request-id"));
}

fn assert_stream_ok(text: &str) {
    let events: Vec<&str> = text
        .split("\n\n")
        .filter(|e| e.starts_with("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"data: [DONE]"), "{text}");
    let chunks = events
        .iter()
        .filter(|e| e.contains("\"chat.completion.chunk\""))
        .count();
    assert_eq!(chunks, 3, "{text}");
}

/// Over one HTTP/2 connection (`scheme` https: TLS with ALPN, http: prior knowledge):
/// health, chats multiplexed, a stream that arrives as produced, authentication.
async fn speaks_h2(mut sender: hyper::client::conn::http2::SendRequest<Full<Bytes>>, scheme: &str) {
    let resp = sender
        .send_request(h2_request(scheme, "GET", "/healthz", None, String::new()))
        .await
        .unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(collect(resp).await.status, StatusCode::OK);

    // Several requests multiplexed on the one connection.
    let body = chat("hello over h2", json!({"mock": {"chunks": 2}})).to_string();
    let mut pending = Vec::new();
    for _ in 0..3 {
        let req = h2_request(scheme, "POST", CHAT, Some("ot-good"), body.clone());
        pending.push(sender.send_request(req));
    }
    for p in pending {
        let resp = p.await.unwrap();
        assert_eq!(resp.version(), http::Version::HTTP_2);
        assert_chat_ok(&collect(resp).await);
    }

    // The stream arrives as it is produced: the upstream spaces its chunks, and the
    // client sees more than one data frame before the end.
    let body = chat(
        "stream over h2",
        json!({"stream": true, "mock": {"chunks": 3, "delay_ms": 30}}),
    )
    .to_string();
    let resp = sender
        .send_request(h2_request(scheme, "POST", CHAT, Some("ot-good"), body))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let (frames, text) = collect_frames(resp).await;
    assert!(frames > 1, "stream was buffered into {frames} frame(s)");
    assert_stream_ok(&text);

    // Unauthenticated HTTP/2 is refused like HTTP/1.1.
    let body = chat("x", json!({})).to_string();
    let resp = sender
        .send_request(h2_request(scheme, "POST", CHAT, None, body))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_terminates_http1_health_and_chat() {
    let dir = tempdir::Dir::new();
    let cert = self_signed(&dir);
    let h = start_tls(&cert);

    let io = tls_connect(h.addr, &cert, &[b"http/1.1"]).await;
    assert_eq!(io.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let r = collect(send_h1(io, request("GET", "/healthz", None, "")).await).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["status"], "ok");
    assert_eq!(r.json()["snapshot_version"], 1);

    let body = chat("hello over tls", json!({"mock": {"chunks": 2}})).to_string();
    let io = tls_connect(h.addr, &cert, &[b"http/1.1"]).await;
    let r = collect(send_h1(io, request("POST", CHAT, Some("ot-good"), body.clone())).await).await;
    assert_chat_ok(&r);

    // Authentication still applies behind TLS.
    let io = tls_connect(h.addr, &cert, &[b"http/1.1"]).await;
    let r = collect(send_h1(io, request("POST", CHAT, Some("ot-unknown"), body)).await).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.json()["error"]["code"], "invalid_api_key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_negotiates_h2_by_alpn_for_chat_and_stream() {
    let dir = tempdir::Dir::new();
    let cert = self_signed(&dir);
    let h = start_tls(&cert);

    let io = tls_connect(h.addr, &cert, &[b"h2", b"http/1.1"]).await;
    assert_eq!(io.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    speaks_h2(h2_sender(io).await, "https").await;
    h.wait_records(5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_rejects_a_plaintext_client() {
    let dir = tempdir::Dir::new();
    let cert = self_signed(&dir);
    let h = start_tls(&cert);
    let mut sender = connect(h.addr).await;
    let res = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        sender.send_request(request("GET", "/healthz", None, "")),
    )
    .await
    .expect("the server closes a non-TLS connection");
    assert!(
        res.is_err(),
        "plain HTTP must not be served on the TLS listener"
    );
}

fn tls_start_error(cert_path: &str, key_path: &str) -> Error {
    let spool = tempdir::Dir::new();
    let mut cfg = engine_config(spool.path());
    cfg.tls = Some(TlsConfig {
        cert_path: cert_path.to_owned(),
        key_path: key_path.to_owned(),
    });
    let engine = match Engine::new(cfg) {
        Ok(engine) => engine,
        Err(e) => return e,
    };
    match engine.start() {
        Ok(addr) => panic!("engine started on {addr} with a bad TLS configuration"),
        Err(e) => e,
    }
}

#[test]
fn bad_tls_files_fail_start_with_a_tls_error() {
    let dir = tempdir::Dir::new();
    let cert = self_signed(&dir);
    let missing = dir.0.join("missing.pem");
    let missing = missing.to_str().unwrap();
    let garbage = dir.0.join("garbage.pem");
    std::fs::write(&garbage, "not a pem file\n").unwrap();
    let garbage = garbage.to_str().unwrap();

    for (what, cert_path, key_path) in [
        ("missing certificate", missing, cert.key_path.as_str()),
        ("missing key", cert.cert_path.as_str(), missing),
        (
            "certificate file without a certificate",
            garbage,
            cert.key_path.as_str(),
        ),
        ("key file without a key", cert.cert_path.as_str(), garbage),
        (
            "certificate given as the key",
            cert.cert_path.as_str(),
            cert.cert_path.as_str(),
        ),
    ] {
        let err = tls_start_error(cert_path, key_path);
        assert!(matches!(err, Error::Tls(_)), "{what}: {err:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_prior_knowledge_chat_and_stream() {
    let h = Gateway::start();
    let tcp = TcpStream::connect(h.addr).await.unwrap();
    speaks_h2(h2_sender(tcp).await, "http").await;
    h.wait_records(5).await;
}
