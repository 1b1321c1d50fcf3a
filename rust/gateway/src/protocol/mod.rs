//! Wire protocols: which upstream a client API can use, how a request is written for a
//! deployment, and how the answer travels back, passed through or translated.
//!
//! Pass-through (client and upstream speak the same protocol) only rewrites the model and
//! meters. Translation goes through a small neutral model: upstream replies and stream
//! events are decoded into [`Reply`] / [`Event`], then encoded in the client's protocol.
//! Stream converters are stateful and fed one upstream SSE event at a time; they never
//! hold more than the event in hand. Requests translate through the OpenAI chat shape.

pub(crate) mod anthropic;
pub(crate) mod gemini;
pub(crate) mod openai;
pub(crate) mod responses;
pub(crate) mod units;
pub(crate) mod upload;
pub(crate) mod validate;

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue};
use http::{header, Method, Request, Uri};
use http_body_util::Full;
use serde_json::{json, Map, Value};

use crate::billing::Usage;
use crate::error::{error_event, ApiError};
use crate::snapshot::Deployment;
use crate::sse::{SseFramer, SseRelay, StreamMeter};
use crate::tokens;
use crate::upstream::UpBody;

/// Set on every upstream request and refused on arrival (508 `loop_detected`): a provider
/// whose base URL leads back to a gateway cannot make a request go round.
pub(crate) const HOP_HEADER: &str = "x-onetoken-hop";

/// What an upstream provider speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Protocol {
    OpenAi,
    Azure,
    Anthropic,
    Gemini,
}

impl Protocol {
    pub(crate) fn parse(s: &str) -> Option<Protocol> {
        match s {
            "openai" => Some(Protocol::OpenAi),
            "azure" => Some(Protocol::Azure),
            "anthropic" => Some(Protocol::Anthropic),
            "gemini" => Some(Protocol::Gemini),
            _ => None,
        }
    }

    /// OpenAI's chat, embeddings and Responses shapes (Azure differs only in URL and auth).
    fn openai_like(self) -> bool {
        matches!(self, Protocol::OpenAi | Protocol::Azure)
    }

    /// Whether audio inside chat messages can reach this protocol (passed through, or as
    /// Gemini's `inlineData`). Anthropic Messages has no audio block.
    pub(crate) fn takes_audio(self) -> bool {
        self != Protocol::Anthropic
    }
}

/// The API a client called.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClientApi {
    Chat,
    Embeddings,
    /// Anthropic Messages (`POST /v1/messages`).
    Messages,
    /// OpenAI Responses (`POST /v1/responses`).
    Responses,
    /// OpenAI image generation (`POST /v1/images/generations`), priced per image.
    Images,
    /// OpenAI moderations (`POST /v1/moderations`), priced per request (or free).
    Moderations,
    /// Cohere/Jina rerank (`POST /v1/rerank`), priced per search unit.
    Rerank,
    /// OpenAI text to speech (`POST /v1/audio/speech`): audio bytes streamed back, priced
    /// per input character.
    Speech,
    /// OpenAI speech to text (`POST /v1/audio/transcriptions`): a multipart upload streamed
    /// through (see [`upload`]), priced per second of audio in.
    Transcription,
    /// OpenAI speech to English text (`POST /v1/audio/translations`), as transcriptions.
    Translation,
}

impl ClientApi {
    /// Priced by units (images, search units) or per request rather than by tokens.
    pub(crate) fn unit_priced(self) -> bool {
        matches!(
            self,
            ClientApi::Images
                | ClientApi::Moderations
                | ClientApi::Rerank
                | ClientApi::Speech
                | ClientApi::Transcription
                | ClientApi::Translation
        )
    }

    /// Sent as a multipart upload streamed through, not as a JSON body.
    pub(crate) fn upload(self) -> bool {
        matches!(self, ClientApi::Transcription | ClientApi::Translation)
    }

    /// Whether a deployment speaking `p` can serve this API (translated or not).
    pub(crate) fn served_by(self, p: Protocol) -> bool {
        match self {
            ClientApi::Chat | ClientApi::Messages => true,
            ClientApi::Embeddings
            | ClientApi::Responses
            | ClientApi::Images
            | ClientApi::Moderations
            | ClientApi::Speech
            | ClientApi::Transcription
            | ClientApi::Translation => p.openai_like(),
            // LiteLLM, Cohere and Jina serve it at `<base>/rerank`; Azure has no rerank.
            ClientApi::Rerank => p == Protocol::OpenAi,
        }
    }
}

/// Upstream URIs of one deployment (the model is part of the path for Azure and Gemini).
#[derive(Debug, Clone, Default)]
pub(crate) struct Endpoints {
    chat: Option<Uri>,
    /// Gemini streams from another method; elsewhere the same as `chat`.
    chat_stream: Option<Uri>,
    embeddings: Option<Uri>,
    responses: Option<Uri>,
    images: Option<Uri>,
    moderations: Option<Uri>,
    rerank: Option<Uri>,
    speech: Option<Uri>,
    transcriptions: Option<Uri>,
    translations: Option<Uri>,
}

/// Azure's `api-version` when the provider names none (the current GA version).
const AZURE_DEFAULT_API_VERSION: &str = "2024-10-21";
/// Anthropic's `anthropic-version` when the provider names none.
const ANTHROPIC_DEFAULT_VERSION: &str = "2023-06-01";

fn uri(s: String) -> Result<Uri, String> {
    let u: Uri = s.parse().map_err(|_| "invalid base_url".to_owned())?;
    match u.scheme_str() {
        Some("http") | Some("https") if u.authority().is_some() => Ok(u),
        _ => Err("base_url must be an http or https URL".to_owned()),
    }
}

/// Percent-encode a path segment or query value (model and deployment names are usually
/// plain, but the URL must stay valid whatever the control plane sends).
fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Endpoints {
    pub(crate) fn build(
        protocol: Protocol,
        base_url: &str,
        api_version: Option<&str>,
        upstream_model: &str,
    ) -> Result<Endpoints, String> {
        let base = base_url.trim_end_matches('/');
        // Validate the base itself so a bad URL fails at compile time for every protocol.
        uri(base.to_owned())?;
        // The unit-priced APIs: (images, moderations, rerank, speech) URLs, and the
        // audio uploads (transcriptions, translations).
        let ((images, moderations, rerank, speech), (transcriptions, translations)) = match protocol
        {
            Protocol::OpenAi => (
                (
                    Some(format!("{base}/images/generations")),
                    Some(format!("{base}/moderations")),
                    Some(format!("{base}/rerank")),
                    Some(format!("{base}/audio/speech")),
                ),
                (
                    Some(format!("{base}/audio/transcriptions")),
                    Some(format!("{base}/audio/translations")),
                ),
            ),
            Protocol::Azure => {
                let v = enc(api_version.unwrap_or(AZURE_DEFAULT_API_VERSION));
                let dep = format!("{base}/openai/deployments/{}", enc(upstream_model));
                (
                    (
                        Some(format!("{dep}/images/generations?api-version={v}")),
                        None,
                        None,
                        Some(format!("{dep}/audio/speech?api-version={v}")),
                    ),
                    (
                        Some(format!("{dep}/audio/transcriptions?api-version={v}")),
                        Some(format!("{dep}/audio/translations?api-version={v}")),
                    ),
                )
            }
            Protocol::Anthropic | Protocol::Gemini => ((None, None, None, None), (None, None)),
        };
        // (chat, streamed chat, embeddings, responses) URLs.
        let (chat, chat_stream, embeddings, responses) = match protocol {
            Protocol::OpenAi => {
                let chat = format!("{base}/chat/completions");
                let embeddings = format!("{base}/embeddings");
                (
                    chat.clone(),
                    chat,
                    Some(embeddings),
                    Some(format!("{base}/responses")),
                )
            }
            Protocol::Azure => {
                let v = enc(api_version.unwrap_or(AZURE_DEFAULT_API_VERSION));
                let dep = format!("{base}/openai/deployments/{}", enc(upstream_model));
                let chat = format!("{dep}/chat/completions?api-version={v}");
                let embeddings = format!("{dep}/embeddings?api-version={v}");
                let responses = format!("{base}/openai/responses?api-version={v}");
                (chat.clone(), chat, Some(embeddings), Some(responses))
            }
            Protocol::Anthropic => {
                let messages = format!("{base}/messages");
                (messages.clone(), messages, None, None)
            }
            Protocol::Gemini => {
                let m = format!("{base}/models/{}", enc(upstream_model));
                let stream = format!("{m}:streamGenerateContent?alt=sse");
                (format!("{m}:generateContent"), stream, None, None)
            }
        };
        Ok(Endpoints {
            chat: Some(uri(chat)?),
            chat_stream: Some(uri(chat_stream)?),
            embeddings: embeddings.map(uri).transpose()?,
            responses: responses.map(uri).transpose()?,
            images: images.map(uri).transpose()?,
            moderations: moderations.map(uri).transpose()?,
            rerank: rerank.map(uri).transpose()?,
            speech: speech.map(uri).transpose()?,
            transcriptions: transcriptions.map(uri).transpose()?,
            translations: translations.map(uri).transpose()?,
        })
    }
}

/// Credential header of a provider, plus the version header Anthropic requires.
/// A chat request's `stop` (a string or a list of them) as a list; `None` without one.
pub(crate) fn stop_sequences(doc: &Map<String, Value>) -> Option<Value> {
    match doc.get("stop") {
        Some(Value::String(s)) => Some(json!([s])),
        Some(Value::Array(a)) => Some(Value::Array(a.clone())),
        _ => None,
    }
}

/// The elements of a field that should be an array (none when it is missing or not one).
#[inline]
pub(crate) fn array_items(field: Option<&Value>) -> impl Iterator<Item = &Value> {
    field.and_then(Value::as_array).into_iter().flatten()
}

/// A chat tool call's `function.arguments` decoded: the object the string encodes, or
/// `{}` when it encodes anything else.
pub(crate) fn tool_call_args(tc: &Value) -> Value {
    tc.pointer("/function/arguments")
        .and_then(Value::as_str)
        .and_then(|a| serde_json::from_str::<Value>(a).ok())
        .filter(Value::is_object)
        .unwrap_or_else(|| Value::Object(Map::new()))
}

/// Text of a string or of the text parts of a list (joined by newlines).
pub(crate) fn joined_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

/// The string at `key` of an object, or "" when it is missing or not a string.
#[inline]
pub(crate) fn string_at(v: &Value, key: &str) -> String {
    v.get(key).and_then(Value::as_str).unwrap_or("").to_owned()
}

pub(crate) fn auth_headers(
    protocol: Protocol,
    api_key: Option<&str>,
    api_version: Option<&str>,
) -> Result<Vec<(HeaderName, HeaderValue)>, String> {
    let mut out = Vec::with_capacity(2);
    let value = |s: String| {
        HeaderValue::from_str(&s).map_err(|_| "api_key is not a valid header value".to_owned())
    };
    if let Some(k) = api_key {
        let (name, v) = match protocol {
            Protocol::OpenAi => (header::AUTHORIZATION, value(format!("Bearer {k}"))?),
            Protocol::Azure => (HeaderName::from_static("api-key"), value(k.to_owned())?),
            Protocol::Anthropic => (HeaderName::from_static("x-api-key"), value(k.to_owned())?),
            Protocol::Gemini => (
                HeaderName::from_static("x-goog-api-key"),
                value(k.to_owned())?,
            ),
        };
        let mut v = v;
        v.set_sensitive(true);
        out.push((name, v));
    }
    if protocol == Protocol::Anthropic {
        let v = api_version.unwrap_or(ANTHROPIC_DEFAULT_VERSION);
        out.push((
            HeaderName::from_static("anthropic-version"),
            HeaderValue::from_str(v).map_err(|_| "api_version is not a valid header value")?,
        ));
    }
    Ok(out)
}

/// Why the stream or reply stopped, in neutral terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stop {
    End,
    Length,
    ToolUse,
    Sequence,
    ContentFilter,
}

/// One tool call of a reply.
#[derive(Debug, Clone, Default)]
pub(crate) struct ToolCall {
    pub(crate) id: String,
    pub(crate) name: String,
    /// JSON text of the arguments.
    pub(crate) arguments: String,
}

/// A whole (non-streamed) answer in neutral form.
#[derive(Debug, Clone, Default)]
pub(crate) struct Reply {
    pub(crate) model: String,
    pub(crate) text: String,
    pub(crate) tool_calls: Vec<ToolCall>,
    pub(crate) stop: Option<Stop>,
    pub(crate) usage: Option<Usage>,
}

impl Reply {
    /// Output tokens counted from what the reply carries (for estimated usage).
    pub(crate) fn output_tokens(&self) -> u64 {
        let mut n = tokens::count(&self.text);
        for t in &self.tool_calls {
            n += tokens::count(&t.arguments);
        }
        n as u64
    }
}

/// One step of a stream in neutral form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Event {
    Text(String),
    /// A tool call begins; `index` counts tool calls from 0.
    ToolStart {
        index: usize,
        id: String,
        name: String,
    },
    ToolArgs {
        index: usize,
        args: String,
    },
    Finish(Stop),
    /// Final usage reported by the upstream.
    Usage(Usage),
    /// The upstream finished cleanly.
    Done,
}

/// An upstream body, written into a buffer that fits a small chat request rather than
/// grown from empty through a reallocation per doubling. Kept under glibc's large-chunk
/// size (1 KiB), whose first use per burst consolidates the allocator's fast bins.
fn json_body(v: &impl serde::Serialize) -> serde_json::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(512);
    serde_json::to_writer(&mut out, v)?;
    Ok(out)
}

/// The upstream request for one deployment. `doc` is the client's parsed body; pass-
/// through rewrites it in place (only `model`, and the usage option of chat streams), so
/// a retry on another deployment rewrites it again.
pub(crate) fn upstream_request(
    api: ClientApi,
    doc: &mut Map<String, Value>,
    d: &Deployment,
    stream: bool,
    max_out: u64,
) -> Result<Request<Full<Bytes>>, ApiError> {
    let p = d.provider.protocol;
    let e = &d.endpoints;
    let (uri, body) = match (api, p) {
        (ClientApi::Chat, Protocol::OpenAi | Protocol::Azure) => {
            openai::prepare_chat(doc, &d.upstream_model, stream, max_out);
            (e.chat.as_ref(), json_body(doc))
        }
        (ClientApi::Embeddings, Protocol::OpenAi | Protocol::Azure) => {
            doc.insert("model".into(), Value::String(d.upstream_model.clone()));
            (e.embeddings.as_ref(), json_body(doc))
        }
        (ClientApi::Images | ClientApi::Moderations | ClientApi::Rerank | ClientApi::Speech, _) => {
            doc.insert("model".into(), Value::String(d.upstream_model.clone()));
            let uri = match api {
                ClientApi::Images => e.images.as_ref(),
                ClientApi::Moderations => e.moderations.as_ref(),
                ClientApi::Speech => e.speech.as_ref(),
                _ => e.rerank.as_ref(),
            };
            (uri, json_body(doc))
        }
        (ClientApi::Responses, Protocol::OpenAi | Protocol::Azure) => {
            doc.insert("model".into(), Value::String(d.upstream_model.clone()));
            // The output the reservation covers, whatever the client asked.
            doc.insert("max_output_tokens".into(), Value::from(max_out.max(1)));
            (e.responses.as_ref(), json_body(doc))
        }
        (ClientApi::Messages, Protocol::Anthropic) => {
            doc.insert("model".into(), Value::String(d.upstream_model.clone()));
            doc.insert("max_tokens".into(), Value::from(max_out.max(1)));
            (e.chat.as_ref(), json_body(doc))
        }
        (ClientApi::Chat, Protocol::Anthropic) => {
            let out = anthropic::from_chat_request(doc, &d.upstream_model, stream, max_out);
            (e.chat.as_ref(), json_body(&out))
        }
        (ClientApi::Chat, Protocol::Gemini) => {
            let out = gemini::from_chat_request(doc, max_out);
            let uri = if stream { &e.chat_stream } else { &e.chat };
            (uri.as_ref(), json_body(&out))
        }
        (ClientApi::Messages, Protocol::OpenAi | Protocol::Azure) => {
            let mut out = anthropic::to_chat_request(doc, &d.upstream_model, stream);
            if let Value::Object(m) = &mut out {
                m.insert("max_tokens".into(), Value::from(max_out.max(1)));
            }
            (e.chat.as_ref(), json_body(&out))
        }
        (ClientApi::Messages, Protocol::Gemini) => {
            let chat = anthropic::to_chat_request(doc, &d.upstream_model, stream);
            let out = match &chat {
                Value::Object(m) => gemini::from_chat_request(m, max_out),
                _ => Value::Null,
            };
            let uri = if stream { &e.chat_stream } else { &e.chat };
            (uri.as_ref(), json_body(&out))
        }
        // Uploads are built by `upload_request`.
        (
            ClientApi::Embeddings
            | ClientApi::Responses
            | ClientApi::Transcription
            | ClientApi::Translation,
            _,
        ) => (None, Ok(Vec::new())),
    };
    let uri = uri.ok_or(ApiError::ModelNotFound)?;
    let body = body.map_err(|_| ApiError::Internal)?;
    let mut req = Request::new(Full::new(Bytes::from(body)));
    *req.method_mut() = Method::POST;
    *req.uri_mut() = uri.clone();
    let h = req.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if stream {
        h.insert(
            header::ACCEPT,
            HeaderValue::from_static("text/event-stream"),
        );
    }
    h.insert(HOP_HEADER, HeaderValue::from_static("1"));
    for (name, value) in &d.provider.auth_headers {
        h.insert(name.clone(), value.clone());
    }
    Ok(req)
}

/// The upstream request of an audio upload on `d`: the multipart body as the client sent
/// it (its model rewritten), under the client's content type, which holds the boundary.
pub(crate) fn upload_request(
    api: ClientApi,
    d: &Deployment,
    body: UpBody,
    content_type: HeaderValue,
) -> Result<Request<UpBody>, ApiError> {
    let e = &d.endpoints;
    let uri = match api {
        ClientApi::Transcription => e.transcriptions.as_ref(),
        ClientApi::Translation => e.translations.as_ref(),
        _ => None,
    }
    .ok_or(ApiError::ModelNotFound)?;
    let mut req = Request::new(body);
    *req.method_mut() = Method::POST;
    *req.uri_mut() = uri.clone();
    let h = req.headers_mut();
    h.insert(header::CONTENT_TYPE, content_type);
    h.insert(HOP_HEADER, HeaderValue::from_static("1"));
    for (name, value) in &d.provider.auth_headers {
        h.insert(name.clone(), value.clone());
    }
    Ok(req)
}

/// Prompt tokens of a request, counted in memory (numbers only).
pub(crate) fn estimate_prompt(api: ClientApi, doc: &Map<String, Value>) -> u64 {
    match api {
        ClientApi::Chat => openai::estimate_chat_prompt(doc),
        ClientApi::Embeddings => openai::estimate_embedding_input(doc),
        ClientApi::Messages => anthropic::estimate_prompt(doc),
        ClientApi::Responses => responses::estimate_prompt(doc),
        // Priced by their units (and per request), not by tokens.
        ClientApi::Images
        | ClientApi::Moderations
        | ClientApi::Rerank
        | ClientApi::Speech
        | ClientApi::Transcription
        | ClientApi::Translation => 0,
    }
}

/// Whether a chat request carries audio (`input_audio` parts) in its messages.
pub(crate) fn has_audio_input(api: ClientApi, doc: &Map<String, Value>) -> bool {
    api == ClientApi::Chat
        && array_items(doc.get("messages")).any(|m| {
            array_items(m.get("content"))
                .any(|p| p.get("type").and_then(Value::as_str) == Some("input_audio"))
        })
}

/// The output cap a request asks for: its API's own field, else chat's.
pub(crate) fn requested_max_out(api: ClientApi, doc: &Map<String, Value>) -> Option<u64> {
    match api {
        ClientApi::Messages => doc.get("max_tokens").and_then(Value::as_u64),
        ClientApi::Responses => doc.get("max_output_tokens").and_then(Value::as_u64),
        ClientApi::Chat | ClientApi::Embeddings => None,
        ClientApi::Images
        | ClientApi::Moderations
        | ClientApi::Rerank
        | ClientApi::Speech
        | ClientApi::Transcription
        | ClientApi::Translation => return Some(0),
    }
    .or_else(|| openai::requested_out(doc))
}

/// Text of a JSON value that is a string or a list of parts with `text`.
pub(crate) fn value_tokens(v: &Value) -> u64 {
    match v {
        Value::String(s) => tokens::count(s) as u64,
        Value::Array(parts) => parts.iter().map(value_tokens).sum(),
        Value::Object(o) => {
            let mut n = 0;
            for k in ["text", "content", "input", "arguments", "output"] {
                if let Some(x) = o.get(k) {
                    n += match x {
                        // Tool inputs are JSON objects; count their serialised form.
                        Value::Object(_) => tokens::count(&x.to_string()) as u64,
                        _ => value_tokens(x),
                    };
                }
            }
            n
        }
        _ => 0,
    }
}

/// Translate a whole upstream answer into the client's protocol. `None`: the body did
/// not parse as the upstream protocol's answer.
pub(crate) fn translate_reply(
    api: ClientApi,
    upstream: Protocol,
    body: &[u8],
    request_id: &str,
) -> Option<(Bytes, Reply)> {
    let reply = match upstream {
        Protocol::OpenAi | Protocol::Azure => openai::decode_reply(body)?,
        Protocol::Anthropic => anthropic::decode_reply(body)?,
        Protocol::Gemini => gemini::decode_reply(body)?,
    };
    let out = match api {
        ClientApi::Chat => openai::encode_reply(&reply, request_id),
        ClientApi::Messages => anthropic::encode_reply(&reply, request_id),
        ClientApi::Embeddings
        | ClientApi::Responses
        | ClientApi::Images
        | ClientApi::Moderations
        | ClientApi::Rerank
        | ClientApi::Speech
        | ClientApi::Transcription
        | ClientApi::Translation => return None,
    };
    Some((Bytes::from(out), reply))
}

/// Whether the answer needs translation for this client.
pub(crate) fn translates(api: ClientApi, upstream: Protocol) -> bool {
    match api {
        ClientApi::Chat
        | ClientApi::Embeddings
        | ClientApi::Responses
        | ClientApi::Images
        | ClientApi::Moderations
        | ClientApi::Rerank
        | ClientApi::Speech
        | ClientApi::Transcription
        | ClientApi::Translation => !upstream.openai_like(),
        ClientApi::Messages => upstream != Protocol::Anthropic,
    }
}

/// Usage of a pass-through answer (numbers only), and output tokens counted when the
/// upstream reported none.
pub(crate) fn meter_passthrough(api: ClientApi, body: &[u8]) -> (Option<Usage>, u64) {
    match api {
        ClientApi::Messages => match anthropic::decode_reply(body) {
            Some(r) => (r.usage, r.output_tokens()),
            None => (None, 0),
        },
        ClientApi::Responses => responses::meter_reply(body),
        ClientApi::Chat | ClientApi::Embeddings => openai::meter_reply(body),
        // Their units are metered by `units::meter`; tokens are not what they cost.
        ClientApi::Images
        | ClientApi::Moderations
        | ClientApi::Rerank
        | ClientApi::Speech
        | ClientApi::Transcription
        | ClientApi::Translation => (None, 0),
    }
}

/// Stream-side behaviour chosen once per streamed call.
pub(crate) enum StreamRelay {
    /// OpenAI chat to OpenAI chat: the original fast path.
    Chat(SseRelay),
    /// Same protocol, metered per event (Anthropic Messages, Responses).
    Metered(Box<Framed<PassKind>>),
    /// Different protocols.
    Translate(Box<Framed<Translation>>),
    /// Bytes that are not events (speech audio): forwarded as they arrive, complete when
    /// the upstream body ends.
    Raw(StreamMeter),
}

impl StreamRelay {
    /// `ids` is called only when the stream is translated: pass-through allocates nothing.
    pub(crate) fn new(
        api: ClientApi,
        upstream: Protocol,
        strip_usage: bool,
        ids: impl FnOnce() -> StreamIds,
    ) -> Self {
        match (api, translates(api, upstream)) {
            (
                ClientApi::Chat
                | ClientApi::Embeddings
                | ClientApi::Images
                | ClientApi::Moderations
                | ClientApi::Rerank
                | ClientApi::Speech
                | ClientApi::Transcription
                | ClientApi::Translation,
                false,
            ) => StreamRelay::Chat(SseRelay::new(strip_usage)),
            (ClientApi::Messages, false) => StreamRelay::Metered(Box::new(Framed::new(
                PassKind::Anthropic(anthropic::PassMeter::default()),
            ))),
            (ClientApi::Responses, _) => StreamRelay::Metered(Box::new(Framed::new(
                PassKind::Responses(responses::PassMeter::default()),
            ))),
            (_, true) => {
                let decoder = match upstream {
                    Protocol::OpenAi | Protocol::Azure => {
                        Decoder::OpenAi(openai::Decoder::default())
                    }
                    Protocol::Anthropic => Decoder::Anthropic(anthropic::Decoder::default()),
                    Protocol::Gemini => Decoder::Gemini(gemini::Decoder::default()),
                };
                let encoder = match api {
                    ClientApi::Messages => Encoder::Anthropic(anthropic::Encoder::new(ids())),
                    _ => Encoder::OpenAi(openai::Encoder::new(ids(), !strip_usage)),
                };
                StreamRelay::Translate(Box::new(Framed::new(Translation {
                    decoder,
                    encoder,
                    client: api,
                })))
            }
        }
    }

    /// The relay of a byte stream (speech audio).
    pub(crate) fn raw() -> Self {
        StreamRelay::Raw(StreamMeter::default())
    }

    pub(crate) fn push(&mut self, chunk: &[u8], out: &mut VecDeque<Bytes>) {
        match self {
            StreamRelay::Raw(m) => {
                m.events += 1;
                out.push_back(Bytes::copy_from_slice(chunk));
            }
            StreamRelay::Chat(r) => r.push(chunk, out),
            StreamRelay::Metered(m) => m.push(chunk, out),
            StreamRelay::Translate(t) => t.push(chunk, out),
        }
    }

    pub(crate) fn finish(&mut self, out: &mut VecDeque<Bytes>) {
        match self {
            StreamRelay::Raw(m) => m.done = true,
            StreamRelay::Chat(r) => r.finish(out),
            StreamRelay::Metered(m) => m.finish(out),
            StreamRelay::Translate(t) => t.finish(out),
        }
    }

    /// Bytes held back waiting for the end of an event.
    pub(crate) fn pending(&self) -> usize {
        match self {
            StreamRelay::Raw(_) => 0,
            StreamRelay::Chat(r) => r.pending(),
            StreamRelay::Metered(m) => m.framer.pending(),
            StreamRelay::Translate(t) => t.framer.pending(),
        }
    }

    /// Drop the incomplete event held back (the stream is being abandoned).
    pub(crate) fn discard(&mut self) {
        match self {
            StreamRelay::Raw(_) => {}
            StreamRelay::Chat(r) => r.discard(),
            StreamRelay::Metered(m) => m.framer.discard(),
            StreamRelay::Translate(t) => t.framer.discard(),
        }
    }

    pub(crate) fn meter(&self) -> &StreamMeter {
        match self {
            StreamRelay::Raw(m) => m,
            StreamRelay::Chat(r) => &r.meter,
            StreamRelay::Metered(m) => &m.meter,
            StreamRelay::Translate(t) => &t.meter,
        }
    }

    /// The event that ends a stream abnormally, in the client's protocol; none in a byte
    /// stream, where any bytes would be read as audio.
    pub(crate) fn error_event(&self, err: ApiError) -> Option<Bytes> {
        let anthropic_client = match self {
            StreamRelay::Raw(_) => return None,
            StreamRelay::Chat(_) => false,
            StreamRelay::Metered(m) => matches!(m.stage, PassKind::Anthropic(_)),
            StreamRelay::Translate(t) => t.stage.client == ClientApi::Messages,
        };
        Some(if anthropic_client {
            anthropic::error_event(err)
        } else {
            error_event(err)
        })
    }
}

/// Identifiers written into translated streams.
#[derive(Debug, Clone)]
pub(crate) struct StreamIds {
    pub(crate) id: String,
    pub(crate) model: String,
}

/// Complete events of `chunk`, with an unterminated trailing event flushed at the end
/// when its last line is whole (a half-written line from a cut stream is dropped).
fn flush_tail(framer: &mut SseFramer) -> Option<Bytes> {
    let event = framer.finish()?;
    if !event.ends_with(b"\n") {
        return None;
    }
    let mut complete = BytesMut::with_capacity(event.len() + 1);
    complete.extend_from_slice(&event);
    complete.extend_from_slice(b"\n");
    Some(complete.freeze())
}

/// The `event:` name and joined `data:` payload of one SSE event.
pub(crate) fn parse_event(event: &[u8]) -> (Option<&[u8]>, Option<Vec<u8>>) {
    let mut name = None;
    let mut data: Option<Vec<u8>> = None;
    for line in event.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if let Some(v) = line.strip_prefix(b"event:") {
            name = Some(v.strip_prefix(b" ").unwrap_or(v));
        } else if let Some(v) = line.strip_prefix(b"data:") {
            let v = v.strip_prefix(b" ").unwrap_or(v);
            match &mut data {
                None => data = Some(v.to_vec()),
                Some(d) => {
                    d.push(b'\n');
                    d.extend_from_slice(v);
                }
            }
        }
    }
    (name, data)
}

pub(crate) enum PassKind {
    Anthropic(anthropic::PassMeter),
    Responses(responses::PassMeter),
}

/// An upstream SSE stream cut into whole events, each handed with the stream's meter to
/// its stage: metering (same protocol) or translation.
pub(crate) struct Framed<S> {
    framer: SseFramer,
    stage: S,
    pub(crate) meter: StreamMeter,
}

/// What a [`Framed`] stream does with each event.
pub(crate) trait Stage {
    fn accept(&mut self, meter: &mut StreamMeter, event: Bytes, out: &mut VecDeque<Bytes>);

    /// The upstream stream ended (after its last event was accepted).
    fn end(&mut self, _meter: &mut StreamMeter, _out: &mut VecDeque<Bytes>) {}
}

impl<S: Stage> Framed<S> {
    fn new(stage: S) -> Self {
        Framed {
            framer: SseFramer::default(),
            stage,
            meter: StreamMeter::default(),
        }
    }

    fn push(&mut self, chunk: &[u8], out: &mut VecDeque<Bytes>) {
        let Framed {
            framer,
            stage,
            meter,
        } = self;
        framer.push(chunk, |event| stage.accept(meter, event, out));
    }

    fn finish(&mut self, out: &mut VecDeque<Bytes>) {
        if let Some(event) = flush_tail(&mut self.framer) {
            self.stage.accept(&mut self.meter, event, out);
        }
        self.stage.end(&mut self.meter, out);
    }
}

/// Same-protocol relay with per-event metering. Upstream error events are dropped (their
/// bodies never reach the client); the stream then ends without its terminal event and
/// the gateway's own error event is sent instead.
impl Stage for PassKind {
    fn accept(&mut self, meter: &mut StreamMeter, event: Bytes, out: &mut VecDeque<Bytes>) {
        let forward = match self {
            PassKind::Anthropic(m) => m.inspect(&event, meter),
            PassKind::Responses(m) => m.inspect(&event, meter),
        };
        if forward {
            meter.events += 1;
            out.push_back(event);
        }
    }
}

pub(crate) enum Decoder {
    OpenAi(openai::Decoder),
    Anthropic(anthropic::Decoder),
    Gemini(gemini::Decoder),
}

pub(crate) enum Encoder {
    OpenAi(openai::Encoder),
    Anthropic(anthropic::Encoder),
}

/// Upstream events in, client events out, one event at a time.
pub(crate) struct Translation {
    decoder: Decoder,
    encoder: Encoder,
    client: ClientApi,
}

impl Stage for Translation {
    fn accept(&mut self, meter: &mut StreamMeter, event: Bytes, out: &mut VecDeque<Bytes>) {
        let mut events = Vec::new();
        match &mut self.decoder {
            Decoder::OpenAi(d) => d.decode(&event, &mut events),
            Decoder::Anthropic(d) => d.decode(&event, &mut events),
            Decoder::Gemini(d) => d.decode(&event, &mut events),
        }
        self.emit(meter, events, out);
    }

    fn end(&mut self, meter: &mut StreamMeter, out: &mut VecDeque<Bytes>) {
        // Gemini has no terminal event: a stream that ended after its finish reason is
        // complete.
        let mut events = Vec::new();
        if let Decoder::Gemini(g) = &mut self.decoder {
            g.end(&mut events);
        }
        self.emit(meter, events, out);
    }
}

impl Translation {
    fn emit(&mut self, meter: &mut StreamMeter, events: Vec<Event>, out: &mut VecDeque<Bytes>) {
        for ev in events {
            match &ev {
                Event::Text(t) => meter.output_tokens += tokens::count(t) as u64,
                Event::ToolArgs { args, .. } => meter.output_tokens += tokens::count(args) as u64,
                Event::Usage(u) => meter.usage = Some(*u),
                Event::Done => meter.done = true,
                Event::ToolStart { .. } | Event::Finish(_) => {}
            }
            let before = out.len();
            match &mut self.encoder {
                Encoder::OpenAi(e) => e.encode(&ev, out),
                Encoder::Anthropic(e) => e.encode(&ev, out),
            }
            meter.events += (out.len() - before) as u64;
        }
    }
}

/// Fields of the OpenAI chat request the translation knows. Anything else is a vendor
/// extension and travels to the upstream untouched (as in pass-through).
const CHAT_FIELDS: &[&str] = &[
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "n",
    "stream",
    "stream_options",
    "stop",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "logprobs",
    "top_logprobs",
    "user",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "response_format",
    "seed",
    "service_tier",
    "store",
    "metadata",
    "modalities",
    "audio",
    "prediction",
    "reasoning_effort",
    "functions",
    "function_call",
    "web_search_options",
    "verbosity",
    "prompt_cache_key",
    "safety_identifier",
];

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn ids() -> StreamIds {
        StreamIds {
            id: "r1".into(),
            model: "m".into(),
        }
    }

    /// Feed `input` in pieces of `step` bytes; the client bytes out, concatenated.
    fn run(api: ClientApi, up: Protocol, input: &str, step: usize) -> (String, StreamMeter) {
        let mut relay = StreamRelay::new(api, up, false, ids);
        let mut out = VecDeque::new();
        for piece in input.as_bytes().chunks(step) {
            relay.push(piece, &mut out);
        }
        relay.finish(&mut out);
        let text: Vec<u8> = out.iter().flat_map(|b| b.iter().copied()).collect();
        // The creation time is the only field that may differ between runs.
        let text = String::from_utf8(text).unwrap();
        let text = text
            .split("\"created\":")
            .enumerate()
            .map(|(i, part)| {
                if i == 0 {
                    part.to_owned()
                } else {
                    part.trim_start_matches(|c: char| c.is_ascii_digit())
                        .to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join("\"created\":0");
        (text, *relay.meter())
    }

    const ANTHROPIC: &str = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":5,\"cache_read_input_tokens\":2,\"output_tokens\":1}}}\n\n\
event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n\
event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"h\u{e9}llo \"}}\n\n\
event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":1,\"content_block\":{\"type\":\"tool_use\",\"id\":\"t1\",\"name\":\"f\",\"input\":{}}}\n\n\
event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{\\\"a\\\":\"}}\n\n\
event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"1}\"}}\n\n\
event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"tool_use\"},\"usage\":{\"output_tokens\":7}}\n\n\
event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";

    fn chat_doc(content: Value) -> Map<String, Value> {
        match json!({"model": "m", "messages": [{"role": "user", "content": content}]}) {
            Value::Object(m) => m,
            _ => unreachable!(),
        }
    }

    #[test]
    fn media_parts_are_translated_for_each_upstream() {
        let doc = chat_doc(json!([
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
            {"type": "image_url", "image_url": {"url": "https://example.test/cat.jpg"}},
            {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
        ]));
        assert!(has_audio_input(ClientApi::Chat, &doc));
        assert!(!has_audio_input(ClientApi::Messages, &doc));
        assert!(!has_audio_input(
            ClientApi::Chat,
            &chat_doc(json!([{"type": "text", "text": "x"}]))
        ));
        let out = anthropic::from_chat_request(&doc, "claude", false, 10);
        let blocks = out.pointer("/messages/0/content").unwrap();
        assert_eq!(
            blocks[1],
            json!({"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                "data": "iVBORw0KGgo="}})
        );
        assert_eq!(
            blocks[2],
            json!({"type": "image", "source": {"type": "url",
                                                "url": "https://example.test/cat.jpg"}})
        );
        let out = gemini::from_chat_request(&doc, 10);
        let parts = out.pointer("/contents/0/parts").unwrap();
        assert_eq!(
            parts[1],
            json!({"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}})
        );
        assert_eq!(
            parts[3],
            json!({"inlineData": {"mimeType": "audio/wav", "data": "UklGRg=="}})
        );
        // And back: an Anthropic client's image reaches an OpenAI upstream as image_url.
        let messages = json!({"model": "m", "max_tokens": 5, "messages": [{"role": "user",
            "content": [{"type": "text", "text": "and this?"},
                        {"type": "image", "source": {"type": "base64",
                            "media_type": "image/jpeg", "data": "/9j/"}}]}]});
        let Value::Object(messages) = messages else {
            unreachable!()
        };
        let chat = anthropic::to_chat_request(&messages, "gpt", false);
        assert_eq!(
            chat.pointer("/messages/0/content/1").unwrap(),
            &json!({"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/"}})
        );
        assert!(Protocol::OpenAi.takes_audio() && Protocol::Gemini.takes_audio());
        assert!(!Protocol::Anthropic.takes_audio());
    }

    #[test]
    fn converters_do_not_depend_on_how_bytes_arrive() {
        let (whole, meter) = run(ClientApi::Chat, Protocol::Anthropic, ANTHROPIC, usize::MAX);
        for step in [1, 2, 7, 64] {
            assert_eq!(
                run(ClientApi::Chat, Protocol::Anthropic, ANTHROPIC, step).0,
                whole
            );
        }
        assert!(meter.done);
        assert_eq!(
            meter.usage,
            Some(Usage {
                prompt: 7,
                completion: 7,
                cached: 2
            })
        );
        assert!(whole.contains("\"finish_reason\":\"tool_calls\""));
        assert!(whole.contains("\"content\":\"h\u{e9}llo \""));
        assert!(whole.ends_with("data: [DONE]\n\n"));
    }

    #[test]
    fn a_cut_stream_is_not_done_and_keeps_no_partial_usage() {
        let cut = &ANTHROPIC[..ANTHROPIC.find("event: message_delta").unwrap()];
        let (out, meter) = run(ClientApi::Chat, Protocol::Anthropic, cut, 5);
        assert!(!meter.done);
        assert_eq!(meter.usage, None, "start usage alone is not final");
        assert!(meter.output_tokens > 0);
        assert!(!out.contains("[DONE]"));
    }

    #[test]
    fn gemini_is_done_only_after_a_finish_reason_and_the_end_of_the_body() {
        let chunk = |t: &str, fin: bool| {
            format!(
                "data: {{\"candidates\":[{{\"content\":{{\"parts\":[{{\"text\":\"{t}\"}}]}}{}}}],\"usageMetadata\":{{\"promptTokenCount\":3,\"candidatesTokenCount\":2}}}}\r\n\r\n",
                if fin { ",\"finishReason\":\"STOP\"" } else { "" }
            )
        };
        let full = format!("{}{}", chunk("a", false), chunk("b", true));
        let (out, meter) = run(ClientApi::Messages, Protocol::Gemini, &full, 3);
        assert!(meter.done);
        assert_eq!(meter.usage.map(|u| u.completion), Some(2));
        assert!(out.ends_with("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"));
        let (_, meter) = run(ClientApi::Messages, Protocol::Gemini, &chunk("a", false), 3);
        assert!(!meter.done);
    }
}
