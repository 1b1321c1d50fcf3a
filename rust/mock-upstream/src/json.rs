//! Hand-written JSON output. The replies have a fixed shape, so writing bytes straight into
//! a buffer is several times cheaper than building a `serde_json::Value`, and the mock is
//! the baseline every benchmark row is compared with.

/// Append `s` as a JSON string literal (quotes included).
pub(crate) fn push_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0x00..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        if escape.is_empty() {
            out.extend_from_slice(b"\\u00");
            out.push(HEX[usize::from(b >> 4)]);
            out.push(HEX[usize::from(b & 0xf)]);
        } else {
            out.extend_from_slice(escape);
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Append an unsigned integer in decimal.
pub(crate) fn push_u64(out: &mut Vec<u8>, mut n: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        // `n % 10` is below 10, so the cast cannot truncate.
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&buf[i..]);
}

/// Token usage as the mock reports it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Usage {
    pub(crate) prompt: u64,
    pub(crate) completion: u64,
    pub(crate) cached: u64,
}

/// Append a chat `usage` object in OpenAI's current shape (with the details objects that
/// the SDKs and the gateway read cached tokens from).
pub(crate) fn push_chat_usage(out: &mut Vec<u8>, u: Usage) {
    out.extend_from_slice(b"{\"prompt_tokens\":");
    push_u64(out, u.prompt);
    out.extend_from_slice(b",\"completion_tokens\":");
    push_u64(out, u.completion);
    out.extend_from_slice(b",\"total_tokens\":");
    push_u64(out, u.prompt.saturating_add(u.completion));
    out.extend_from_slice(b",\"prompt_tokens_details\":{\"cached_tokens\":");
    push_u64(out, u.cached);
    out.extend_from_slice(
        b",\"audio_tokens\":0},\"completion_tokens_details\":{\"reasoning_tokens\":0,\
\"audio_tokens\":0,\"accepted_prediction_tokens\":0,\"rejected_prediction_tokens\":0}}",
    );
}

/// An OpenAI-shaped error body.
pub(crate) fn error_body(message: &str, kind: &str, code: Option<&str>) -> Vec<u8> {
    let mut out = Vec::with_capacity(96 + message.len());
    out.extend_from_slice(b"{\"error\":{\"message\":");
    push_str(&mut out, message);
    out.extend_from_slice(b",\"type\":");
    push_str(&mut out, kind);
    out.extend_from_slice(b",\"param\":null,\"code\":");
    match code {
        Some(code) => push_str(&mut out, code),
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b"}}");
    out
}

/// Standard base64 (with padding), for `encoding_format: "base64"` embeddings, which the
/// OpenAI Python SDK asks for by default.
pub(crate) fn push_base64(out: &mut Vec<u8>, data: &[u8]) {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    for chunk in data.chunks(3) {
        let b0 = chunk[0];
        let b1 = chunk.get(1).copied().unwrap_or(0);
        let b2 = chunk.get(2).copied().unwrap_or(0);
        out.push(ALPHABET[usize::from(b0 >> 2)]);
        out.push(ALPHABET[usize::from(((b0 & 0x03) << 4) | (b1 >> 4))]);
        if chunk.len() > 1 {
            out.push(ALPHABET[usize::from(((b1 & 0x0f) << 2) | (b2 >> 6))]);
        } else {
            out.push(b'=');
        }
        if chunk.len() > 2 {
            out.push(ALPHABET[usize::from(b2 & 0x3f)]);
        } else {
            out.push(b'=');
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_round_trip_through_serde() {
        for s in [
            "plain",
            "quote \" and \\ slash",
            "ctl \n\r\t\u{8}\u{c}\u{1}\u{1f}",
            "ünïcødé ✓",
            "",
        ] {
            let mut out = Vec::new();
            push_str(&mut out, s);
            let back: String = serde_json::from_slice(&out).unwrap_or_default();
            assert_eq!(back, s);
        }
    }

    #[test]
    fn integers() {
        for n in [0u64, 7, 10, 1234567890, u64::MAX] {
            let mut out = Vec::new();
            push_u64(&mut out, n);
            assert_eq!(out, n.to_string().into_bytes());
        }
    }

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (input, want) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            let mut out = Vec::new();
            push_base64(&mut out, input.as_bytes());
            assert_eq!(String::from_utf8_lossy(&out), want);
        }
    }
}
