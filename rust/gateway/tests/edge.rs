//! The transport edge: where the gateway may connect upstream, how long and how many
//! client connections it keeps, what it accepts as a request head, who the client is
//! behind a proxy, and how much it holds of a misbehaving upstream's answer.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod harness;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use harness::*;
use onetoken_gateway::{Engine, EngineConfig, Resolve};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A resolver that knows a few names and counts the questions.
struct StubResolver {
    names: HashMap<&'static str, Vec<SocketAddr>>,
    asked: AtomicU64,
}

impl Resolve for StubResolver {
    fn resolve(
        &self,
        host: &str,
        _port: u16,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<SocketAddr>>> + Send>> {
        self.asked.fetch_add(1, Ordering::SeqCst);
        let found = self.names.get(host).cloned();
        Box::pin(async move { found.ok_or_else(|| std::io::Error::other("no such name")) })
    }
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no metric {name}"))
}

/// The provider of the spec snapshot, pointed at `base_url`, optionally owned by an org
/// (its models too, as the control plane writes them).
fn provider_at(snap: &mut Value, base_url: &str, org: Option<&str>) {
    snap["providers"][0]["base_url"] = json!(base_url);
    if let Some(org) = org {
        snap["providers"][0]["org_id"] = json!(org);
        for m in snap["models"].as_array_mut().unwrap() {
            m["org_id"] = json!(org);
        }
    }
}

async fn chat_status(addr: SocketAddr) -> Reply {
    post(addr, CHAT, Some("ot-good"), chat("hello", json!({}))).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn org_provider_on_loopback_is_refused_before_connect() {
    let h = Gateway::custom(
        |_| {},
        |s| {
            let url = format!(
                "http://{}/v1",
                s["providers"][0]["base_url"]
                    .as_str()
                    .unwrap()
                    .trim_start_matches("http://")
                    .trim_end_matches("/v1")
            );
            provider_at(s, &url, Some("org_rich"));
        },
    );
    let r = chat_status(h.addr).await;
    assert_eq!(r.status, 502);
    assert_eq!(r.json()["error"]["code"], "upstream_address_refused");
    assert_eq!(r.json()["error"]["type"], "upstream_error");
    assert_eq!(
        h.upstream().requests(),
        0,
        "nothing reached the loopback upstream"
    );
    let recs = h.records();
    assert_eq!(recs[0].error_code, "upstream_address_refused");
    assert_eq!(recs[0].cost, 0);
    assert_eq!(
        metric(
            &h.engine.metrics_text(),
            "onetoken_errors_total{code=\"upstream_address_refused\"}"
        ),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn platform_provider_reaches_loopback_only_inside_the_allow_list() {
    // The spec harness allows 127.0.0.0/8 for platform providers.
    let allowed = Gateway::start();
    assert_eq!(chat_status(allowed.addr).await.status, 200);

    let none = Gateway::custom(|c| c["upstream_private_cidrs"] = json!([]), |_| {});
    let r = chat_status(none.addr).await;
    assert_eq!(r.status, 502);
    assert_eq!(r.json()["error"]["code"], "upstream_address_refused");
    assert_eq!(none.upstream().requests(), 0);

    // An allow-list elsewhere does not open loopback either.
    let other = Gateway::custom(
        |c| c["upstream_private_cidrs"] = json!(["10.0.0.0/8"]),
        |_| {},
    );
    assert_eq!(chat_status(other.addr).await.status, 502);
    assert_eq!(other.upstream().requests(), 0);

    // IPv4-mapped IPv6 literal of loopback is loopback.
    let mapped = Gateway::custom(
        |c| c["upstream_private_cidrs"] = json!([]),
        |s| {
            let port = s["providers"][0]["base_url"]
                .as_str()
                .unwrap()
                .rsplit(':')
                .next()
                .unwrap()
                .trim_end_matches("/v1")
                .to_owned();
            provider_at(s, &format!("http://[::ffff:127.0.0.1]:{port}/v1"), None);
        },
    );
    let r = chat_status(mapped.addr).await;
    assert_eq!(r.json()["error"]["code"], "upstream_address_refused");
}

#[test]
fn invalid_allow_list_is_a_config_error() {
    let cfg = json!({"key_hash_secret_hex": SECRET_HEX, "upstream_private_cidrs": ["10.0.0.0/33"]});
    let err = EngineConfig::from_json(cfg.to_string().as_bytes()).unwrap_err();
    assert!(err.to_string().contains("upstream_private_cidrs"), "{err}");
}

/// Names that resolve to internal addresses are refused at connect time whatever the
/// base URL looks like; the address a name resolved to is the one connected to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_resolving_to_internal_addresses_are_refused() {
    let upstream = Upstream::start();
    let port = upstream.addr.port();
    let names: HashMap<&'static str, Vec<SocketAddr>> = HashMap::from([
        ("private.test", vec!["10.0.0.1:80".parse().unwrap()]),
        ("metadata.test", vec!["169.254.169.254:80".parse().unwrap()]),
        (
            "mixed.test",
            vec![
                SocketAddr::new("127.0.0.1".parse().unwrap(), port),
                "169.254.169.254:80".parse().unwrap(),
            ],
        ),
        (
            "mapped.test",
            vec![SocketAddr::new("::ffff:127.0.0.1".parse().unwrap(), port)],
        ),
    ]);
    let resolver = Arc::new(StubResolver {
        names,
        asked: AtomicU64::new(0),
    });
    let spool = tempdir::Dir::new();
    let engine = Engine::with_resolver(engine_config(spool.path()), resolver.clone()).unwrap();
    let addr = engine.start().unwrap();

    let mut version = 0;
    let mut serve = |host: &str, org: Option<&str>| {
        version += 1;
        let mut snap = spec_snapshot(version, upstream.addr, 100_000_000_000);
        provider_at(&mut snap, &format!("http://{host}:{port}/v1"), org);
        engine.load_snapshot(snap.to_string().as_bytes()).unwrap();
    };
    // Platform providers with 127.0.0.0/8 allowed: the link-local metadata address and
    // 10/8 are still refused, and so is a name with one bad address among good ones.
    for host in ["private.test", "metadata.test", "mixed.test"] {
        serve(host, None);
        let started = Instant::now();
        let r = chat_status(addr).await;
        assert_eq!(
            r.json()["error"]["code"],
            "upstream_address_refused",
            "{host}"
        );
        assert!(
            started.elapsed() < Duration::from_millis(900),
            "refused before any connect attempt"
        );
    }
    // An org's provider never gets the allow-list, even for a mapped loopback address...
    serve("mapped.test", Some("org_rich"));
    let r = chat_status(addr).await;
    assert_eq!(r.json()["error"]["code"], "upstream_address_refused");
    assert_eq!(upstream.requests(), 0);
    // ...which the platform may use: the connection goes to the resolved address.
    serve("mapped.test", None);
    assert_eq!(chat_status(addr).await.status, 200);
    assert_eq!(upstream.requests(), 1);
    assert!(resolver.asked.load(Ordering::SeqCst) >= 5);
    engine.stop(Duration::from_secs(1));
}

// ---- request heads ----

/// Send raw bytes, read until the server closes (or 5 s); returns the response text.
async fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

fn body_of(resp: &str) -> Value {
    serde_json::from_str(resp.split("\r\n\r\n").nth(1).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_get_431_in_the_openai_shape() {
    let h = Gateway::start();
    let big = "a".repeat(64 * 1024);
    let req = format!(
        "POST {CHAT} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer ot-good\r\nX-Pad: {big}\r\nContent-Length: 2\r\n\r\n{{}}"
    );
    let resp = raw(h.addr, req.as_bytes()).await;
    assert!(
        resp.starts_with("HTTP/1.1 431"),
        "{}",
        &resp[..resp.len().min(200)]
    );
    let body = body_of(&resp);
    assert_eq!(body["error"]["code"], "headers_too_large");
    assert!(!resp.contains("aaaa"), "the header is not echoed");
    assert_eq!(h.upstream().requests(), 0);

    // Just under the cap is served.
    let fits = "a".repeat(30 * 1024);
    let body = chat("hi", json!({})).to_string();
    let req = format!(
        "POST {CHAT} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer ot-good\r\nX-Pad: {fits}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    assert!(raw(h.addr, req.as_bytes())
        .await
        .starts_with("HTTP/1.1 200"));
}

/// RFC 9112 section 6.3: with both headers, chunked framing wins, and the connection is
/// closed after the response so bytes after the chunked body are never a request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_with_transfer_encoding_reads_chunked_and_closes() {
    let h = Gateway::start();
    let body = chat("hi", json!({})).to_string();
    let smuggled = "GET /v1/models HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer ot-good\r\n\r\n";
    let req = format!(
        "POST {CHAT} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer ot-good\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n{smuggled}",
        body.len()
    );
    let resp = raw(h.addr, req.as_bytes()).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.to_ascii_lowercase().contains("connection: close"));
    assert_eq!(
        resp.matches("HTTP/1.1 ").count(),
        1,
        "the smuggled request was answered: {resp}"
    );
    assert_eq!(h.upstream().requests(), 1);
    assert_eq!(h.records().len(), 1);
}

// ---- connection limits ----

/// Whether the server closes `s` within `within` (EOF or reset).
async fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_loris_is_closed_after_the_header_timeout() {
    let h = Gateway::custom(|c| c["header_read_timeout_ms"] = json!(500), |_| {});
    // A head that trickles in a byte at a time never completes in time.
    let mut drip = TcpStream::connect(h.addr).await.unwrap();
    let started = Instant::now();
    let head = format!("POST {CHAT} HTTP/1.1\r\nHost: gw\r\nX-Slow: ");
    drip.write_all(head.as_bytes()).await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            // The behaviour under test: a head trickling in a byte at a time.
            tokio::time::sleep(Duration::from_millis(50)).await;
            if drip.write_all(b"a").await.is_err() {
                return;
            }
            let mut buf = [0u8; 64];
            let probe = tokio::time::timeout(Duration::from_millis(1), drip.read(&mut buf));
            if let Ok(Ok(0) | Err(_)) = probe.await {
                return;
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the dripping connection was never closed");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(450),
        "closed too early: {took:?}"
    );

    // A connection that sends nothing at all (not even enough to tell HTTP/1 from 2).
    let mut silent = TcpStream::connect(h.addr).await.unwrap();
    assert!(closed_within(&mut silent, Duration::from_secs(3)).await);
    let text = h.engine.metrics_text();
    assert!(metric(&text, "onetoken_connections_timed_out_total") >= 2);
    // Requests keep being served.
    assert_eq!(chat_status(h.addr).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_http2_connection_is_closed_after_the_idle_timeout() {
    let h = Gateway::custom(|c| c["idle_timeout_ms"] = json!(400), |_| {});
    let stream = TcpStream::connect(h.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    let conn = tokio::spawn(conn);
    let resp = sender
        .send_request(request("GET", "/healthz", None, ""))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    drop(resp);
    let started = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(5), conn).await;
    assert!(ended.is_ok(), "idle h2 connection was kept open");
    assert!(started.elapsed() >= Duration::from_millis(300));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_cap_are_closed_on_accept() {
    let h = Gateway::custom(|c| c["max_connections"] = json!(3), |_| {});
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(TcpStream::connect(h.addr).await.unwrap());
    }
    // Wait until the three are accepted and counted.
    let open = || metric(&h.engine.metrics_text(), "onetoken_connections_open");
    assert!(wait_until_async(WAIT, || open() >= 3).await);
    let mut extra = TcpStream::connect(h.addr).await.unwrap();
    assert!(closed_within(&mut extra, Duration::from_secs(3)).await);
    assert_eq!(
        metric(
            &h.engine.metrics_text(),
            "onetoken_connections_refused_total"
        ),
        1
    );
    drop(held);
    assert!(
        wait_until_async(WAIT, || open() == 0).await,
        "closed connections are uncounted"
    );
    assert_eq!(chat_status(h.addr).await.status, 200);
}

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib * 1024
}

const HELD: usize = 10_000;

/// Child process of `ten_thousand_idle_connections_hold_bounded_memory`: holds idle
/// connections (its descriptors are its own, so both ends fit the limit) until stdin
/// closes.
#[test]
#[ignore = "run by ten_thousand_idle_connections_hold_bounded_memory"]
fn hold_idle_connections_child() {
    let addr = std::env::var("ONETOKEN_HOLD_ADDR")
        .expect("run only as the child of ten_thousand_idle_connections_hold_bounded_memory");
    let mut held = Vec::with_capacity(HELD);
    for _ in 0..HELD {
        held.push(std::net::TcpStream::connect(&addr).unwrap());
    }
    println!("held {}", held.len());
    let mut sink = String::new();
    let _ = std::io::stdin().read_line(&mut sink);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_idle_connections_hold_bounded_memory() {
    use std::io::BufRead;
    let h = Gateway::custom(|_| {}, |_| {});
    assert_eq!(chat_status(h.addr).await.status, 200);
    let before = rss_bytes();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "hold_idle_connections_child",
            "--ignored",
            "--nocapture",
        ])
        .env("ONETOKEN_HOLD_ADDR", h.addr.to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (held_tx, held_rx) = std::sync::mpsc::channel();
    // Reads the child's output to its end, so the child never writes into a closed pipe.
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if line.starts_with("held ") {
                let _ = held_tx.send(line);
            }
        }
    });
    let line = tokio::task::spawn_blocking(move || held_rx.recv().ok())
        .await
        .unwrap();
    assert_eq!(line.as_deref(), Some("held 10000"));
    let open = || metric(&h.engine.metrics_text(), "onetoken_connections_open");
    let all_open = || open() >= HELD as u64;
    assert!(
        wait_until_async(Duration::from_secs(20), all_open).await,
        "connections not all accepted"
    );
    let started = Instant::now();
    let r = chat_status(h.addr).await;
    let latency = started.elapsed();
    assert_eq!(r.status, 200);
    let grown = rss_bytes().saturating_sub(before);
    let per_conn = grown / HELD as u64;
    println!(
        "10k idle connections: RSS +{} KiB ({per_conn} B each), request in {latency:?}",
        grown / 1024
    );
    assert!(per_conn < 16 * 1024, "{per_conn} bytes per idle connection");
    drop(child.stdin.take());
    let _ = child.wait();
    let _ = reader.join();
    assert!(
        wait_until_async(Duration::from_secs(20), || open() <= 1).await,
        "closed connections are uncounted"
    );
}

// ---- the client address behind proxies ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_for_from_an_untrusted_peer_is_ignored() {
    // Trusting 10/8 only: the test client (127.0.0.1) is not a trusted proxy.
    let h = Gateway::custom(
        |c| c["trusted_proxies"] = json!(["10.0.0.0/8"]),
        |s| s["blocked_ips"] = json!([{"cidr": "127.0.0.1", "until": 4_000_000_000i64}]),
    );
    let mut req = chat_request("ot-good", chat("hi", json!({})));
    req.headers_mut()
        .insert("x-forwarded-for", "203.0.113.50".parse().unwrap());
    let r = call(h.addr, req).await;
    assert_eq!(
        r.json()["error"]["code"],
        "ip_blocked",
        "the peer's own address counts"
    );
    assert_eq!(h.records()[0].source_ip, "127.0.0.1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_for_from_a_trusted_proxy_names_the_client() {
    let h = Gateway::custom(
        |c| c["trusted_proxies"] = json!(["127.0.0.0/8", "10.0.0.0/8"]),
        |s| s["blocked_ips"] = json!([{"cidr": "198.51.100.0/24", "until": 4_000_000_000i64}]),
    );
    let send = |xff: &'static str| {
        let mut req = chat_request("ot-good", chat("hi", json!({})));
        req.headers_mut()
            .insert("x-forwarded-for", xff.parse().unwrap());
        call(h.addr, req)
    };
    // The client forged a left-hand entry; the rightmost untrusted hop is the client.
    let r = send("198.51.100.9, 203.0.113.50, 10.1.2.3").await;
    assert_eq!(r.status, 200);
    let r = send("203.0.113.50, 198.51.100.9").await;
    assert_eq!(r.json()["error"]["code"], "ip_blocked");
    let recs = h.records();
    assert_eq!(recs[0].source_ip, "203.0.113.50");
    assert_eq!(recs[1].source_ip, "198.51.100.9");
}

fn proxy_v2(src: [u8; 4], port: u16) -> Vec<u8> {
    let mut v = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    v.extend_from_slice(&[0x21, 0x11, 0, 12]);
    v.extend_from_slice(&src);
    v.extend_from_slice(&[127, 0, 0, 1]);
    v.extend_from_slice(&port.to_be_bytes());
    v.extend_from_slice(&443u16.to_be_bytes());
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_v2_names_the_client_for_a_trusted_balancer() {
    let h = behind_proxy_protocol(json!(["127.0.0.0/8"]))
        .patch_snapshot(|s| {
            s["blocked_ips"] = json!([{"cidr": "198.51.100.7", "until": 4_000_000_000i64}]);
        })
        .start();
    let http = raw_chat();
    let ok = raw(
        h.addr,
        &[proxy_v2([203, 0, 113, 7], 5000), http.clone().into_bytes()].concat(),
    )
    .await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    let blocked = raw(
        h.addr,
        &[proxy_v2([198, 51, 100, 7], 5001), http.clone().into_bytes()].concat(),
    )
    .await;
    assert!(blocked.starts_with("HTTP/1.1 403"), "{blocked}");
    // The listener requires the header: plain HTTP is dropped.
    assert_eq!(raw(h.addr, http.as_bytes()).await, "");
    let recs = h.records();
    assert_eq!(recs[0].source_ip, "203.0.113.7");
    assert_eq!(recs[1].source_ip, "198.51.100.7");
}

/// A gateway whose every connection starts with a PROXY protocol v2 header, believed from
/// `trusted` peers.
fn behind_proxy_protocol(trusted: Value) -> GatewayBuilder<'static> {
    Gateway::builder().config(|c| {
        c["proxy_protocol"] = json!(true);
        c["trusted_proxies"] = trusted;
    })
}

/// A whole HTTP/1.1 chat request with key `ot-good` that closes its connection.
fn raw_chat() -> String {
    let body = chat("hi", json!({})).to_string();
    format!(
        "POST {CHAT} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer ot-good\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_from_an_untrusted_peer_is_ignored() {
    let h = behind_proxy_protocol(json!(["10.0.0.0/8"])).start();
    let http = raw_chat();
    let ok = raw(
        h.addr,
        &[proxy_v2([203, 0, 113, 7], 5000), http.into_bytes()].concat(),
    )
    .await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    assert_eq!(h.records()[0].source_ip, "127.0.0.1");
}

// ---- a misbehaving upstream ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_sse_event_ends_the_stream_at_the_frame_cap() {
    let h = Gateway::custom(|c| c["max_upstream_event_bytes"] = json!(64 * 1024), |_| {});
    let r = h
        .chat(
            "hi",
            json!({"stream": true, "mock": {"unframed_kib": 100_000}}),
        )
        .await;
    assert_eq!(r.status, 200);
    let text = r.text();
    assert!(text.contains("upstream_response_too_large"), "{text}");
    assert!(
        !text.contains("xxxx"),
        "no part of the oversized event is relayed"
    );
    let rec = &h.records()[0];
    assert_eq!(rec.error_code, "upstream_response_too_large");
    assert_eq!(rec.streamed, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickling_stream_ends_at_the_response_deadline() {
    let h = Gateway::custom(|c| c["upstream_deadline_ms"] = json!(600), |_| {});
    let started = Instant::now();
    // One event every 50 ms keeps the 3 s idle timer from ever firing.
    let r = h
        .chat(
            "hi",
            json!({"stream": true, "mock": {"chunks": 1000, "delay_ms": 50}}),
        )
        .await;
    let took = started.elapsed();
    assert_eq!(r.status, 200);
    assert!(r.text().contains("upstream_timeout"));
    assert!(took < Duration::from_secs(3), "{took:?}");
    let rec = &h.records()[0];
    assert_eq!(rec.error_code, "upstream_timeout");
    // What was relayed before the deadline is still metered.
    assert!(rec.completion_tokens > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_response_deadline_also_bounds_the_wait_for_headers() {
    let h = Gateway::custom(
        |c| c["upstream_deadline_ms"] = json!(500),
        |s| s["providers"][0]["first_byte_timeout_ms"] = json!(10_000),
    );
    let started = Instant::now();
    // Headers after 3 s: within the provider's first-byte timeout, past the deadline.
    let r = h.chat("hi", json!({"mock": {"latency_ms": 3000}})).await;
    let took = started.elapsed();
    assert_eq!(r.status, 504);
    assert_eq!(r.json()["error"]["code"], "upstream_timeout");
    assert!(took < Duration::from_secs(2), "{took:?}");
    h.wait_records(1).await;
    assert_eq!(h.records()[0].error_code, "upstream_timeout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_streamed_answer_over_the_cap_is_refused_and_not_charged() {
    let h = Gateway::custom(|c| c["max_upstream_body_bytes"] = json!(4096), |_| {});
    let r = h.chat("hi", json!({"mock": {"chunks": 2000}})).await;
    assert_eq!(r.status, 502);
    assert_eq!(r.json()["error"]["code"], "upstream_response_too_large");
    let rec = &h.records()[0];
    assert_eq!(rec.error_code, "upstream_response_too_large");
    assert_eq!(rec.cost, 0);
    // Under the cap is served.
    let r = h.chat("hi", json!({"mock": {"chunks": 10}})).await;
    assert_eq!(r.status, 200);
}
