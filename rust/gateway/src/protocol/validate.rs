//! What each client API requires of a request body, checked after parsing and before
//! anything is reserved or sent: a request the vendor would refuse with 400 is refused
//! here too, instead of being forwarded (or translated into something the upstream
//! accepts) and billed. Only types and presence are checked; the texts are fixed and name
//! the parameter, never a value from the request.

use serde_json::{Map, Value};

use super::ClientApi;

/// OpenAI's upper bound on `n` (choices per chat completion).
pub(crate) const MAX_CHOICES: u64 = 128;

/// A request the client API refuses: the parameter at fault and a fixed message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Invalid {
    pub(crate) param: &'static str,
    pub(crate) message: &'static str,
}

const fn invalid(param: &'static str, message: &'static str) -> Invalid {
    Invalid { param, message }
}

/// Check `doc` against what `api` requires.
pub(crate) fn check(api: ClientApi, doc: &Map<String, Value>) -> Result<(), Invalid> {
    match doc.get("model") {
        Some(Value::String(_)) => {}
        None | Some(Value::Null) => {
            return Err(invalid("model", "The \"model\" parameter is required."))
        }
        Some(_) => {
            return Err(invalid(
                "model",
                "The \"model\" parameter must be a string.",
            ))
        }
    }
    if !matches!(doc.get("stream"), None | Some(Value::Null | Value::Bool(_))) {
        return Err(invalid(
            "stream",
            "The \"stream\" parameter must be a boolean.",
        ));
    }
    match api {
        ClientApi::Chat => {
            messages(doc)?;
            positive_int(doc, "max_tokens", MAX_TOKENS)?;
            positive_int(doc, "max_completion_tokens", MAX_COMPLETION_TOKENS)?;
            positive_int(doc, "n", N)?;
            if doc.get("n").and_then(Value::as_u64).unwrap_or(1) > MAX_CHOICES {
                return Err(invalid("n", "The \"n\" parameter must be at most 128."));
            }
        }
        ClientApi::Embeddings => match doc.get("input") {
            None | Some(Value::Null) => {
                return Err(invalid("input", "The \"input\" parameter is required."))
            }
            Some(Value::String(_)) => {}
            Some(Value::Array(items)) if !items.is_empty() => {}
            Some(_) => {
                return Err(invalid(
                    "input",
                    "The \"input\" parameter must be a string or a non-empty array.",
                ))
            }
        },
        ClientApi::Messages => {
            if matches!(doc.get("max_tokens"), None | Some(Value::Null)) {
                return Err(invalid(
                    "max_tokens",
                    "The \"max_tokens\" parameter is required.",
                ));
            }
            positive_int(doc, "max_tokens", MAX_TOKENS)?;
            messages(doc)?;
        }
        ClientApi::Responses => {
            match doc.get("input") {
                None | Some(Value::Null) => {
                    return Err(invalid("input", "The \"input\" parameter is required."))
                }
                Some(Value::String(_) | Value::Array(_)) => {}
                Some(_) => {
                    return Err(invalid(
                        "input",
                        "The \"input\" parameter must be a string or an array.",
                    ))
                }
            }
            positive_int(doc, "max_output_tokens", MAX_OUTPUT_TOKENS)?;
        }
        ClientApi::Images | ClientApi::Moderations | ClientApi::Rerank | ClientApi::Speech => {
            super::units::check(api, doc)?;
        }
        // An upload is checked as its prefix is read (`upload::read_prefix`).
        ClientApi::Transcription | ClientApi::Translation => {}
    }
    Ok(())
}

const MAX_TOKENS: Invalid = invalid(
    "max_tokens",
    "The \"max_tokens\" parameter must be a positive integer.",
);
const MAX_COMPLETION_TOKENS: Invalid = invalid(
    "max_completion_tokens",
    "The \"max_completion_tokens\" parameter must be a positive integer.",
);
const MAX_OUTPUT_TOKENS: Invalid = invalid(
    "max_output_tokens",
    "The \"max_output_tokens\" parameter must be a positive integer.",
);
const N: Invalid = invalid("n", "The \"n\" parameter must be a positive integer.");

/// An optional integer parameter: absent or null, or an integer of at least 1 (a float,
/// even `8.0`, a string, zero or a negative number is refused).
fn positive_int(doc: &Map<String, Value>, name: &str, err: Invalid) -> Result<(), Invalid> {
    match doc.get(name) {
        None | Some(Value::Null) => Ok(()),
        Some(v) if v.as_u64().is_some_and(|n| n >= 1) => Ok(()),
        Some(_) => Err(err),
    }
}

/// `messages`: a non-empty array of objects, each with a string `role`.
fn messages(doc: &Map<String, Value>) -> Result<(), Invalid> {
    let list = match doc.get("messages") {
        None | Some(Value::Null) => {
            return Err(invalid(
                "messages",
                "The \"messages\" parameter is required.",
            ))
        }
        Some(Value::Array(list)) => list,
        Some(_) => {
            return Err(invalid(
                "messages",
                "The \"messages\" parameter must be an array.",
            ))
        }
    };
    if list.is_empty() {
        return Err(invalid(
            "messages",
            "The \"messages\" parameter must contain at least one message.",
        ));
    }
    if list
        .iter()
        .any(|m| !m.get("role").is_some_and(Value::is_string))
    {
        return Err(invalid(
            "messages",
            "Every message must be an object with a string \"role\".",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn doc(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }

    #[test]
    fn integer_limits_refuse_zero_negative_float_and_strings() {
        let base = json!({"model": "m", "messages": [{"role": "user", "content": "x"}]});
        for (name, bad) in [
            ("max_tokens", json!(-1)),
            ("max_tokens", json!(0)),
            ("max_tokens", json!(8.5)),
            ("max_completion_tokens", json!("8")),
            ("n", json!(0)),
            ("n", json!(1.0)),
            ("n", json!(129)),
        ] {
            let mut d = doc(base.clone());
            d.insert(name.into(), bad);
            assert_eq!(check(ClientApi::Chat, &d).map_err(|e| e.param), Err(name));
        }
        let mut d = doc(base);
        d.insert("n".into(), json!(128));
        d.insert("max_tokens".into(), Value::Null);
        assert_eq!(check(ClientApi::Chat, &d), Ok(()));
    }
}
