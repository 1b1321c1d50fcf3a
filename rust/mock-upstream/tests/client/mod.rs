//! The client side of the mock's tests: a real HTTP connection per request, and what
//! came back, frame by frame.
#![allow(dead_code)]

use std::time::Instant;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use onetoken_mock_upstream::{MockDefaults, MockServer};
use serde_json::Value;
use tokio::net::TcpStream;

/// What a client saw: status, content type, each body frame with its arrival time, and
/// whether the body ended with an error (a cut connection).
pub struct Reply {
    pub status: StatusCode,
    pub content_type: String,
    pub frames: Vec<(Instant, Bytes)>,
    pub body_error: bool,
    pub started: Instant,
}

impl Reply {
    pub fn body(&self) -> Vec<u8> {
        self.frames
            .iter()
            .flat_map(|(_, b)| b.iter().copied())
            .collect()
    }

    pub fn text(&self) -> String {
        String::from_utf8(self.body()).unwrap()
    }

    /// (event name, data) of an SSE body; CRLF and LF framing both accepted.
    pub fn named_events(&self) -> Vec<(Option<String>, Value)> {
        self.text()
            .replace("\r\n", "\n")
            .split("\n\n")
            .filter(|e| !e.is_empty())
            .map(|e| {
                let name = e
                    .lines()
                    .find_map(|l| l.strip_prefix("event: "))
                    .map(str::to_owned);
                let data = e.lines().find_map(|l| l.strip_prefix("data: ")).unwrap();
                (name, serde_json::from_str(data).unwrap())
            })
            .collect()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body()).expect("JSON body")
    }

    /// The `data:` payloads of an SSE body, in order.
    pub fn events(&self) -> Vec<String> {
        String::from_utf8(self.body())
            .unwrap()
            .split("\n\n")
            .filter(|e| !e.is_empty())
            .map(|e| e.strip_prefix("data: ").expect("data: prefix").to_string())
            .collect()
    }

    pub fn chunk_events(&self) -> Vec<Value> {
        self.events()
            .iter()
            .filter(|e| e.as_str() != "[DONE]")
            .map(|e| serde_json::from_str(e).unwrap())
            .collect()
    }
}

pub async fn send(
    server: &MockServer,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<Vec<u8>>,
    h2: bool,
) -> Reply {
    let stream = TcpStream::connect(server.addr()).await.unwrap();
    let io = TokioIo::new(stream);
    let mut req = Request::builder()
        .method(method)
        .uri(format!("http://{}{path}", server.addr()))
        .header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .unwrap();
    let started = Instant::now();
    let resp = if h2 {
        let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .unwrap();
        tokio::spawn(conn);
        sender.send_request(req).await.unwrap()
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        sender.send_request(req).await.unwrap()
    };
    let status = resp.status();
    let content_type = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let mut body = resp.into_body();
    let mut frames = Vec::new();
    let mut body_error = false;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Ok(data) = frame.into_data() {
                    frames.push((Instant::now(), data));
                }
            }
            Err(_) => {
                body_error = true;
                break;
            }
        }
    }
    Reply {
        status,
        content_type,
        frames,
        body_error,
        started,
    }
}

pub async fn post(server: &MockServer, path: &str, body: Value) -> Reply {
    post_with(server, path, &[], body).await
}

/// POST `body` to `path` with `headers`, over HTTP/1.1.
pub async fn post_with(
    server: &MockServer,
    path: &str,
    headers: &[(&str, &str)],
    body: Value,
) -> Reply {
    let body = serde_json::to_vec(&body).unwrap();
    send(server, "POST", path, headers, Some(body), false).await
}

pub fn start() -> MockServer {
    MockServer::start("127.0.0.1:0", MockDefaults::default()).unwrap()
}
