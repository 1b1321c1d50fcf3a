//! Entry points for the fuzz targets in `rust/fuzz` (built only with the `fuzzing`
//! feature): the request admission and protocol translation code, which is private to the
//! crate, driven in memory with no sockets so that a fuzzer runs thousands of inputs a
//! second. Each function must return normally on every input; a panic is a finding.

use std::collections::VecDeque;

use serde_json::{Map, Value};

use crate::error::ApiError;
use crate::guard::CategorySet;
use crate::protocol::{
    self, anthropic, gemini, responses, validate, ClientApi, Protocol, StreamIds,
};
use crate::screen::OrgGuard;
use crate::snapshot::GuardMode;

const APIS: [ClientApi; 8] = [
    ClientApi::Chat,
    ClientApi::Embeddings,
    ClientApi::Messages,
    ClientApi::Responses,
    ClientApi::Images,
    ClientApi::Moderations,
    ClientApi::Rerank,
    ClientApi::Speech,
];
const PROTOCOLS: [Protocol; 4] = [
    Protocol::OpenAi,
    Protocol::Azure,
    Protocol::Anthropic,
    Protocol::Gemini,
];

/// A client body as the gateway admits it: parsed, guarded, estimated, and translated
/// into every upstream protocol's request. `selector` picks the client API.
pub fn admit_and_translate_request(selector: u8, body: &[u8]) {
    let api = APIS[usize::from(selector) % APIS.len()];
    // The same parse and refusal as the proxy: anything but a JSON object is a 400.
    let Ok(Value::Object(doc)) = serde_json::from_slice::<Value>(body) else {
        return;
    };
    // Translation runs only on validated bodies in the proxy; here it runs on every body,
    // so that the translators' own handling of odd shapes is exercised too.
    let _ = validate::check(api, &doc);
    let guard = OrgGuard {
        mode: GuardMode::Flag,
        categories: CategorySet::all(),
    };
    let _ = guard.check(&doc);
    let _ = protocol::estimate_prompt(api, &doc);
    let max_out = protocol::requested_max_out(api, &doc).unwrap_or(4096);
    let stream = doc.get("stream").and_then(Value::as_bool) == Some(true);
    let _ = serde_json::to_vec(&anthropic::from_chat_request(&doc, "m", stream, max_out));
    let _ = serde_json::to_vec(&gemini::from_chat_request(&doc, max_out));
    let chat = anthropic::to_chat_request(&doc, "m", stream);
    if let Value::Object(chat) = &chat {
        let _ = serde_json::to_vec(&gemini::from_chat_request(chat, max_out));
    }
    let mut passthrough: Map<String, Value> = doc;
    protocol::openai::prepare_chat(&mut passthrough, "m", stream, max_out);
    let _ = serde_json::to_vec(&passthrough);
}

/// An upstream answer, whole and streamed, decoded for every pair of client API and
/// upstream protocol. `selector` picks where the stream is cut into chunks.
pub fn translate_reply(selector: u8, body: &[u8]) {
    for api in APIS {
        let _ = protocol::meter_passthrough(api, body);
        for upstream in PROTOCOLS {
            let _ = protocol::translate_reply(api, upstream, body, "req");
            let mut relay =
                protocol::StreamRelay::new(api, upstream, selector & 1 == 0, || StreamIds {
                    id: "req".into(),
                    model: "m".into(),
                });
            let mut out = VecDeque::new();
            let step = usize::from(selector >> 1).max(1);
            for chunk in body.chunks(step) {
                relay.push(chunk, &mut out);
            }
            relay.finish(&mut out);
            let _ = relay.meter();
            let _ = relay.error_event(ApiError::UpstreamTimeout);
        }
    }
    let _ = responses::meter_reply(body);
}
