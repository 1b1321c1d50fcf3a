//! The one test harness of the gateway: an engine started on port 0 from a configuration
//! and snapshot builder, upstreams to put behind it, an HTTP client, the journal read back,
//! and `wait_until` for anything observable.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, dead_code)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use onetoken_gateway::{hash_key, CallRecord, Engine, EngineConfig};
use serde_json::{json, Value};

pub mod journal_tail;
pub mod redis;
pub mod snapshots;
pub mod upstream;
#[allow(unused_imports)]
pub use journal_tail::{journal_records, JournalTail};
#[allow(unused_imports)]
pub use snapshots::*;
#[allow(unused_imports)]
pub use upstream::*;

pub const SECRET_HEX: &str = "0000000000000000000000000000000000000000000000000000000000000000";
pub const CHAT: &str = "/v1/chat/completions";
pub const CANARY: &str = "CANARY-e3b0c44298fc-do-not-store";

/// How long a `wait_until` of the harness waits before the test fails.
pub const WAIT: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(5);

/// One `()` per poll until `timeout` has passed.
fn polls(timeout: Duration) -> impl Iterator<Item = ()> {
    let deadline = Instant::now() + timeout;
    std::iter::from_fn(move || (Instant::now() < deadline).then_some(()))
}

/// Poll `condition` until it holds; false when `timeout` passed first.
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    for () in polls(timeout) {
        if condition() {
            return true;
        }
        std::thread::sleep(POLL);
    }
    condition()
}

/// [`wait_until`] for async tests: yields to the runtime between polls.
pub async fn wait_until_async(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    wait_for(timeout, || std::future::ready(condition())).await
}

/// [`wait_until_async`] with a condition that is itself async (a request, say).
pub async fn wait_for<F, Fut>(timeout: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for () in polls(timeout) {
        if condition().await {
            return true;
        }
        tokio::time::sleep(POLL).await;
    }
    condition().await
}

pub fn key_hash(key: &str) -> String {
    hash_key(&hex::decode(SECRET_HEX).unwrap(), key)
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
        // The mock upstream is on loopback, which only an allow-listed platform
        // provider may reach.
        "upstream_private_cidrs": ["127.0.0.0/8"],
    })
}

/// A file of `tests/contract` (the fixtures Rust and Python both read).
pub fn fixture(name: &str) -> Vec<u8> {
    let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/contract")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The fixture snapshot `name` as `version`, with a field nobody knows added to the
/// object at each of `pointers` in turn, is refused with an error naming the field.
pub fn assert_unknown_fields_refused(engine: &Engine, name: &str, version: u64, pointers: &[&str]) {
    for pointer in pointers {
        let mut v: Value = serde_json::from_slice(&fixture(name)).unwrap();
        v["version"] = Value::from(version);
        v.pointer_mut(pointer).unwrap()["surprise_field"] = Value::from(1);
        let err = engine.load_snapshot(v.to_string().as_bytes()).unwrap_err();
        assert!(
            matches!(&err, onetoken_gateway::Error::Config(m) if m.contains("surprise_field")),
            "{pointer}: {err}"
        );
    }
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

/// A change to a JSON document (the engine config or the snapshot).
type Patch<'a> = Box<dyn FnOnce(&mut Value) + 'a>;

/// How to start a [`Gateway`]: the spec configuration and the spec snapshot (in front of
/// its own [`Upstream`]) unless told otherwise.
pub struct GatewayBuilder<'a> {
    config: Vec<Patch<'a>>,
    snapshot: Option<Value>,
    patches: Vec<Patch<'a>>,
    balance: i64,
}

impl<'a> GatewayBuilder<'a> {
    /// Patch the engine configuration JSON.
    pub fn config(mut self, patch: impl FnOnce(&mut Value) + 'a) -> Self {
        self.config.push(Box::new(patch));
        self
    }

    /// Serve this snapshot instead of the spec one (no spec upstream is started).
    pub fn snapshot(mut self, doc: Value) -> Self {
        self.snapshot = Some(doc);
        self
    }

    /// Patch the snapshot before it is loaded.
    pub fn patch_snapshot(mut self, patch: impl FnOnce(&mut Value) + 'a) -> Self {
        self.patches.push(Box::new(patch));
        self
    }

    /// The balance of the spec snapshot's `org_rich`.
    pub fn balance(mut self, balance: i64) -> Self {
        self.balance = balance;
        self
    }

    pub fn start(self) -> Gateway {
        let spool = tempdir::Dir::new();
        let mut cfg = engine_config_json(spool.path());
        for patch in self.config {
            patch(&mut cfg);
        }
        let engine =
            Engine::new(EngineConfig::from_json(cfg.to_string().as_bytes()).unwrap()).unwrap();
        let (upstream, mut doc) = match self.snapshot {
            Some(doc) => (None, doc),
            None => {
                let up = Upstream::start();
                let doc = spec_snapshot(1, up.addr, self.balance);
                (Some(up), doc)
            }
        };
        for patch in self.patches {
            patch(&mut doc);
        }
        engine.load_snapshot(doc.to_string().as_bytes()).unwrap();
        let addr = engine.start().unwrap();
        let journal = JournalTail::new(&spool.0, engine.instance_id());
        Gateway {
            engine,
            addr,
            upstream,
            spool,
            journal,
        }
    }
}

/// A started engine, and the spec upstream when it serves the spec snapshot.
pub struct Gateway {
    pub engine: Engine,
    pub addr: SocketAddr,
    upstream: Option<Upstream>,
    pub spool: tempdir::Dir,
    /// Where [`Gateway::records`] has read the journal up to.
    pub journal: JournalTail,
}

impl Gateway {
    pub fn builder<'a>() -> GatewayBuilder<'a> {
        GatewayBuilder {
            config: Vec::new(),
            snapshot: None,
            patches: Vec::new(),
            balance: 100_000_000_000,
        }
    }

    /// The spec configuration and snapshot.
    pub fn start() -> Gateway {
        Self::builder().start()
    }

    /// The spec gateway with the engine configuration and the snapshot patched.
    pub fn custom(config: impl FnOnce(&mut Value), snap: impl FnOnce(&mut Value)) -> Gateway {
        Self::builder().config(config).patch_snapshot(snap).start()
    }

    pub fn with_balance(balance: i64) -> Gateway {
        Self::builder().balance(balance).start()
    }

    /// The spec configuration serving `doc`.
    pub fn serving(doc: Value) -> Gateway {
        Self::builder().snapshot(doc).start()
    }

    /// The upstream of the spec snapshot.
    pub fn upstream(&self) -> &Upstream {
        self.upstream
            .as_ref()
            .expect("the spec upstream (this gateway serves a snapshot of its own)")
    }

    /// The records journaled since the last call, in request order. A record is
    /// committed just after its response is sent and a request is in flight until then,
    /// so this first waits for no request to be in flight.
    pub fn records(&self) -> Vec<CallRecord> {
        assert!(
            wait_until(WAIT, || self.engine.stats().in_flight == 0),
            "requests still in flight"
        );
        // Request order: commit order may differ by a few microseconds.
        let mut recs = self.journal.take();
        recs.sort_by_key(|r| r.ts);
        recs
    }

    /// Wait until `n` records were emitted in total.
    pub async fn wait_records(&self, n: u64) {
        let emitted = || self.engine.stats().records_total >= n;
        assert!(
            wait_until_async(WAIT, emitted).await,
            "expected {n} records, have {}",
            self.engine.stats().records_total
        );
    }

    /// Wait for `n` records in total, then take those not taken before.
    pub async fn take_records(&self, n: u64) -> Vec<CallRecord> {
        self.wait_records(n).await;
        self.records()
    }

    /// A chat completion of the spec model saying `content`, with `key`.
    pub async fn ask(&self, key: &str, content: &str) -> Reply {
        self.chat_as(key, chat(content, json!({}))).await
    }

    /// Embeddings of `input` by the spec model, with `key`.
    pub async fn embed(&self, key: &str, input: &str) -> Reply {
        let body = json!({"model": "demo-embed", "input": input});
        post(self.addr, "/v1/embeddings", Some(key), body).await
    }

    /// "hi" to `model` with key `ot-a` (of the routing snapshots).
    pub async fn ask_model(&self, model: &str) -> Reply {
        post_chat(self.addr, chat_body(model, "hi", json!({}))).await
    }

    /// A chat completion of the spec model saying `content`, with `extra` fields, from the
    /// spec's valid key `ot-good`.
    pub async fn chat(&self, content: &str, extra: Value) -> Reply {
        self.chat_as("ot-good", chat(content, extra)).await
    }

    /// POST `body` to the chat path with `key`.
    pub async fn chat_as(&self, key: &str, body: Value) -> Reply {
        post(self.addr, CHAT, Some(key), body).await
    }

    /// POST `body` to the chat path with `key`; the response as it starts (read the body
    /// yourself, or drop it).
    pub async fn open_chat(&self, key: Option<&str>, body: Value) -> Response<Incoming> {
        let req = request("POST", CHAT, key, body.to_string());
        open(self.addr, req).await
    }

    /// Open a stream of the spec model with key `ot-good`, the upstream driven by `mock`
    /// (chunks, delay_ms, ...).
    pub async fn open_stream(&self, mock: Value) -> Response<Incoming> {
        let body = chat("hi", json!({"stream": true, "mock": mock}));
        self.open_chat(Some("ot-good"), body).await
    }

    /// No org has money reserved (every request settled or released its hold).
    pub fn assert_nothing_reserved(&self) {
        let spend = self.engine.org_spend();
        assert!(
            spend.iter().all(|(_, _, reserved)| *reserved == 0),
            "{spend:?}"
        );
    }

    pub fn org_spent(&self, org: &str) -> i64 {
        self.engine
            .org_spend()
            .into_iter()
            .find(|o| o.0 == org)
            .map_or(0, |o| o.1)
    }

    /// The canary appears nowhere the gateway persists or reports: records, replies
    /// (bodies and headers), metrics, spool files.
    pub fn assert_no_canary(&self, records: &[CallRecord], replies: &[&Reply]) {
        for r in records {
            let line = serde_json::to_string(r).unwrap();
            assert!(!line.contains(CANARY), "canary in record {line}");
        }
        for r in replies {
            assert!(!r.text().contains(CANARY), "canary in a response body");
            for v in r.headers.values() {
                assert!(
                    !String::from_utf8_lossy(v.as_bytes()).contains(CANARY),
                    "canary in header"
                );
            }
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
                    "canary in spool file"
                );
            }
        }
    }
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.text()))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The `id`s of a `/v1/models` answer, in order.
    pub fn model_ids(&self) -> Vec<String> {
        self.json()["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_owned())
            .collect()
    }

    /// `data:` payloads of an SSE body (JSON ones parsed; `[DONE]` as a string).
    pub fn events(&self) -> Vec<(Option<String>, Value)> {
        self.text()
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

/// An HTTP/1.1 client connection over `io` (TCP or TLS), its driver spawned.
pub async fn http1<I>(io: I) -> Sender
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

/// An HTTP/1.1 connection to `addr`, for several requests in turn.
pub async fn connect(addr: SocketAddr) -> Sender {
    http1(tokio::net::TcpStream::connect(addr).await.unwrap()).await
}

/// The client side of an HTTP/1.1 connection.
pub type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

pub async fn open(addr: SocketAddr, req: Request<Full<Bytes>>) -> Response<Incoming> {
    connect(addr).await.send_request(req).await.unwrap()
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

/// A chat request with `key`.
pub fn chat_request(key: &str, body: Value) -> Request<Full<Bytes>> {
    request("POST", CHAT, Some(key), body.to_string())
}

/// The whole response; a body the gateway cuts short is what arrived before the cut.
pub async fn call(addr: SocketAddr, req: Request<Full<Bytes>>) -> Reply {
    let resp = open(addr, req).await;
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    Reply {
        status,
        headers,
        body,
    }
}

pub async fn post(addr: SocketAddr, path: &str, key: Option<&str>, body: Value) -> Reply {
    call(addr, request("POST", path, key, body.to_string())).await
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
    let mut req = with_headers(request("POST", path, None, body), headers);
    req.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    call(addr, req).await
}

pub async fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Reply {
    call(
        addr,
        with_headers(request("GET", path, None, Bytes::new()), headers),
    )
    .await
}

fn with_headers(mut req: Request<Full<Bytes>>, headers: &[(&str, &str)]) -> Request<Full<Bytes>> {
    for (k, v) in headers {
        req.headers_mut().append(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    req
}

/// POST `body` to `path` with `key`.
pub async fn send_as(addr: SocketAddr, key: &str, path: &str, body: Value) -> Reply {
    let auth = format!("Bearer {key}");
    send(addr, path, &[("authorization", auth.as_str())], body).await
}

/// POST `body` to `path` with key `ot-a` (of the routing snapshots).
pub async fn send_a(addr: SocketAddr, path: &str, body: Value) -> Reply {
    send_as(addr, "ot-a", path, body).await
}

/// A chat request with key `ot-a` (of the routing snapshots).
pub async fn post_chat(addr: SocketAddr, body: Value) -> Reply {
    send_a(addr, CHAT, body).await
}

/// A stream of `model` with key `ot-a` whose upstream cuts the connection after two
/// chunks.
pub async fn cut_stream(addr: SocketAddr, model: &str) -> Reply {
    let mock = json!({"stream": true, "mock": {"cut_after": 2}});
    post_chat(addr, chat_body(model, "hi there", mock)).await
}

pub fn merge(target: &mut Value, extra: Value) {
    if let (Some(t), Value::Object(e)) = (target.as_object_mut(), extra) {
        for (k, v) in e {
            t.insert(k, v);
        }
    }
}

pub fn chat_body(model: &str, content: &str, extra: Value) -> Value {
    let mut v = json!({"model": model, "messages": [{"role": "user", "content": content}]});
    merge(&mut v, extra);
    v
}

/// A request for the spec snapshot's chat model.
pub fn chat(content: &str, extra: Value) -> Value {
    chat_body("demo-chat", content, extra)
}
