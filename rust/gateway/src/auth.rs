//! API key lookup: keys are known only by their HMAC-SHA256 under the server secret.

use std::collections::HashMap;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::snapshot::{ElsewhereKey, Key};

type HmacSha256 = Hmac<Sha256>;

/// HMAC-SHA256 of `key` under `secret`, lowercase hex: the hash the snapshot stores.
pub fn hash_key(secret: &[u8], key: &str) -> String {
    hex::encode(KeyHasher::new(secret).digest(key))
}

/// The keyed HMAC state, prepared once so each lookup only clones it.
#[derive(Clone)]
pub(crate) struct KeyHasher {
    mac: HmacSha256,
}

impl KeyHasher {
    pub(crate) fn new(secret: &[u8]) -> Self {
        // HMAC accepts keys of any length, so this cannot fail; the fallback keeps
        // the no-panic policy without an unreachable branch.
        let mac = HmacSha256::new_from_slice(secret)
            .unwrap_or_else(|_| <HmacSha256 as hmac::digest::KeyInit>::new(&Default::default()));
        KeyHasher { mac }
    }

    pub(crate) fn digest(&self, key: &str) -> [u8; 32] {
        let mut mac = self.mac.clone();
        mac.update(key.as_bytes());
        mac.finalize().into_bytes().into()
    }
}

/// The hashers of every accepted secret version, the current one first. A key matches
/// only under the secret version it was hashed with, so a rotated-out secret cannot
/// authenticate a key issued under the new one.
pub(crate) struct KeyRing {
    hashers: Vec<(u32, KeyHasher)>,
}

impl KeyRing {
    pub(crate) fn new(secrets: &[(u32, Vec<u8>)]) -> Self {
        KeyRing {
            hashers: secrets
                .iter()
                .map(|(v, s)| (*v, KeyHasher::new(s)))
                .collect(),
        }
    }

    /// The snapshot key for `raw`: one HMAC per configured secret, at most.
    pub(crate) fn lookup<'a, K: Hashed>(
        &self,
        keys: &'a HashMap<[u8; 32], K>,
        raw: &str,
    ) -> Option<&'a K> {
        self.hashers.iter().find_map(|(version, hasher)| {
            keys.get(&hasher.digest(raw))
                .filter(|k| k.secret_version() == *version)
        })
    }
}

/// A snapshot entry known by its keyed hash, made under one secret version.
pub(crate) trait Hashed {
    fn secret_version(&self) -> u32;
}

impl Hashed for Key {
    fn secret_version(&self) -> u32 {
        self.secret_version
    }
}

impl Hashed for ElsewhereKey {
    fn secret_version(&self) -> u32 {
        self.secret_version
    }
}

/// The API key from `Authorization: Bearer K` or `x-api-key: K`.
pub(crate) fn extract_key(headers: &http::HeaderMap) -> Option<&str> {
    if let Some(v) = headers.get(http::header::AUTHORIZATION) {
        let v = v.to_str().ok()?;
        let (scheme, rest) = v.split_once(' ')?;
        if scheme.eq_ignore_ascii_case("bearer") {
            let k = rest.trim();
            return (!k.is_empty()).then_some(k);
        }
        return None;
    }
    let k = headers.get("x-api-key")?.to_str().ok()?.trim();
    (!k.is_empty()).then_some(k)
}
