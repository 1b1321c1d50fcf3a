"""OpenID Connect as a relying party: discovery, the token request, and the ID token's
checks (docs/sso.md).

Everything the identity provider serves is fetched by the server from addresses an org
chose, so every request goes through the outbound check webhooks use
(onetoken.webhooks.dispatcher.fetch): internal addresses are refused unless the operator
allowed them (ONETOKEN_SSO_PRIVATE_CIDRS). Signatures are checked with `cryptography`
against the provider's JWKS; only asymmetric algorithms are accepted (never `none`, never
a shared-secret HMAC, whose key would be the client secret).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit

import httpcore
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from onetoken.security.net import AddressRefused
from onetoken.webhooks.dispatcher import ResponseTooLarge, Target, fetch

# Clock difference tolerated between the provider and this server.
LEEWAY_S = 60
_MAX_DOCUMENT = 256 * 1024
_MAX_TOKEN_CHARS = 16 * 1024

_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "256": hashes.SHA256, "384": hashes.SHA384, "512": hashes.SHA512,
}
_CURVES: dict[str, type[ec.EllipticCurve]] = {
    "ES256": ec.SECP256R1, "ES384": ec.SECP384R1, "ES512": ec.SECP521R1,
}
ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512")


class OidcError(Exception):
    """A step of the flow failed. `reason` is a fixed name for the security log and the
    person's message; nothing the provider sent is echoed."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ProviderMetadata:
    """What discovery says about the provider (the fields this relying party uses)."""

    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str
    # client_secret_basic unless the provider only takes client_secret_post.
    secret_in_body: bool


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def pkce_pair() -> tuple[str, str]:
    """A PKCE verifier and its S256 challenge (RFC 7636)."""
    verifier = secrets.token_urlsafe(48)
    return verifier, b64url(hashlib.sha256(verifier.encode()).digest())


def _get_json(target: Target, url: str, reason: str) -> dict[str, Any]:
    status, body = _request(target, "GET", url, {"accept": "application/json"}, None, reason)
    if status != 200:
        raise OidcError(reason)
    return _json_object(body, reason)


def _request(
    target: Target, method: str, url: str, headers: dict[str, str], body: bytes | None,
    reason: str,
) -> tuple[int, bytes]:
    try:
        return fetch(target, method, url, headers=headers, body=body, max_bytes=_MAX_DOCUMENT)
    except AddressRefused:
        raise OidcError("address_not_allowed") from None
    except (httpcore.TimeoutException, httpcore.NetworkError, httpcore.ProtocolError,
            httpcore.UnsupportedProtocol, OSError, ResponseTooLarge, ValueError):
        raise OidcError(reason) from None


def _json_object(body: bytes, reason: str) -> dict[str, Any]:
    try:
        value = json.loads(body)
    except ValueError:
        raise OidcError(reason) from None
    if not isinstance(value, dict):
        raise OidcError(reason)
    return value


def endpoint_ok(url: object, *, allow_http: bool) -> bool:
    """An absolute http(s) URL (http only where the operator allows internal providers)
    without credentials or fragment: what may be fetched or sent a browser to."""
    if not isinstance(url, str) or len(url) > 2048:
        return False
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    schemes = ("https", "http") if allow_http else ("https",)
    return (
        parts.scheme in schemes
        and bool(parts.hostname)
        and parts.username is None
        and parts.password is None
        and not parts.fragment
    )


def discover(target: Target, issuer: str, *, allow_http: bool) -> ProviderMetadata:
    """The provider's metadata from `<issuer>/.well-known/openid-configuration`; its
    `issuer` must be exactly the configured one (OpenID Connect Discovery 1.0, 4.3)."""
    doc = _get_json(
        target, issuer.rstrip("/") + "/.well-known/openid-configuration", "discovery_failed"
    )
    if doc.get("issuer") != issuer:
        raise OidcError("issuer_mismatch")
    urls = [doc.get(k) for k in ("authorization_endpoint", "token_endpoint", "jwks_uri")]
    if not all(endpoint_ok(u, allow_http=allow_http) for u in urls):
        raise OidcError("discovery_failed")
    methods = doc.get("token_endpoint_auth_methods_supported") or ["client_secret_basic"]
    secret_in_body = "client_secret_basic" not in methods and "client_secret_post" in methods
    return ProviderMetadata(issuer, str(urls[0]), str(urls[1]), str(urls[2]), secret_in_body)


def authorization_url(
    meta: ProviderMetadata,
    *,
    client_id: str,
    redirect_uri: str,
    state: str,
    nonce: str,
    code_challenge: str,
    login_hint: str = "",
) -> str:
    params = {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": redirect_uri,
        "scope": "openid email profile",
        "state": state,
        "nonce": nonce,
        "code_challenge": code_challenge,
        "code_challenge_method": "S256",
    }
    if login_hint:
        params["login_hint"] = login_hint
    sep = "&" if "?" in meta.authorization_endpoint else "?"
    return meta.authorization_endpoint + sep + urlencode(params)


def redeem_code(
    target: Target,
    meta: ProviderMetadata,
    *,
    client_id: str,
    client_secret: str,
    code: str,
    redirect_uri: str,
    code_verifier: str,
) -> str:
    """The ID token the token endpoint gives for `code` (and the PKCE verifier)."""
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": redirect_uri,
        "code_verifier": code_verifier,
    }
    headers = {"content-type": "application/x-www-form-urlencoded", "accept": "application/json"}
    if meta.secret_in_body:
        form |= {"client_id": client_id, "client_secret": client_secret}
    else:
        # RFC 6749 2.3.1: each part form-encoded before the Basic encoding.
        pair = urlencode({"a": client_id})[2:] + ":" + urlencode({"a": client_secret})[2:]
        headers["authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
    status, body = _request(
        target, "POST", meta.token_endpoint, headers, urlencode(form).encode(),
        "token_request_failed",
    )
    if status != 200:
        raise OidcError("token_request_failed")
    id_token = _json_object(body, "token_request_failed").get("id_token")
    if not isinstance(id_token, str) or not id_token or len(id_token) > _MAX_TOKEN_CHARS:
        raise OidcError("token_request_failed")
    return id_token


def fetch_jwks(target: Target, meta: ProviderMetadata) -> list[dict[str, Any]]:
    keys = _get_json(target, meta.jwks_uri, "jwks_failed").get("keys")
    if not isinstance(keys, list):
        raise OidcError("jwks_failed")
    return [k for k in keys if isinstance(k, dict)]


def token_kid(token: str) -> str | None:
    """The `kid` the ID token's header names (None when absent or unreadable): which
    published key to look for before its checks."""
    try:
        kid = _decode_part(token.split(".", 1)[0]).get("kid")
    except ValueError:
        return None
    return kid if isinstance(kid, str) else None


class ProviderCache:
    """Discovery documents and JWKS kept for `ttl_s` seconds, at most `max_entries` of
    them (the oldest dropped first), so a sign-in does not fetch them every time.

    Entries are keyed by URL and by the allow-list they were fetched under: narrowing the
    operator's allow-list never serves what only the wider one let through. An ID token
    naming a `kid` the cached JWKS lacks refetches it once (the provider rotated its keys),
    whatever its age.
    """

    def __init__(
        self, ttl_s: float = 300.0, max_entries: int = 256,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[tuple[str, str, str], tuple[float, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def _get(self, key: tuple[str, str, str]) -> Any:
        with self._lock:
            hit = self._entries.get(key)
            if hit is None or self._clock() - hit[0] >= self.ttl_s:
                return None
            return hit[1]

    def _put(self, key: tuple[str, str, str], value: Any) -> None:
        with self._lock:
            self._entries[key] = (self._clock(), value)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def discover(self, target: Target, issuer: str, *, allow_http: bool) -> ProviderMetadata:
        key = ("discovery", issuer, repr((list(target.allow), allow_http)))
        meta = self._get(key)
        if meta is None:
            meta = discover(target, issuer, allow_http=allow_http)
            self._put(key, meta)
        return meta  # type: ignore[no-any-return]

    def jwks(
        self, target: Target, meta: ProviderMetadata, kid: str | None
    ) -> list[dict[str, Any]]:
        """The provider's keys, refetched when the cached ones lack `kid`."""
        key = ("jwks", meta.jwks_uri, repr(list(target.allow)))
        keys: list[dict[str, Any]] | None = self._get(key)
        if keys is None or (kid is not None and all(k.get("kid") != kid for k in keys)):
            keys = fetch_jwks(target, meta)
            self._put(key, keys)
        return keys


def _int(value: object) -> int:
    if not isinstance(value, str):
        raise ValueError("not a JWK member")
    return int.from_bytes(_unb64url(value), "big")


def _verify_signature(alg: str, jwk: dict[str, Any], signed: bytes, signature: bytes) -> None:
    """InvalidSignature (or ValueError for an unusable key) unless it verifies."""
    digest = _HASHES[alg[2:]]()
    if alg.startswith(("RS", "PS")):
        if jwk.get("kty") != "RSA":
            raise ValueError("key type")
        key = rsa.RSAPublicNumbers(_int(jwk.get("e")), _int(jwk.get("n"))).public_key()
        if alg.startswith("RS"):
            key.verify(signature, signed, padding.PKCS1v15(), digest)
        else:
            pss = padding.PSS(mgf=padding.MGF1(digest), salt_length=digest.digest_size)
            key.verify(signature, signed, pss, digest)
        return
    curve = _CURVES[alg]()
    if jwk.get("kty") != "EC" or jwk.get("crv") != f"P-{curve.key_size}":
        raise ValueError("key type")
    point = ec.EllipticCurvePublicNumbers(_int(jwk.get("x")), _int(jwk.get("y")), curve)
    size = (curve.key_size + 7) // 8
    if len(signature) != 2 * size:
        raise InvalidSignature
    r = int.from_bytes(signature[:size], "big")
    s = int.from_bytes(signature[size:], "big")
    point.public_key().verify(encode_dss_signature(r, s), signed, ec.ECDSA(digest))


def _decode_part(text: str) -> dict[str, Any]:
    value = json.loads(_unb64url(text))
    if not isinstance(value, dict):
        raise ValueError("not an object")
    return value


def verify_id_token(
    token: str,
    keys: list[dict[str, Any]],
    *,
    issuer: str,
    client_id: str,
    nonce: str,
    now: int,
) -> dict[str, Any]:
    """The ID token's claims once its signature (a key of the provider's JWKS), issuer,
    audience, authorized party, expiry and nonce hold (OpenID Connect Core 3.1.3.7);
    OidcError naming the first check that failed otherwise."""
    try:
        head_b64, body_b64, sig_b64 = token.split(".")
        header = _decode_part(head_b64)
        claims = _decode_part(body_b64)
        signature = _unb64url(sig_b64)
    except ValueError:
        raise OidcError("malformed_id_token") from None
    alg = header.get("alg")
    if alg not in ALGORITHMS:
        raise OidcError("algorithm_not_allowed")
    kid = header.get("kid")
    candidates = [
        k for k in keys
        if k.get("use", "sig") == "sig"
        and k.get("alg") in (None, alg)
        and (kid is None or k.get("kid") == kid)
    ]
    signed = f"{head_b64}.{body_b64}".encode()
    verified = False
    for jwk in candidates:
        try:
            _verify_signature(str(alg), jwk, signed, signature)
        except (InvalidSignature, ValueError, TypeError):
            continue
        verified = True
        break
    if not verified:
        raise OidcError("bad_signature")
    if claims.get("iss") != issuer:
        raise OidcError("wrong_issuer")
    aud = claims.get("aud")
    audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
    if client_id not in audiences:
        raise OidcError("wrong_audience")
    azp = claims.get("azp")
    if (len(audiences) > 1 or azp is not None) and azp != client_id:
        raise OidcError("wrong_authorized_party")
    exp, iat = claims.get("exp"), claims.get("iat")
    if not isinstance(exp, int | float) or exp <= now - LEEWAY_S:
        raise OidcError("expired")
    if not isinstance(iat, int | float) or iat > now + LEEWAY_S:
        raise OidcError("issued_in_future")
    got = claims.get("nonce")
    if not isinstance(got, str) or not hmac.compare_digest(got.encode(), nonce.encode()):
        raise OidcError("nonce_mismatch")
    if not isinstance(claims.get("sub"), str) or not claims["sub"]:
        raise OidcError("malformed_id_token")
    return claims
