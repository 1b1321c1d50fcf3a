//! Harness for routing, policy and protocol specs: a real engine in front of several
//! upstreams (the bundled mock speaking each protocol, plus a scripted one whose answer
//! can be switched), with snapshot builders.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use onetoken_gateway::{hash_key, CallRecord, Engine, EngineConfig};
use onetoken_mock_upstream::{MockDefaults, MockServer};
use serde_json::{json, Value};

#[path = "../common/journal_tail.rs"]
pub mod journal_tail;
use journal_tail::JournalTail;

pub const SECRET_HEX: &str = "0000000000000000000000000000000000000000000000000000000000000000";
pub const CANARY: &str = "CANARY-7f3a9c1d-routing-do-not-store";

pub fn key_hash(key: &str) -> String {
    hash_key(&hex::decode(SECRET_HEX).unwrap(), key)
}

pub fn engine_config(spool_dir: &str) -> EngineConfig {
    let cfg = json!({
        "listen": "127.0.0.1:0",
        "key_hash_secret_hex": SECRET_HEX,
        "worker_threads": 2,
        "spool_dir": spool_dir,
        "max_body_bytes": 1048576,
        "shutdown_grace_ms": 2000,
        "upstream_private_cidrs": ["127.0.0.0/8"],
    });
    EngineConfig::from_json(cfg.to_string().as_bytes()).unwrap()
}

/// A mock upstream with default controls.
pub fn mock() -> MockServer {
    mock_with(MockDefaults::default())
}

pub fn mock_with(defaults: MockDefaults) -> MockServer {
    MockServer::start("127.0.0.1:0", defaults).unwrap()
}

/// An address nothing listens on (connection refused).
pub fn dead_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let a = l.local_addr().unwrap();
    drop(l);
    a
}

/// An upstream whose answer is switched at run time: an error status with a body that
/// echoes the canary, or (status 200) a minimal OpenAI chat completion; status 1 means
/// "an Anthropic stream that fails mid-way with an error event quoting the canary".
pub struct Scripted {
    pub addr: SocketAddr,
    pub status: Arc<AtomicU16>,
    pub hits: Arc<AtomicU64>,
    rt: Option<tokio::runtime::Runtime>,
}

impl Drop for Scripted {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

async fn scripted_answer(
    status: Arc<AtomicU16>,
    hits: Arc<AtomicU64>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    hits.fetch_add(1, Ordering::SeqCst);
    let _ = req.into_body().collect().await;
    let s = status.load(Ordering::SeqCst);
    let (code, ct, body) = match s {
        200 => (
            200,
            "application/json",
            json!({"id": "c1", "object": "chat.completion", "created": 1, "model": "scripted",
                   "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
                   "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}})
            .to_string(),
        ),
        1 => (
            200,
            "text/event-stream",
            format!(
                "event: message_start\ndata: {}\n\nevent: content_block_start\ndata: {}\n\nevent: content_block_delta\ndata: {}\n\nevent: error\ndata: {}\n\n",
                json!({"type": "message_start", "message": {"id": "m", "type": "message", "role": "assistant", "model": "x", "content": [], "stop_reason": null, "stop_sequence": null, "usage": {"input_tokens": 3, "output_tokens": 1}}}),
                json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "partial "}}),
                json!({"type": "error", "error": {"type": "overloaded_error", "message": format!("overloaded while answering {CANARY}")}}),
            ),
        ),
        other => (
            other,
            "application/json",
            json!({"error": {"message": format!("failed on {CANARY}"), "type": "server_error", "code": CANARY}})
                .to_string(),
        ),
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = StatusCode::from_u16(code).unwrap();
    r.headers_mut().insert("content-type", ct.parse().unwrap());
    Ok(r)
}

impl Scripted {
    pub fn start(status: u16) -> Scripted {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let status = Arc::new(AtomicU16::new(status));
        let hits = Arc::new(AtomicU64::new(0));
        let (s2, h2) = (status.clone(), hits.clone());
        rt.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (s3, h3) = (s2.clone(), h2.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        scripted_answer(s3.clone(), h3.clone(), req)
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Scripted {
            addr,
            status,
            hits,
            rt: Some(rt),
        }
    }

    pub fn set(&self, status: u16) {
        self.status.store(status, Ordering::SeqCst);
    }

    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::SeqCst)
    }
}

/// A provider entry. `base` is the full base URL.
pub fn provider(id: &str, protocol: &str, base: String, extra: Value) -> Value {
    let mut p = json!({
        "id": id, "name": id, "protocol": protocol, "base_url": base, "api_key": "sk-up",
        "connect_timeout_ms": 500, "first_byte_timeout_ms": 3000, "idle_timeout_ms": 3000,
    });
    merge(&mut p, extra);
    p
}

pub fn openai(id: &str, addr: SocketAddr, extra: Value) -> Value {
    provider(id, "openai", format!("http://{addr}/v1"), extra)
}

/// A chat deployment. Prices: nano-units per million tokens.
pub fn deployment(
    name: &str,
    provider_id: &str,
    upstream: &str,
    input: i64,
    output: i64,
    extra: Value,
) -> Value {
    let mut m = json!({
        "name": name, "kind": "chat", "provider_id": provider_id, "upstream_model": upstream,
        "input_price": input, "output_price": output, "cached_input_price": 0, "max_output_tokens": 1000,
    });
    merge(&mut m, extra);
    m
}

pub fn merge(target: &mut Value, extra: Value) {
    if let (Some(t), Value::Object(e)) = (target.as_object_mut(), extra) {
        for (k, v) in e {
            t.insert(k, v);
        }
    }
}

/// A snapshot: org `org_a` (key `ot-a`, `key_a`) and org `org_b` (key `ot-b`); `extra`
/// is merged at the top level (routes, routing), `org_policy`/`key_policy` apply to
/// org_a and its key.
pub fn snapshot(
    version: u64,
    providers: Vec<Value>,
    models: Vec<Value>,
    extra: Value,
    org_policy: Value,
    key_policy: Value,
) -> Value {
    let mut s = json!({
        "version": version,
        "orgs": [
            {"id": "org_a", "status": "active", "balance": 1_000_000_000_000i64, "spent_mark": 0, "policy": org_policy},
            {"id": "org_b", "status": "active", "balance": 1_000_000_000_000i64, "spent_mark": 0},
        ],
        "keys": [
            {"hash": key_hash("ot-a"), "key_id": "key_a", "display": "ot-…", "org_id": "org_a", "account_id": "acc_a",
             "status": "active", "expires_at": null, "allowed_models": null, "policy": key_policy},
            {"hash": key_hash("ot-b"), "key_id": "key_b", "display": "ot-…", "org_id": "org_b", "account_id": "acc_b",
             "status": "active", "expires_at": null, "allowed_models": null},
        ],
        "providers": providers,
        "models": models,
    });
    merge(&mut s, extra);
    s
}

pub struct Fleet {
    pub engine: Engine,
    pub addr: SocketAddr,
    pub spool: Spool,
    journal: JournalTail,
}

pub struct Spool(pub std::path::PathBuf);

impl Drop for Spool {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Fleet {
    pub fn start(snapshot: Value) -> Fleet {
        let dir =
            std::env::temp_dir().join(format!("onetoken-fleet-{:016x}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        let engine = Engine::new(engine_config(dir.to_str().unwrap())).unwrap();
        engine
            .load_snapshot(snapshot.to_string().as_bytes())
            .unwrap();
        let addr = engine.start().unwrap();
        let journal = JournalTail::new(&dir, engine.instance_id());
        Fleet {
            engine,
            addr,
            spool: Spool(dir),
            journal,
        }
    }

    /// Wait (bounded) for `n` records in total, then take those not taken before.
    pub async fn records(&self, n: u64) -> Vec<CallRecord> {
        for _ in 0..500 {
            if self.engine.stats().records_total >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            self.engine.stats().records_total >= n,
            "expected {n} records"
        );
        // A record is committed just after its response is sent, and a request is in
        // flight until then.
        for _ in 0..200 {
            if self.engine.stats().in_flight == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Request order: commit order may differ by a few microseconds.
        let mut recs = self.journal.take();
        recs.sort_by_key(|r| r.ts);
        recs
    }

    pub fn org_spent(&self, org: &str) -> i64 {
        self.engine
            .org_spend()
            .into_iter()
            .find(|o| o.0 == org)
            .map_or(0, |o| o.1)
    }

    /// Every persisted or reported byte is free of the canary.
    pub fn assert_no_canary(&self, records: &[CallRecord], texts: &[&str]) {
        for r in records {
            let line = serde_json::to_string(r).unwrap();
            assert!(!line.contains(CANARY), "canary in record {line}");
        }
        for t in texts {
            assert!(!t.contains(CANARY), "canary in a response: {t}");
        }
        assert!(
            !self.engine.metrics_text().contains(CANARY),
            "canary in metrics"
        );
        if let Ok(entries) = std::fs::read_dir(&self.spool.0) {
            for e in entries.flatten() {
                let data = std::fs::read(e.path()).unwrap_or_default();
                assert!(
                    !String::from_utf8_lossy(&data).contains(CANARY),
                    "canary on disk"
                );
            }
        }
    }
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub text: String,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("{e}: {}", self.text))
    }

    /// `data:` payloads of an SSE body (JSON ones parsed; `[DONE]` as a string).
    pub fn events(&self) -> Vec<(Option<String>, Value)> {
        self.text
            .replace("\r\n", "\n")
            .split("\n\n")
            .filter(|e| !e.trim().is_empty())
            .map(|e| {
                let mut name = None;
                let mut data = String::new();
                for line in e.lines() {
                    if let Some(v) = line.strip_prefix("event: ") {
                        name = Some(v.to_owned());
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data.push_str(v);
                    }
                }
                let v = serde_json::from_str(&data).unwrap_or(Value::String(data));
                (name, v)
            })
            .collect()
    }
}

/// POST `body` to `path` with `headers`; the whole response (streams read to the end).
pub async fn send(addr: SocketAddr, path: &str, headers: &[(&str, &str)], body: Value) -> Reply {
    send_bytes(addr, path, headers, Bytes::from(body.to_string())).await
}

/// POST raw `body` bytes (not necessarily JSON) to `path`.
pub async fn send_bytes(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Reply {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut b = Request::builder()
        .method("POST")
        .uri(path)
        .header("host", "gw")
        .header("content-type", "application/json");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let resp = sender
        .send_request(b.body(Full::new(body)).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    // A stream the gateway ends abnormally still ends cleanly at the HTTP level.
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    Reply {
        status,
        headers,
        text: String::from_utf8_lossy(&bytes).into_owned(),
    }
}

pub async fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Reply {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut b = Request::builder()
        .method("GET")
        .uri(path)
        .header("host", "gw");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let resp = sender
        .send_request(b.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    Reply {
        status,
        headers,
        text: String::from_utf8_lossy(&bytes).into_owned(),
    }
}

/// A chat request with key `ot-a`.
pub async fn chat(addr: SocketAddr, body: Value) -> Reply {
    send(
        addr,
        "/v1/chat/completions",
        &[("authorization", "Bearer ot-a")],
        body,
    )
    .await
}

pub fn chat_body(model: &str, content: &str, extra: Value) -> Value {
    let mut v = json!({"model": model, "messages": [{"role": "user", "content": content}]});
    merge(&mut v, extra);
    v
}
