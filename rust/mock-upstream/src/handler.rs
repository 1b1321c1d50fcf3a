//! Routing and the replies of the fake provider (docs/mock-upstream.md is the spec).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{HeaderValue, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde::Deserialize;

use crate::body::{MockBody, Piece};
use crate::json::{self, Usage};
use crate::protocols;
use crate::units;
use crate::MockDefaults;

/// Request bodies above this are refused; the mock is not a place to test huge uploads.
const MAX_BODY_BYTES: usize = 32 * 1024 * 1024;
const EMBEDDING_DIMS: usize = 8;
/// Text of one content chunk, and of one token of a non-streamed reply.
pub(crate) const TOKEN: &str = "tok ";

static JSON: HeaderValue = HeaderValue::from_static("application/json");
static EVENT_STREAM: HeaderValue = HeaderValue::from_static("text/event-stream");
static NO_CACHE: HeaderValue = HeaderValue::from_static("no-cache");

const MODELS_BODY: &[u8] = b"{\"object\":\"list\",\"data\":[\
{\"id\":\"mock-gpt\",\"object\":\"model\",\"created\":1700000000,\"owned_by\":\"onetoken-mock\"},\
{\"id\":\"mock-embed\",\"object\":\"model\",\"created\":1700000000,\"owned_by\":\"onetoken-mock\"}]}";
const HEALTH_BODY: &[u8] = b"{\"status\":\"ok\"}";

/// State shared by every connection of one server.
pub(crate) struct Shared {
    pub(crate) defaults: MockDefaults,
    pub(crate) requests: AtomicU64,
    /// Upload bytes received (see [`crate::MockServer::upload_bytes`]).
    pub(crate) upload_bytes: AtomicU64,
    /// Whether to keep each API request's headers in `seen` (off unless a test asks:
    /// benchmarks pay nothing for it).
    pub(crate) recording: AtomicBool,
    pub(crate) seen: Mutex<Vec<SeenHeaders>>,
}

/// One request's headers as received: (lowercase name, value), in arrival order.
pub type SeenHeaders = Vec<(String, String)>;

/// Per-request controls, under `"mock"` in the JSON body. Unknown fields are rejected so a
/// misspelt control fails the test that used it instead of being silently ignored.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct Controls {
    chunks: Option<u32>,
    delay_ms: Option<u64>,
    latency_ms: Option<u64>,
    usage: Option<bool>,
    status: Option<u16>,
    cut_after: Option<u32>,
    echo: Option<bool>,
    prompt_tokens: Option<u64>,
    cached_tokens: Option<u64>,
    /// Answer with one tool call instead of text.
    tool_call: Option<bool>,
    /// Images to return, whatever `n` asked (an upstream that makes fewer).
    pub(crate) images: Option<u32>,
    /// Rerank search units to report (else one per started hundred documents).
    pub(crate) search_units: Option<u64>,
}

/// Message content: a string, or a list of parts of which only the text parts count.
#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
struct Part {
    #[serde(default)]
    text: Option<String>,
}

#[derive(Deserialize)]
struct Message {
    #[serde(default)]
    role: Option<String>,
    #[serde(default)]
    content: Option<Content>,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

#[derive(Deserialize)]
struct ChatRequest {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    messages: Vec<Message>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    /// Choices to generate, each `chunks` tokens (capped by the output limit).
    #[serde(default)]
    n: Option<u32>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    max_completion_tokens: Option<u64>,
    #[serde(default)]
    mock: Option<Controls>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum EmbeddingInput {
    One(String),
    Many(Vec<String>),
    Tokens(Vec<u64>),
    ManyTokens(Vec<Vec<u64>>),
}

#[derive(Deserialize)]
struct EmbeddingsRequest {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    input: Option<EmbeddingInput>,
    #[serde(default)]
    encoding_format: Option<String>,
    #[serde(default)]
    mock: Option<Controls>,
}

/// Controls resolved against the server-wide defaults.
pub(crate) struct Plan {
    pub(crate) chunks: u32,
    pub(crate) delay: Duration,
    pub(crate) latency: Duration,
    pub(crate) usage: bool,
    pub(crate) status: u16,
    pub(crate) cut_after: Option<u32>,
    pub(crate) echo: bool,
    pub(crate) prompt_tokens: Option<u64>,
    pub(crate) cached_tokens: u64,
    pub(crate) tool_call: bool,
}

impl Plan {
    /// The plan's latency: the time before the first byte.
    pub(crate) async fn wait_latency(&self) {
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
    }

    pub(crate) fn new(defaults: &MockDefaults, c: Option<Controls>) -> Plan {
        let c = c.unwrap_or_default();
        Plan {
            chunks: c.chunks.unwrap_or(defaults.chunks),
            delay: Duration::from_millis(c.delay_ms.unwrap_or(defaults.delay_ms)),
            latency: Duration::from_millis(c.latency_ms.unwrap_or(defaults.latency_ms)),
            usage: c.usage.unwrap_or(true),
            status: c.status.unwrap_or(200),
            cut_after: c.cut_after,
            echo: c.echo.unwrap_or(false),
            prompt_tokens: c.prompt_tokens,
            cached_tokens: c.cached_tokens.unwrap_or(0),
            tool_call: c.tool_call.unwrap_or(false),
        }
    }
}

/// The service function: never fails at the HTTP level, every problem is a response.
pub(crate) async fn handle(
    req: Request<Incoming>,
    shared: Arc<Shared>,
) -> Result<Response<MockBody>, Infallible> {
    let path = req.uri().path();
    // `/v1` (Gemini: `/v1beta`) is optional so a client configured with the bare origin as
    // base URL works too.
    let route = path
        .strip_prefix("/v1beta")
        .or_else(|| path.strip_prefix("/v1"))
        .unwrap_or(path);
    let method = req.method();
    if route == "/healthz" || path == "/healthz" {
        // Not counted: readiness probes must not disturb tests that assert call counts.
        return Ok(if method == Method::GET {
            json_response(StatusCode::OK, Bytes::from_static(HEALTH_BODY))
        } else {
            method_not_allowed()
        });
    }
    let id = shared.requests.fetch_add(1, Ordering::Relaxed) + 1;
    if shared.recording.load(Ordering::Relaxed) {
        let headers = req
            .headers()
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        shared
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(headers);
    }
    let response = match (route, method) {
        ("/chat/completions", &Method::POST) => match read_body(req).await {
            Ok(body) => chat(&shared.defaults, id, &body).await,
            Err(resp) => resp,
        },
        ("/embeddings", &Method::POST) => match read_body(req).await {
            Ok(body) => embeddings(&shared.defaults, &body).await,
            Err(resp) => resp,
        },
        ("/models", &Method::GET) => json_response(StatusCode::OK, Bytes::from_static(MODELS_BODY)),
        ("/chat/completions" | "/embeddings" | "/models", _) => method_not_allowed(),
        ("/images/generations", &Method::POST) => match read_body(req).await {
            Ok(body) => units::images(&shared.defaults, &body).await,
            Err(resp) => resp,
        },
        ("/moderations", &Method::POST) => match read_body(req).await {
            Ok(body) => units::moderations(&shared.defaults, &body).await,
            Err(resp) => resp,
        },
        ("/rerank", &Method::POST) => match read_body(req).await {
            Ok(body) => units::rerank(&shared.defaults, &body).await,
            Err(resp) => resp,
        },
        ("/audio/transcriptions", &Method::POST) => {
            crate::audio::transcribe(&shared, req, false).await
        }
        ("/audio/translations", &Method::POST) => {
            crate::audio::transcribe(&shared, req, true).await
        }
        ("/audio/speech", &Method::POST) => match read_body(req).await {
            Ok(body) => units::speech(&shared.defaults, &body).await,
            Err(resp) => resp,
        },
        ("/messages", &Method::POST) => {
            let headers = req.headers().clone();
            match read_body(req).await {
                Ok(body) => protocols::anthropic(&shared.defaults, id, &headers, &body).await,
                Err(resp) => resp,
            }
        }
        ("/responses" | "/openai/responses", &Method::POST) => match read_body(req).await {
            Ok(body) => protocols::responses(&shared.defaults, id, &body).await,
            Err(resp) => resp,
        },
        (r, &Method::POST) if r.starts_with("/models/") => {
            let target = r.trim_start_matches("/models/").to_owned();
            let alt_sse = req
                .uri()
                .query()
                .is_some_and(|q| q.split('&').any(|p| p == "alt=sse"));
            let (model, method) = target.split_once(':').unwrap_or((target.as_str(), ""));
            let stream = match method {
                "generateContent" => Some(false),
                // Only the SSE form (`alt=sse`) is implemented, which is what the gateway uses.
                "streamGenerateContent" if alt_sse => Some(true),
                _ => None,
            };
            match (stream, read_body(req).await) {
                (Some(stream), Ok(body)) => {
                    protocols::gemini(&shared.defaults, id, model, stream, &body).await
                }
                (None, _) => error_response(
                    StatusCode::NOT_FOUND,
                    "unknown Gemini method (generateContent or streamGenerateContent?alt=sse)",
                    "invalid_request_error",
                    Some("not_found"),
                ),
                (_, Err(resp)) => resp,
            }
        }
        (r, &Method::POST) if r.starts_with("/openai/deployments/") => {
            // Azure OpenAI: the deployment is in the path and `api-version` is required.
            let has_version = req
                .uri()
                .query()
                .is_some_and(|q| q.split('&').any(|p| p.starts_with("api-version=")));
            let tail = r
                .trim_start_matches("/openai/deployments/")
                .split_once('/')
                .map(|(_, t)| t.to_owned());
            match (has_version, tail.as_deref(), read_body(req).await) {
                (false, _, _) => error_response(
                    StatusCode::BAD_REQUEST,
                    "api-version query parameter is required",
                    "invalid_request_error",
                    Some("missing_api_version"),
                ),
                (true, Some("chat/completions"), Ok(body)) => {
                    chat(&shared.defaults, id, &body).await
                }
                (true, Some("embeddings"), Ok(body)) => embeddings(&shared.defaults, &body).await,
                (true, Some("images/generations"), Ok(body)) => {
                    units::images(&shared.defaults, &body).await
                }
                (true, Some("audio/speech"), Ok(body)) => {
                    units::speech(&shared.defaults, &body).await
                }
                (true, _, Err(resp)) => resp,
                (true, _, Ok(_)) => error_response(
                    StatusCode::NOT_FOUND,
                    "unknown path on the mock upstream",
                    "invalid_request_error",
                    Some("not_found"),
                ),
            }
        }
        _ => error_response(
            StatusCode::NOT_FOUND,
            "unknown path on the mock upstream",
            "invalid_request_error",
            Some("not_found"),
        ),
    };
    Ok(response)
}

pub(crate) async fn read_body(req: Request<Incoming>) -> Result<Bytes, Response<MockBody>> {
    match Limited::new(req.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
    {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(_) => Err(error_response(
            StatusCode::BAD_REQUEST,
            "request body could not be read or is too large",
            "invalid_request_error",
            Some("invalid_body"),
        )),
    }
}

/// Map a JSON parse failure to a fixed message: serde's own text may quote the input.
pub(crate) fn parse_error(err: &serde_json::Error) -> Response<MockBody> {
    let (message, code) = if err.is_syntax() || err.is_eof() {
        ("request body is not valid JSON", "invalid_json")
    } else {
        (
            "request body does not match the expected schema",
            "invalid_request",
        )
    };
    error_response(
        StatusCode::BAD_REQUEST,
        message,
        "invalid_request_error",
        Some(code),
    )
}

async fn chat(defaults: &MockDefaults, id: u64, body: &[u8]) -> Response<MockBody> {
    let req: ChatRequest = match serde_json::from_slice(body) {
        Ok(req) => req,
        Err(err) => return parse_error(&err),
    };
    let mut plan = Plan::new(defaults, req.mock);
    // As a real model: at most the output limit per choice, `n` choices.
    if let Some(cap) = req.max_completion_tokens.or(req.max_tokens) {
        plan.chunks = plan.chunks.min(u32::try_from(cap).unwrap_or(u32::MAX));
    }
    let choices = req.n.unwrap_or(1).max(1);
    plan.wait_latency().await;
    let echo_text = if plan.echo {
        last_user_text(&req.messages)
    } else {
        String::new()
    };
    if plan.status >= 400 {
        return status_error(plan.status, plan.echo.then_some(echo_text.as_str()));
    }
    let status = StatusCode::from_u16(plan.status).unwrap_or(StatusCode::OK);
    let model = req.model.as_deref().unwrap_or("mock-gpt");
    let usage = Usage {
        prompt: plan
            .prompt_tokens
            .unwrap_or_else(|| prompt_tokens(&req.messages)),
        completion: u64::from(plan.chunks) * u64::from(choices),
        cached: plan.cached_tokens,
    };
    let created = unix_now();
    if plan.tool_call {
        let include_usage = req
            .stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false);
        let stream = req.stream.unwrap_or(false);
        return protocols::openai_tool_call(id, body, &plan, usage, stream, include_usage);
    }
    if req.stream.unwrap_or(false) {
        let include_usage = req
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false);
        let texts = if plan.echo {
            split_words(&echo_text, plan.chunks)
        } else {
            vec![TOKEN; plan.chunks as usize]
        };
        let stream = SseStream {
            id,
            created,
            model,
            include_usage,
            usage: (include_usage && plan.usage).then_some(usage),
            choices,
        };
        let mut resp = Response::new(stream.body(&texts, plan.delay, plan.cut_after));
        *resp.status_mut() = status;
        let headers = resp.headers_mut();
        headers.insert(CONTENT_TYPE, EVENT_STREAM.clone());
        headers.insert(CACHE_CONTROL, NO_CACHE.clone());
        return resp;
    }
    let content = if plan.echo {
        echo_text
    } else {
        TOKEN.repeat(plan.chunks as usize)
    };
    let out = chat_completion(
        id,
        created,
        model,
        &content,
        choices,
        plan.usage.then_some(usage),
    );
    match plan.cut_after {
        // A JSON reply has no chunks: a cut sends the headers (with the full length) and the
        // first half of the body, then drops the connection.
        Some(_) => {
            let full_len = out.len();
            let half = Bytes::from(out).slice(..full_len / 2);
            let pieces = VecDeque::from([Piece {
                bytes: half,
                paced: false,
            }]);
            let mut resp = Response::new(MockBody::framed(pieces, Duration::ZERO, true));
            *resp.status_mut() = status;
            resp.headers_mut().insert(CONTENT_TYPE, JSON.clone());
            resp.headers_mut()
                .insert(CONTENT_LENGTH, HeaderValue::from(full_len));
            resp
        }
        None => json_response(status, Bytes::from(out)),
    }
}

fn chat_completion(
    id: u64,
    created: u64,
    model: &str,
    content: &str,
    choices: u32,
    usage: Option<Usage>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(512 + content.len() + model.len());
    out.extend_from_slice(b"{\"id\":\"chatcmpl-mock");
    json::push_u64(&mut out, id);
    out.extend_from_slice(b"\",\"object\":\"chat.completion\",\"created\":");
    json::push_u64(&mut out, created);
    out.extend_from_slice(b",\"model\":");
    json::push_str(&mut out, model);
    out.extend_from_slice(b",\"choices\":[");
    for index in 0..choices {
        if index > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"index\":");
        json::push_u64(&mut out, u64::from(index));
        out.extend_from_slice(b",\"message\":{\"role\":\"assistant\",\"content\":");
        json::push_str(&mut out, content);
        out.extend_from_slice(
            b",\"refusal\":null,\"annotations\":[]},\"logprobs\":null,\"finish_reason\":\"stop\"}",
        );
    }
    out.push(b']');
    if let Some(usage) = usage {
        out.extend_from_slice(b",\"usage\":");
        json::push_chat_usage(&mut out, usage);
    }
    out.extend_from_slice(b",\"service_tier\":\"default\",\"system_fingerprint\":\"fp_mock\"}");
    out
}

/// What every event of one chat stream shares.
struct SseStream<'a> {
    id: u64,
    created: u64,
    model: &'a str,
    include_usage: bool,
    /// Present when the usage-only final chunk is sent.
    usage: Option<Usage>,
    /// Choices (`n`); each content chunk is sent once per choice.
    choices: u32,
}

impl SseStream<'_> {
    fn head(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"data: {\"id\":\"chatcmpl-mock");
        json::push_u64(out, self.id);
        out.extend_from_slice(b"\",\"object\":\"chat.completion.chunk\",\"created\":");
        json::push_u64(out, self.created);
        out.extend_from_slice(b",\"model\":");
        json::push_str(out, self.model);
        out.extend_from_slice(
            b",\"service_tier\":\"default\",\"system_fingerprint\":\"fp_mock\",\"choices\":",
        );
    }

    /// One content chunk: role in the first delta, finish_reason on the last, and
    /// `"usage":null` on every chunk when usage was asked for, as OpenAI sends them.
    fn chunk(&self, index: u32, text: &str, first: bool, last: bool) -> Bytes {
        let mut out = Vec::with_capacity(320 + text.len());
        self.head(&mut out);
        out.extend_from_slice(b"[{\"index\":");
        json::push_u64(&mut out, u64::from(index));
        out.extend_from_slice(b",\"delta\":{");
        if first {
            out.extend_from_slice(b"\"role\":\"assistant\",");
        }
        out.extend_from_slice(b"\"content\":");
        json::push_str(&mut out, text);
        out.extend_from_slice(b"},\"logprobs\":null,\"finish_reason\":");
        out.extend_from_slice(if last { b"\"stop\"}]" } else { b"null}]" });
        if self.include_usage {
            out.extend_from_slice(b",\"usage\":null");
        }
        out.extend_from_slice(b"}\n\n");
        Bytes::from(out)
    }

    fn usage_chunk(&self, usage: Usage) -> Bytes {
        let mut out = Vec::with_capacity(512);
        self.head(&mut out);
        out.extend_from_slice(b"[],\"usage\":");
        json::push_chat_usage(&mut out, usage);
        out.extend_from_slice(b"}\n\n");
        Bytes::from(out)
    }

    fn body(&self, texts: &[&str], delay: Duration, cut_after: Option<u32>) -> MockBody {
        let mut pieces = VecDeque::with_capacity(texts.len() + 2);
        let sent = cut_after.map_or(texts.len(), |n| (n as usize).min(texts.len()));
        if texts.is_empty() {
            // No content at all still needs a role and a finish_reason.
            for index in 0..self.choices {
                pieces.push_back(Piece {
                    bytes: self.chunk(index, "", true, true),
                    paced: true,
                });
            }
        }
        for (i, text) in texts.iter().take(sent).enumerate() {
            for index in 0..self.choices {
                pieces.push_back(Piece {
                    bytes: self.chunk(index, text, i == 0, i + 1 == texts.len()),
                    paced: true,
                });
            }
        }
        let cut = cut_after.is_some();
        if !cut {
            if let Some(usage) = self.usage {
                pieces.push_back(Piece {
                    bytes: self.usage_chunk(usage),
                    paced: false,
                });
            }
            pieces.push_back(Piece {
                bytes: Bytes::from_static(b"data: [DONE]\n\n"),
                paced: false,
            });
        }
        MockBody::framed(pieces, delay, cut)
    }
}

async fn embeddings(defaults: &MockDefaults, body: &[u8]) -> Response<MockBody> {
    let req: EmbeddingsRequest = match serde_json::from_slice(body) {
        Ok(req) => req,
        Err(err) => return parse_error(&err),
    };
    let plan = Plan::new(defaults, req.mock);
    plan.wait_latency().await;
    let Some(input) = req.input else {
        return error_response(
            StatusCode::BAD_REQUEST,
            "'input' is required",
            "invalid_request_error",
            Some("invalid_request"),
        );
    };
    if plan.status >= 400 {
        let echo = match &input {
            EmbeddingInput::One(s) => Some(s.as_str()),
            EmbeddingInput::Many(v) => v.first().map(String::as_str),
            _ => None,
        };
        return status_error(plan.status, if plan.echo { echo } else { None });
    }
    let status = StatusCode::from_u16(plan.status).unwrap_or(StatusCode::OK);
    // Each input as bytes to hash, and its token count.
    let items: Vec<(Vec<u8>, u64)> = match &input {
        EmbeddingInput::One(s) => vec![(s.as_bytes().to_vec(), word_count(s))],
        EmbeddingInput::Many(v) => v
            .iter()
            .map(|s| (s.as_bytes().to_vec(), word_count(s)))
            .collect(),
        EmbeddingInput::Tokens(t) => vec![tokens_bytes(t)],
        EmbeddingInput::ManyTokens(v) => v.iter().map(|t| tokens_bytes(t)).collect(),
    };
    let base64 = req.encoding_format.as_deref() == Some("base64");
    let mut out = Vec::with_capacity(128 + items.len() * 160);
    out.extend_from_slice(b"{\"object\":\"list\",\"data\":[");
    for (i, (bytes, _)) in items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"object\":\"embedding\",\"index\":");
        json::push_u64(&mut out, i as u64);
        out.extend_from_slice(b",\"embedding\":");
        let vector = embed(bytes);
        if base64 {
            let mut raw = Vec::with_capacity(EMBEDDING_DIMS * 4);
            for x in vector {
                raw.extend_from_slice(&x.to_le_bytes());
            }
            out.push(b'"');
            json::push_base64(&mut out, &raw);
            out.push(b'"');
        } else {
            out.push(b'[');
            for (j, x) in vector.iter().enumerate() {
                if j > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(x.to_string().as_bytes());
            }
            out.push(b']');
        }
        out.push(b'}');
    }
    out.extend_from_slice(b"],\"model\":");
    json::push_str(&mut out, req.model.as_deref().unwrap_or("mock-embed"));
    if plan.usage {
        let prompt = plan
            .prompt_tokens
            .unwrap_or_else(|| items.iter().map(|(_, n)| n).sum());
        out.extend_from_slice(b",\"usage\":{\"prompt_tokens\":");
        json::push_u64(&mut out, prompt);
        out.extend_from_slice(b",\"total_tokens\":");
        json::push_u64(&mut out, prompt);
        out.push(b'}');
    }
    out.push(b'}');
    json_response(status, Bytes::from(out))
}

fn tokens_bytes(tokens: &[u64]) -> (Vec<u8>, u64) {
    let bytes = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
    (bytes, tokens.len() as u64)
}

/// A deterministic unit vector derived from the input (FNV-1a per dimension), so equal
/// inputs embed equally and tests can compare them.
fn embed(input: &[u8]) -> [f32; EMBEDDING_DIMS] {
    let mut v = [0f32; EMBEDDING_DIMS];
    for (dim, slot) in v.iter_mut().enumerate() {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ (dim as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        for &b in input {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        // Top 24 bits into [-1, 1): exact in an f32.
        *slot = ((h >> 40) as f32 / (1u64 << 23) as f32) - 1.0;
    }
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        for x in &mut v {
            *x /= norm;
        }
    }
    v
}

/// Words in every message content plus 4 per message (the documented estimate).
fn prompt_tokens(messages: &[Message]) -> u64 {
    messages
        .iter()
        .map(|m| {
            4 + match &m.content {
                Some(Content::Text(s)) => word_count(s),
                Some(Content::Parts(parts)) => parts
                    .iter()
                    .filter_map(|p| p.text.as_deref())
                    .map(word_count)
                    .sum(),
                None => 0,
            }
        })
        .sum()
}

pub(crate) fn word_count(s: &str) -> u64 {
    s.split_whitespace().count() as u64
}

fn last_user_text(messages: &[Message]) -> String {
    let Some(message) = messages
        .iter()
        .rev()
        .find(|m| m.role.as_deref() == Some("user"))
    else {
        return String::new();
    };
    match &message.content {
        Some(Content::Text(s)) => s.clone(),
        Some(Content::Parts(parts)) => parts.iter().filter_map(|p| p.text.as_deref()).collect(),
        None => String::new(),
    }
}

/// Split `text` into `n` pieces whose concatenation is `text`, cutting only where a word
/// starts, so a canary word always travels whole inside one chunk. Pieces may be empty.
pub(crate) fn split_words(text: &str, n: u32) -> Vec<&str> {
    let n = n as usize;
    if n == 0 {
        return Vec::new();
    }
    // Byte offsets where a word starts, after the first word.
    let mut starts = Vec::new();
    let mut prev_space = false;
    for (i, c) in text.char_indices() {
        let space = c.is_whitespace();
        if prev_space && !space {
            starts.push(i);
        }
        prev_space = space;
    }
    let words = starts.len() + 1;
    let mut bounds = Vec::with_capacity(n + 1);
    bounds.push(0);
    for k in 1..n {
        // Word index where piece k starts, spread evenly; beyond the last word: end of text.
        let w = k * words / n;
        let w = if n > words { k } else { w };
        bounds.push(if w == 0 {
            0
        } else {
            starts.get(w - 1).copied().unwrap_or(text.len())
        });
    }
    bounds.push(text.len());
    bounds.windows(2).map(|b| &text[b[0]..b[1]]).collect()
}

pub(crate) fn status_error(status: u16, echo: Option<&str>) -> Response<MockBody> {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let (kind, code) = match status.as_u16() {
        401 => ("authentication_error", Some("invalid_api_key")),
        403 => ("permission_error", None),
        404 => ("invalid_request_error", Some("model_not_found")),
        429 => ("rate_limit_error", Some("rate_limit_exceeded")),
        500..=599 => ("server_error", None),
        _ => ("invalid_request_error", None),
    };
    let message = match echo {
        Some(text) => format!("mock upstream error: {text}"),
        None => format!("mock upstream error (status {})", status.as_u16()),
    };
    error_response(status, &message, kind, code)
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub(crate) fn json_response(status: StatusCode, body: Bytes) -> Response<MockBody> {
    let mut resp = Response::new(MockBody::full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, JSON.clone());
    resp
}

pub(crate) fn error_response(
    status: StatusCode,
    message: &str,
    kind: &str,
    code: Option<&str>,
) -> Response<MockBody> {
    json_response(status, Bytes::from(json::error_body(message, kind, code)))
}

fn method_not_allowed() -> Response<MockBody> {
    error_response(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed on this path",
        "invalid_request_error",
        Some("method_not_allowed"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_keeps_words_whole_and_text_exact() {
        let text = "alpha beta  gamma\tdelta CANARY-123 epsilon";
        for n in 1..12 {
            let pieces = split_words(text, n);
            assert_eq!(pieces.len(), n as usize);
            assert_eq!(pieces.concat(), text);
            assert!(pieces.iter().any(|p| p.contains("CANARY-123")), "n={n}");
        }
        assert!(split_words(text, 0).is_empty());
        assert_eq!(split_words("", 3), vec!["", "", ""]);
    }

    #[test]
    fn embeddings_are_unit_and_deterministic() {
        let a = embed(b"hello");
        assert_eq!(a, embed(b"hello"));
        assert_ne!(a, embed(b"world"));
        let norm: f32 = a.iter().map(|x| x * x).sum();
        assert!((norm - 1.0).abs() < 1e-5);
    }
}
