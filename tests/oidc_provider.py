"""A real OpenID provider for the SSO tests, over HTTP on 127.0.0.1 (port 0): discovery,
JWKS, authorize and token endpoints. Its ID tokens are signed with joserfc and its PKCE
check is authlib's (RFC 7636), so the relying party under test is checked by code that is
not its own.

The authorize endpoint signs in `person` without a page (the test is the person) and
sends the browser back with a code. What it issues can be bent per test: another
audience, an expired token, a stale nonce, another signing key.
"""

from __future__ import annotations

import base64
import html
import json
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

from authlib.oauth2.rfc7636 import create_s256_code_challenge
from joserfc import jwt
from joserfc.jwk import RSAKey


def _rsa(kid: str) -> RSAKey:
    return RSAKey.generate_key(
        2048, parameters={"kid": kid, "use": "sig", "alg": "RS256"}, private=True
    )


@dataclass
class Person:
    sub: str
    email: str
    groups: list[str] = field(default_factory=list)
    email_verified: bool = True
    name: str = "Test Person"


@dataclass
class _Grant:
    client_id: str
    redirect_uri: str
    challenge: str
    nonce: str
    person: Person


class OidcProvider:
    """One client (`client_id`, `client_secret`) registered with `redirect_uri`; the
    issuer names the listener by `host` (another name than the relying party's makes the
    provider another site to a browser)."""

    def __init__(
        self, client_id: str, client_secret: str, redirect_uri: str, host: str = "127.0.0.1"
    ) -> None:
        self.client_id = client_id
        self.client_secret = client_secret
        self.redirect_uri = redirect_uri
        self.key = _rsa("key-1")
        # Signs when `sign_with_other_key` is set; never published.
        self.other_key = _rsa("key-1")
        self.person = Person("sub-alice", "alice@corp.test", ["engineering"])
        # A page at the provider the person continues from (as after typing a password
        # there): the way back then starts on the provider's site, not the caller's.
        self.consent_page = False
        # Knobs a test turns to make the next ID token wrong in one way.
        self.audience: str | list[str] | None = None
        self.expires_in = 300
        self.nonce_override: str | None = None
        self.sign_with_other_key = False
        # What the token endpoint saw: ("ok" | "pkce_failed" | "bad_client" | ...).
        self.token_outcomes: list[str] = []
        self.last_nonce = ""
        # How often discovery and the JWKS were fetched.
        self.fetches: dict[str, int] = {"discovery": 0, "jwks": 0}
        self._grants: dict[str, _Grant] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.issuer = f"http://{host}:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> OidcProvider:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    # -- what the endpoints answer ----------------------------------------------------------

    def discovery(self) -> dict[str, Any]:
        return {
            "issuer": self.issuer,
            "authorization_endpoint": self.issuer + "/authorize",
            "token_endpoint": self.issuer + "/token",
            "jwks_uri": self.issuer + "/jwks",
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "code_challenge_methods_supported": ["S256"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic"],
        }

    def authorize(self, query: dict[str, str]) -> tuple[int, dict[str, str]]:
        if (
            query.get("client_id") != self.client_id
            or query.get("redirect_uri") != self.redirect_uri
            or query.get("response_type") != "code"
            or query.get("code_challenge_method") != "S256"
            or not query.get("code_challenge")
            or "openid" not in query.get("scope", "").split()
        ):
            return 400, {}
        code = secrets.token_urlsafe(24)
        with self._lock:
            self._grants[code] = _Grant(self.client_id, query["redirect_uri"],
                                        query["code_challenge"], query.get("nonce", ""),
                                        self.person)
        back = {"code": code, "state": query.get("state", "")}
        return 302, {"Location": self.redirect_uri + "?" + urlencode(back)}

    def token(self, form: dict[str, str], authorization: str) -> tuple[int, dict[str, Any]]:
        client_id, _, secret = self._basic(authorization)
        if client_id != self.client_id or secret != self.client_secret:
            self.token_outcomes.append("bad_client")
            return 401, {"error": "invalid_client"}
        with self._lock:
            grant = self._grants.pop(form.get("code", ""), None)
        if grant is None or form.get("grant_type") != "authorization_code":
            self.token_outcomes.append("bad_code")
            return 400, {"error": "invalid_grant"}
        if form.get("redirect_uri") != grant.redirect_uri:
            self.token_outcomes.append("bad_redirect_uri")
            return 400, {"error": "invalid_grant"}
        verifier = form.get("code_verifier", "")
        if not verifier or create_s256_code_challenge(verifier) != grant.challenge:
            self.token_outcomes.append("pkce_failed")
            return 400, {"error": "invalid_grant", "error_description": "PKCE"}
        self.token_outcomes.append("ok")
        self.last_nonce = grant.nonce
        return 200, {"access_token": secrets.token_urlsafe(16), "token_type": "Bearer",
                     "expires_in": 300, "id_token": self.id_token(grant)}

    def id_token(self, grant: _Grant) -> str:
        now = int(time.time())
        p = grant.person
        claims = {
            "iss": self.issuer,
            "sub": p.sub,
            "aud": self.audience if self.audience is not None else grant.client_id,
            "iat": now if self.expires_in > 0 else now - 3600,
            "exp": now + self.expires_in,
            "nonce": self.nonce_override if self.nonce_override is not None else grant.nonce,
            "email": p.email,
            "email_verified": p.email_verified,
            "name": p.name,
            "groups": p.groups,
        }
        key = self.other_key if self.sign_with_other_key else self.key
        return jwt.encode({"alg": "RS256", "kid": key.kid}, claims, key)

    def rotate_key(self, kid: str) -> None:
        """A new signing key, published in place of the old one."""
        self.key = _rsa(kid)

    @staticmethod
    def _basic(authorization: str) -> tuple[str, str, str]:
        if not authorization.startswith("Basic "):
            return "", "", ""
        raw = base64.b64decode(authorization[6:]).decode()
        user, sep, password = raw.partition(":")
        return unquote(user), sep, unquote(password)

    # -- HTTP ---------------------------------------------------------------------------------

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _send(self, status: int, body: Any = None,
                      headers: dict[str, str] | None = None) -> None:
                data = json.dumps(body).encode() if body is not None else b""
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _page(self, onward: str) -> None:
                link = html.escape(onward, quote=True)
                data = f'<!doctype html><a id="consent" href="{link}">Continue</a>'.encode()
                self.send_response(200)
                self.send_header("content-type", "text/html; charset=utf-8")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                if parts.path == "/.well-known/openid-configuration":
                    provider.fetches["discovery"] += 1
                    self._send(200, provider.discovery())
                elif parts.path == "/jwks":
                    provider.fetches["jwks"] += 1
                    self._send(200, {"keys": [provider.key.as_dict(private=False)]})
                elif parts.path == "/authorize":
                    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
                    status, headers = provider.authorize(query)
                    if status == 302 and provider.consent_page:
                        self._page(headers["Location"])
                    else:
                        self._send(status, None, headers)
                else:
                    self._send(404, {"error": "not_found"})

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                form = {k: v[0] for k, v in parse_qs(self.rfile.read(length).decode()).items()}
                if urlsplit(self.path).path != "/token":
                    self._send(404, {"error": "not_found"})
                    return
                status, body = provider.token(form, self.headers.get("authorization", ""))
                self._send(status, body)

        return Handler


@contextmanager
def running(
    client_id: str, client_secret: str, redirect_uri: str, host: str = "127.0.0.1"
) -> Iterator[OidcProvider]:
    provider = OidcProvider(client_id, client_secret, redirect_uri, host).start()
    try:
        yield provider
    finally:
        provider.stop()
