//! Test harness: a tiny OpenAI-like upstream, an HTTP client, and snapshot builders.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use onetoken_gateway::{hash_key, Engine, EngineConfig};
use serde_json::{json, Value};
use tokio::sync::mpsc;

pub mod journal_tail;
#[allow(unused_imports)]
pub use journal_tail::{journal_records, JournalTail};

pub const SECRET_HEX: &str = "0000000000000000000000000000000000000000000000000000000000000000";
pub const CANARY: &str = "CANARY-e3b0c44298fc-do-not-store";

/// Body fed from a channel; an `Err` cuts the connection mid-body.
struct ChanBody(mpsc::Receiver<Result<Bytes, std::io::Error>>);

impl Body for ChanBody {
    type Data = Bytes;
    type Error = std::io::Error;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.0.poll_recv(cx).map(|o| o.map(|r| r.map(Frame::data)))
    }
}

enum UpBody {
    Full(Option<Bytes>),
    Chan(ChanBody),
}

impl Body for UpBody {
    type Data = Bytes;
    type Error = std::io::Error;
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            UpBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            UpBody::Chan(c) => Pin::new(c).poll_frame(cx),
        }
    }
}

/// What the upstream saw and did.
#[derive(Default)]
pub struct UpstreamState {
    pub requests: AtomicU64,
    pub chunks_sent: AtomicU64,
    pub last_body: parking_lot::Mutex<Option<Value>>,
}

pub struct Upstream {
    pub addr: SocketAddr,
    pub state: Arc<UpstreamState>,
    rt: Option<tokio::runtime::Runtime>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl Upstream {
    pub fn start() -> Upstream {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(UpstreamState::default());
        let st = state.clone();
        rt.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let st = st.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| answer(st.clone(), req));
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Upstream {
            addr,
            state,
            rt: Some(rt),
        }
    }

    pub fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::SeqCst)
    }
}

fn words(v: &Value) -> u64 {
    v["messages"]
        .as_array()
        .map(|ms| {
            ms.iter()
                .map(|m| {
                    4 + m["content"]
                        .as_str()
                        .unwrap_or("")
                        .split_whitespace()
                        .count() as u64
                })
                .sum()
        })
        .unwrap_or(0)
}

async fn answer(
    st: Arc<UpstreamState>,
    req: Request<Incoming>,
) -> Result<Response<UpBody>, Infallible> {
    st.requests.fetch_add(1, Ordering::SeqCst);
    let path = req.uri().path().to_owned();
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    *st.last_body.lock() = Some(v.clone());
    let mock = &v["mock"];
    let chunks = mock["chunks"].as_u64().unwrap_or(8);
    let delay = Duration::from_millis(mock["delay_ms"].as_u64().unwrap_or(0));
    let latency = mock["latency_ms"].as_u64().unwrap_or(0);
    if latency > 0 {
        tokio::time::sleep(Duration::from_millis(latency)).await;
    }
    let echo = mock["echo"].as_bool().unwrap_or(false);
    let last_user = v["messages"]
        .as_array()
        .and_then(|m| m.last())
        .and_then(|m| m["content"].as_str())
        .unwrap_or("")
        .to_owned();
    let status = mock["status"].as_u64().unwrap_or(200) as u16;
    if status != 200 {
        let msg = if echo {
            format!("bad request: {last_user}")
        } else {
            "error".into()
        };
        let b = json!({"error": {"message": msg, "type": "server_error", "code": if echo { Value::String(last_user.clone()) } else { Value::Null }}});
        let mut r = Response::new(UpBody::Full(Some(Bytes::from(b.to_string()))));
        *r.status_mut() = StatusCode::from_u16(status).unwrap();
        return Ok(r);
    }
    let model = v["model"].as_str().unwrap_or("").to_owned();
    let prompt = words(&v);
    if path.ends_with("/embeddings") {
        let b = json!({"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.1,0.2]}],"model":model,"usage":{"prompt_tokens":7,"total_tokens":7}});
        return Ok(Response::new(UpBody::Full(Some(Bytes::from(
            b.to_string(),
        )))));
    }
    let text = if echo {
        last_user.clone()
    } else {
        "tok ".repeat(chunks as usize)
    };
    let with_usage = mock["usage"].as_bool().unwrap_or(true);
    if v["stream"].as_bool() != Some(true) {
        let mut b = json!({"id":"c1","object":"chat.completion","model":model,"choices":[{"index":0,"message":{"role":"assistant","content":text},"finish_reason":"stop"}]});
        if with_usage {
            b["usage"] = json!({"prompt_tokens":prompt,"completion_tokens":chunks,"total_tokens":prompt+chunks});
        }
        let mut r = Response::new(UpBody::Full(Some(Bytes::from(b.to_string()))));
        r.headers_mut()
            .insert("content-type", "application/json".parse().unwrap());
        return Ok(r);
    }
    if let Some(kib) = mock["unframed_kib"].as_u64() {
        // One event that never ends: `data: ` and then bytes without a blank line.
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let _ = tx.send(Ok(Bytes::from_static(b"data: "))).await;
            for _ in 0..kib {
                if tx.send(Ok(Bytes::from(vec![b'x'; 1024]))).await.is_err() {
                    return;
                }
            }
        });
        let mut r = Response::new(UpBody::Chan(ChanBody(rx)));
        r.headers_mut()
            .insert("content-type", "text/event-stream".parse().unwrap());
        return Ok(r);
    }
    let include_usage = with_usage && v["stream_options"]["include_usage"].as_bool() == Some(true);
    let cut_after = mock["cut_after"].as_u64();
    let linger_ms = mock["linger_ms"].as_u64().unwrap_or(0);
    let (tx, rx) = mpsc::channel(16);
    let st2 = st.clone();
    tokio::spawn(async move {
        for i in 0..chunks {
            if cut_after == Some(i) {
                let _ = tx.send(Err(std::io::Error::other("cut"))).await;
                return;
            }
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let content = if echo && i == 0 {
                last_user.clone()
            } else {
                "tok ".to_owned()
            };
            let ev = json!({"id":"c1","object":"chat.completion.chunk","model":model,"choices":[{"index":0,"delta":{"content":content}}]});
            if tx
                .send(Ok(Bytes::from(format!("data: {ev}\n\n"))))
                .await
                .is_err()
            {
                return;
            }
            st2.chunks_sent.fetch_add(1, Ordering::SeqCst);
        }
        if include_usage {
            let ev = json!({"id":"c1","object":"chat.completion.chunk","model":model,"choices":[],"usage":{"prompt_tokens":prompt,"completion_tokens":chunks,"total_tokens":prompt+chunks}});
            let _ = tx.send(Ok(Bytes::from(format!("data: {ev}\n\n")))).await;
        }
        let _ = tx.send(Ok(Bytes::from_static(b"data: [DONE]\n\n"))).await;
        // An upstream that keeps the body open after its terminal event.
        if linger_ms > 0 {
            tokio::time::sleep(Duration::from_millis(linger_ms)).await;
        }
    });
    let mut r = Response::new(UpBody::Chan(ChanBody(rx)));
    r.headers_mut()
        .insert("content-type", "text/event-stream".parse().unwrap());
    Ok(r)
}

pub fn engine_config(spool_dir: &str) -> EngineConfig {
    EngineConfig::from_json(engine_config_json(spool_dir).to_string().as_bytes()).unwrap()
}

/// The engine configuration of the specs, as JSON to patch.
pub fn engine_config_json(spool_dir: &str) -> Value {
    json!({
        "listen": "127.0.0.1:0",
        "key_hash_secret_hex": SECRET_HEX,
        "worker_threads": 2,
        "spool_dir": spool_dir,
        "max_body_bytes": 65536,
        "shutdown_grace_ms": 5000,
        // The mock upstream is on loopback, which only an allow-listed platform
        // provider may reach.
        "upstream_private_cidrs": ["127.0.0.0/8"],
    })
}

pub fn key_hash(key: &str) -> String {
    hash_key(&hex::decode(SECRET_HEX).unwrap(), key)
}

pub fn snapshot(version: u64, upstream: SocketAddr, rich_balance: i64) -> Value {
    let key = |k: &str, id: &str, org: &str, status: &str, expires: Value, allowed: Value| {
        json!({"hash": key_hash(k), "key_id": id, "display": "ot-…", "org_id": org, "account_id": "acc_1",
               "status": status, "expires_at": expires, "allowed_models": allowed})
    };
    json!({
        "version": version,
        "orgs": [
            {"id": "org_rich", "status": "active", "balance": rich_balance, "spent_mark": 0},
            {"id": "org_poor", "status": "active", "balance": 10, "spent_mark": 0},
            {"id": "org_off", "status": "disabled", "balance": 1_000_000_000, "spent_mark": 0}
        ],
        "keys": [
            key("ot-good", "key_good", "org_rich", "active", Value::Null, Value::Null),
            key("ot-revoked", "key_revoked", "org_rich", "revoked", Value::Null, Value::Null),
            key("ot-expired", "key_expired", "org_rich", "active", json!(1), Value::Null),
            key("ot-poor", "key_poor", "org_poor", "active", Value::Null, Value::Null),
            key("ot-off", "key_off", "org_off", "active", Value::Null, Value::Null),
            key("ot-embed-only", "key_embed", "org_rich", "active", Value::Null, json!(["demo-embed"]))
        ],
        "providers": [{
            "id": "prov_test", "name": "test", "protocol": "openai",
            "base_url": format!("http://{upstream}/v1"), "api_key": "sk-upstream",
            "connect_timeout_ms": 1000, "first_byte_timeout_ms": 3000, "idle_timeout_ms": 3000
        }],
        "models": [
            {"name": "demo-chat", "kind": "chat", "provider_id": "prov_test", "upstream_model": "mock-gpt",
             "input_price": 500_000_000, "output_price": 1_500_000_000, "cached_input_price": 250_000_000, "max_output_tokens": 4096},
            {"name": "demo-embed", "kind": "embedding", "provider_id": "prov_test", "upstream_model": "mock-embed",
             "input_price": 20_000_000, "output_price": 0, "cached_input_price": 0, "max_output_tokens": 0}
        ]
    })
}

/// A started engine plus its upstream.
pub struct Harness {
    pub engine: Engine,
    pub addr: SocketAddr,
    pub upstream: Upstream,
    pub spool: tempdir::Dir,
    /// Where [`Harness::records`] has read the journal up to.
    pub journal: JournalTail,
}

pub mod tempdir {
    /// A unique directory under the system temp dir, removed on drop.
    pub struct Dir(pub std::path::PathBuf);
    impl Dir {
        pub fn new() -> Dir {
            let p =
                std::env::temp_dir().join(format!("onetoken-test-{:016x}", rand::random::<u64>()));
            std::fs::create_dir_all(&p).unwrap();
            Dir(p)
        }
        pub fn path(&self) -> &str {
            self.0.to_str().unwrap()
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl Harness {
    pub fn start() -> Harness {
        Self::with_balance(100_000_000_000)
    }

    /// A harness with the engine configuration and the snapshot patched.
    pub fn custom(config: impl FnOnce(&mut Value), snap: impl FnOnce(&mut Value)) -> Harness {
        let upstream = Upstream::start();
        let spool = tempdir::Dir::new();
        let mut cfg = engine_config_json(spool.path());
        config(&mut cfg);
        let engine =
            Engine::new(EngineConfig::from_json(cfg.to_string().as_bytes()).unwrap()).unwrap();
        let mut doc = snapshot(1, upstream.addr, 100_000_000_000);
        snap(&mut doc);
        engine.load_snapshot(doc.to_string().as_bytes()).unwrap();
        let addr = engine.start().unwrap();
        let journal = JournalTail::new(&spool.0, engine.instance_id());
        Harness {
            engine,
            addr,
            upstream,
            spool,
            journal,
        }
    }

    pub fn with_balance(balance: i64) -> Harness {
        let upstream = Upstream::start();
        let spool = tempdir::Dir::new();
        let engine = Engine::new(engine_config(spool.path())).unwrap();
        engine
            .load_snapshot(snapshot(1, upstream.addr, balance).to_string().as_bytes())
            .unwrap();
        let addr = engine.start().unwrap();
        let journal = JournalTail::new(&spool.0, engine.instance_id());
        Harness {
            engine,
            addr,
            upstream,
            spool,
            journal,
        }
    }

    /// The records journaled since the last call, in request order. A record is
    /// committed just after its response is sent and a request is in flight until then,
    /// so this first waits (bounded) for no request to be in flight.
    pub fn records(&self) -> Vec<onetoken_gateway::CallRecord> {
        for _ in 0..200 {
            if self.engine.stats().in_flight == 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut recs = self.journal.take();
        recs.sort_by_key(|r| r.ts);
        recs
    }

    /// Wait (bounded) until `n` records were emitted in total.
    pub async fn wait_records(&self, n: u64) {
        for _ in 0..500 {
            if self.engine.stats().records_total >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "expected {n} records, have {}",
            self.engine.stats().records_total
        );
    }
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

pub async fn open(addr: SocketAddr, req: Request<Full<Bytes>>) -> Response<Incoming> {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender.send_request(req).await.unwrap()
}

pub fn request(
    method: &str,
    path: &str,
    key: Option<&str>,
    body: impl Into<Bytes>,
) -> Request<Full<Bytes>> {
    let mut b = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "gw")
        .header("user-agent", "spec-test/1.0");
    if let Some(k) = key {
        b = b.header("authorization", format!("Bearer {k}"));
    }
    b.body(Full::new(body.into())).unwrap()
}

pub async fn call(addr: SocketAddr, req: Request<Full<Bytes>>) -> Reply {
    let resp = open(addr, req).await;
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Reply {
        status,
        headers,
        body,
    }
}

pub async fn post(addr: SocketAddr, path: &str, key: Option<&str>, body: Value) -> Reply {
    call(addr, request("POST", path, key, body.to_string())).await
}

pub fn chat(content: &str, extra: Value) -> Value {
    let mut v = json!({"model": "demo-chat", "messages": [{"role": "user", "content": content}]});
    if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
        for (k, val) in e {
            o.insert(k.clone(), val.clone());
        }
    }
    v
}

/// Assert the canary appears nowhere the gateway persists or reports.
pub fn assert_no_canary(h: &Harness, records: &[onetoken_gateway::CallRecord], bodies: &[&Reply]) {
    for r in records {
        let line = serde_json::to_string(r).unwrap();
        assert!(!line.contains(CANARY), "canary in record {line}");
    }
    for b in bodies {
        assert!(!b.text().contains(CANARY), "canary in response body");
        for v in b.headers.values() {
            assert!(
                !String::from_utf8_lossy(v.as_bytes()).contains(CANARY),
                "canary in header"
            );
        }
    }
    assert!(
        !h.engine.metrics_text().contains(CANARY),
        "canary in metrics"
    );
    if let Ok(entries) = std::fs::read_dir(&h.spool.0) {
        for e in entries.flatten() {
            let data = std::fs::read(e.path()).unwrap_or_default();
            assert!(
                !String::from_utf8_lossy(&data).contains(CANARY),
                "canary in spool file"
            );
        }
    }
}
