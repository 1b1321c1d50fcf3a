"""API keys, keyed hashes, password hashing and encryption of credentials at rest.

API key format: ``ot-`` + 40 random base62 characters + a 4-character base62 checksum
(CRC32 of the random part). The fixed prefix makes leaked keys recognisable to secret
scanners; the checksum lets typos be rejected offline without a lookup.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import zlib
from dataclasses import dataclass
from typing import Protocol

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from cryptography.fernet import Fernet, InvalidToken, MultiFernet


class SecretSettings(Protocol):
    """Where the master secret comes from (onetoken.settings.Settings)."""

    secret_key_version: int

    def secret_key_bytes(self) -> bytes: ...

    def previous_secret_key_bytes(self) -> dict[int, bytes]: ...


BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
KEY_PREFIX = "ot-"
KEY_RANDOM_LEN = 40
KEY_CHECKSUM_LEN = 4
KEY_LEN = len(KEY_PREFIX) + KEY_RANDOM_LEN + KEY_CHECKSUM_LEN
_KEY_RE = re.compile(rf"^{KEY_PREFIX}[0-9A-Za-z]{{{KEY_RANDOM_LEN + KEY_CHECKSUM_LEN}}}$")

KEY_HASH_CONTEXT = b"onetoken/key-hash/v1"
ENCRYPT_CONTEXT = b"onetoken/encrypt/v1"
SESSION_CONTEXT = b"onetoken/session/v1"
SESSION_TOKEN_PREFIX = "ots_"  # noqa: S105 (a public prefix, not a secret)


def _base62(n: int, width: int) -> str:
    out = []
    for _ in range(width):
        n, r = divmod(n, 62)
        out.append(BASE62[r])
    return "".join(reversed(out))


def _checksum(random_part: str) -> str:
    # CRC32 reduced into 62**4 values: detects every single-character typo.
    return _base62(zlib.crc32(random_part.encode()) % 62**KEY_CHECKSUM_LEN, KEY_CHECKSUM_LEN)


def generate_api_key() -> str:
    random_part = "".join(secrets.choice(BASE62) for _ in range(KEY_RANDOM_LEN))
    return f"{KEY_PREFIX}{random_part}{_checksum(random_part)}"


def is_well_formed_api_key(key: str) -> bool:
    """True when `key` has the onetoken format and a valid checksum."""
    if not _KEY_RE.match(key):
        return False
    body = key[len(KEY_PREFIX) :]
    random_part, check = body[:KEY_RANDOM_LEN], body[KEY_RANDOM_LEN:]
    return hmac.compare_digest(_checksum(random_part), check)


def display_id(key: str) -> str:
    """The identifier shown in listings: first 7 characters, an ellipsis, last 4."""
    return f"{key[:7]}…{key[-4:]}"


def derive_secret(master: bytes, context: bytes) -> bytes:
    """HMAC-SHA256(master, context): one independent sub-key per purpose."""
    return hmac.new(master, context, hashlib.sha256).digest()


def keyed_hash(secret: bytes, value: str) -> str:
    """Lowercase hex HMAC-SHA256, identical to `onetoken._core.hash_key`."""
    return hmac.new(secret, value.encode(), hashlib.sha256).hexdigest()


def generate_session_token() -> str:
    return SESSION_TOKEN_PREFIX + secrets.token_urlsafe(32)


def generate_password() -> str:
    return secrets.token_urlsafe(18)


_hasher = PasswordHasher()
# Verified against for unknown emails so a login attempt takes the same time either way.
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(password_hash: str | None, password: str) -> bool:
    try:
        return _hasher.verify(password_hash or _DUMMY_HASH, password) and password_hash is not None
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


class DecryptionError(Exception):
    """A stored credential could not be decrypted (wrong ONETOKEN_SECRET_KEY?)."""


@dataclass(frozen=True, slots=True)
class Secrets:
    """Sub-keys derived from the master secret; never logged, never persisted.

    `key_hash` belongs to `key_hash_version` (ONETOKEN_SECRET_KEY_VERSION); the sub-keys of
    ONETOKEN_PREVIOUS_SECRET_KEYS stay usable after a rotation: key hashes made under them
    still verify in the engine, and what they encrypted still decrypts (new encryptions
    always use the current key).
    """

    key_hash: bytes
    session: bytes
    _fernet: MultiFernet
    key_hash_version: int = 1
    previous_key_hashes: tuple[tuple[int, bytes], ...] = ()

    @classmethod
    def from_master(
        cls, master: bytes, *, version: int = 1, previous: dict[int, bytes] | None = None
    ) -> Secrets:
        older = sorted((previous or {}).items(), reverse=True)
        fernets = [Fernet(base64.urlsafe_b64encode(derive_secret(master, ENCRYPT_CONTEXT)))]
        fernets += [
            Fernet(base64.urlsafe_b64encode(derive_secret(m, ENCRYPT_CONTEXT))) for _, m in older
        ]
        return cls(
            key_hash=derive_secret(master, KEY_HASH_CONTEXT),
            session=derive_secret(master, SESSION_CONTEXT),
            _fernet=MultiFernet(fernets),
            key_hash_version=version,
            previous_key_hashes=tuple((v, derive_secret(m, KEY_HASH_CONTEXT)) for v, m in older),
        )

    @classmethod
    def from_settings(cls, settings: SecretSettings) -> Secrets:
        return cls.from_master(
            settings.secret_key_bytes(),
            version=settings.secret_key_version,
            previous=settings.previous_secret_key_bytes(),
        )

    def key_hash_for(self, version: int) -> bytes | None:
        """The key-hash secret of `version`, None when it is no longer configured."""
        if version == self.key_hash_version:
            return self.key_hash
        return dict(self.previous_key_hashes).get(version)

    def hash_api_key(self, key: str) -> str:
        return keyed_hash(self.key_hash, key)

    def hash_session_token(self, token: str) -> str:
        return keyed_hash(self.session, token)

    def encrypt(self, plaintext: str) -> str:
        return self._fernet.encrypt(plaintext.encode()).decode()

    def decrypt(self, token: str) -> str:
        try:
            return self._fernet.decrypt(token.encode()).decode()
        except InvalidToken as exc:
            raise DecryptionError("stored credential cannot be decrypted") from exc

    def __repr__(self) -> str:
        return "Secrets(<redacted>)"
