//! Upstreams for the gateway under test: a tiny OpenAI-like one driven by the request's
//! `mock` field, a scripted one whose answer is switched at run time, and the bundled
//! mock speaking each protocol.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use onetoken_mock_upstream::{MockDefaults, MockServer};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::CANARY;

/// A mock upstream with default controls.
pub fn mock() -> MockServer {
    mock_with(MockDefaults::default())
}

pub fn mock_with(defaults: MockDefaults) -> MockServer {
    MockServer::start("127.0.0.1:0", defaults).unwrap()
}

/// An HTTP server on a port of its own runtime, answering every request with `answer`.
pub struct Server {
    pub addr: SocketAddr,
    rt: Option<tokio::runtime::Runtime>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl Server {
    pub fn start<B, F, Fut>(answer: F) -> Server
    where
        F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Result<Response<B>, Infallible>> + Send + 'static,
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        rt.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let answer = answer.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(answer);
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Server { addr, rt: Some(rt) }
    }
}

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
    _server: Server,
}

impl Upstream {
    pub fn start() -> Upstream {
        let state = Arc::new(UpstreamState::default());
        let st = state.clone();
        let server = Server::start(move |req| answer(st.clone(), req));
        Upstream {
            addr: server.addr,
            state,
            _server: server,
        }
    }

    /// Stream chunks sent so far, over every request.
    pub fn chunks_sent(&self) -> u64 {
        self.state.chunks_sent.load(Ordering::SeqCst)
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
        // The behaviour under test: an upstream slow to answer (timeouts, in-flight counts).
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
                // The behaviour under test: a stream that trickles (idle timeouts, client
                // disconnects mid-stream).
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
            // The behaviour under test: the body stays open for this long.
            tokio::time::sleep(Duration::from_millis(linger_ms)).await;
        }
    });
    let mut r = Response::new(UpBody::Chan(ChanBody(rx)));
    r.headers_mut()
        .insert("content-type", "text/event-stream".parse().unwrap());
    Ok(r)
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
    _server: Server,
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
        let status = Arc::new(AtomicU16::new(status));
        let hits = Arc::new(AtomicU64::new(0));
        let (s2, h2) = (status.clone(), hits.clone());
        let server = Server::start(move |req| scripted_answer(s2.clone(), h2.clone(), req));
        Scripted {
            addr: server.addr,
            status,
            hits,
            _server: server,
        }
    }

    pub fn set(&self, status: u16) {
        self.status.store(status, Ordering::SeqCst);
    }

    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::SeqCst)
    }
}
