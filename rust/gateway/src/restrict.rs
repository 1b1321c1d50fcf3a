//! Restriction of processing (policy XIII.4): an org or account that asked for it has the
//! client's address and User-Agent transformed when the call record is built, so the clear
//! values never leave the request's memory (not the journal, the call batches, call_log,
//! nor the security events the control plane derives from them).
//!
//! - The address becomes `hmac:` and the first 64 bits of HMAC-SHA256 under a secret
//!   derived from the key-hash secret: the same address always gives the same token, so
//!   floods, key risks and "many sources" still correlate, but the address cannot be read
//!   back (without the secret, not even by trying all 2^32 IPv4 addresses). A /24 prefix
//!   was not chosen: it still tells where the client sits, and it merges every client
//!   behind one carrier NAT into one source, which is worse for detection than an exact
//!   keyed token.
//! - The User-Agent keeps its product token only (`OpenAI/Python 1.54.0 (host; os)` →
//!   `OpenAI`): what software calls, never its version, host or platform comments.
//!
//! The control plane computes the same token for the control API's own records
//! (`onetoken.security.restriction`); the two must agree byte for byte.

use std::net::IpAddr;

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Context of the restriction secret, derived from the key-hash secret.
const CONTEXT: &[u8] = b"onetoken client restriction v1";

/// Longest product token kept.
const MAX_PRODUCT: usize = 32;

/// The keyed state, prepared once per engine.
pub(crate) struct Redactor {
    mac: HmacSha256,
}

fn mac_for(secret: &[u8]) -> HmacSha256 {
    // HMAC takes keys of any length; the fallback keeps the no-panic policy.
    HmacSha256::new_from_slice(secret)
        .unwrap_or_else(|_| <HmacSha256 as hmac::digest::KeyInit>::new(&Default::default()))
}

impl Redactor {
    /// From the current key-hash secret.
    pub(crate) fn new(key_hash_secret: &[u8]) -> Self {
        let mut derive = mac_for(key_hash_secret);
        derive.update(CONTEXT);
        let secret = derive.finalize().into_bytes();
        Redactor {
            mac: mac_for(&secret),
        }
    }

    /// `hmac:` and 16 hex digits. An IPv4-mapped IPv6 address is its IPv4 address, so a
    /// dual-stack listener gives one client one token.
    pub(crate) fn ip(&self, ip: IpAddr) -> String {
        let mut mac = self.mac.clone();
        mac.update(ip.to_canonical().to_string().as_bytes());
        let digest = mac.finalize().into_bytes();
        format!("hmac:{}", hex::encode(&digest[..8]))
    }
}

/// The product token of a User-Agent: up to the first `/`, space or `(`, only the
/// characters product names are made of, at most 32 of them.
pub(crate) fn product(user_agent: &str) -> String {
    user_agent
        .chars()
        .take_while(|c| !matches!(c, '/' | ' ' | '(' | '\t'))
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '+'))
        .take(MAX_PRODUCT)
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn tokens_are_stable_keyed_and_opaque() {
        let r = Redactor::new(b"secret-one");
        let a = r.ip("203.0.113.9".parse().unwrap());
        assert_eq!(a, r.ip("203.0.113.9".parse().unwrap()));
        assert_eq!(a, r.ip("::ffff:203.0.113.9".parse().unwrap()));
        assert_ne!(a, r.ip("203.0.113.10".parse().unwrap()));
        assert_ne!(
            a,
            Redactor::new(b"secret-two").ip("203.0.113.9".parse().unwrap())
        );
        assert!(a.starts_with("hmac:") && a.len() == 21, "{a}");
        assert!(!a.contains("203"), "{a}");
        // The value the control plane's test pins (tests/unit/test_restriction.py).
        assert_eq!(
            Redactor::new(b"k").ip("198.51.100.7".parse().unwrap()),
            "hmac:477d11a9ed092e42"
        );
    }

    #[test]
    fn user_agents_keep_their_product_only() {
        assert_eq!(product("OpenAI/Python 1.54.0 (host-7; Linux)"), "OpenAI");
        assert_eq!(product("curl/8.5.0"), "curl");
        assert_eq!(product("python-httpx"), "python-httpx");
        assert_eq!(product("(compatible) x"), "");
        assert_eq!(product("évil\"name/1"), "vilname");
        assert_eq!(product(&"a".repeat(100)).len(), 32);
    }
}
