"""The sealed file of backups (onetoken.backup) and of org termination exports
(onetoken.rights.termination): an authenticated, encrypted stream, useless without its key.

Layout: MAGIC, a 4-byte big-endian header length, the header (JSON: format, how the key is
derived and its salt, the nonce prefix, the master secret's fingerprint), then chunks, each
a 4-byte length and an AES-256-GCM ciphertext of at most CHUNK_BYTES of plaintext.

Chunks follow the STREAM construction (Hoang, Reyhanitabar, Rogaway, Vizár 2015): the
nonce is the file's random prefix, the chunk's counter and a flag set on the last chunk
only, and every chunk authenticates the header as associated data. So a chunk cannot be
changed, reordered, replayed from another backup, or dropped from the end (the last chunk
read must carry the flag) without the reader failing; and the header cannot be edited to
send the reader to another key.

The key comes from the master secret (HKDF: a restore needs that secret anyway), or from
a key file (scrypt, so a file holding a passphrase costs an attacker dearly per guess).
"""

from __future__ import annotations

import base64
import hmac
import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import BinaryIO, Final, Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from onetoken.kit.crypto import derive_secret

MAGIC: Final = b"ONETOKEN-BACKUP\n"
#: The org termination export: the same format under its own magic, which every chunk
#: authenticates, so neither file passes for the other.
EXPORT_MAGIC: Final = b"ONETOKEN-EXPORT\n"
_KIND: Final = {MAGIC: "backup", EXPORT_MAGIC: "export"}
FORMAT: Final = 1
CHUNK_BYTES: Final = 1 << 20
_LEN = struct.Struct(">I")
_NONCE_PREFIX_BYTES: Final = 7
_MAX_HEADER_BYTES: Final = 64 * 1024
_TAG_BYTES: Final = 16
_HKDF_INFO: Final = b"onetoken/backup/v1"
_FINGERPRINT_CONTEXT: Final = b"onetoken/backup/secret-fingerprint/v1"
# scrypt at 2**15 takes about 0.1 s and 32 MB: once per backup, dearly per guess.
SCRYPT_N: Final = 1 << 15
SCRYPT_R: Final = 8
SCRYPT_P: Final = 1
MIN_KEY_FILE_BYTES: Final = 16

Kdf = Literal["master", "key-file"]


class BackupFileError(Exception):
    """The file is not a backup, was altered or cut, or the key is not its key."""


def secret_fingerprint(master: bytes) -> str:
    """A one-way mark of the master secret: a restore checks it has the same secret before
    it writes anything (with another one, the restored API keys would not verify and the
    provider credentials would not decrypt)."""
    return derive_secret(master, _FINGERPRINT_CONTEXT).hex()[:32]


@dataclass(frozen=True, slots=True)
class Header:
    kdf: Kdf
    salt: bytes
    nonce_prefix: bytes
    fingerprint: str
    #: What the file is (MAGIC or EXPORT_MAGIC); it starts the file and the associated data.
    magic: bytes = MAGIC
    #: The header's bytes as written: what every chunk authenticates, byte for byte (a
    #: re-encoding would let a changed field the reader ignores go unnoticed).
    raw: bytes = b""

    @property
    def aad(self) -> bytes:
        return self.magic + self.raw

    def encode(self) -> bytes:
        return json.dumps(
            {
                "format": FORMAT,
                "kdf": self.kdf,
                "salt": base64.b64encode(self.salt).decode(),
                "nonce_prefix": base64.b64encode(self.nonce_prefix).decode(),
                "secret_fingerprint": self.fingerprint,
                "cipher": "AES-256-GCM STREAM",
                "chunk_bytes": CHUNK_BYTES,
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def decode(cls, raw: bytes, magic: bytes = MAGIC) -> Header:
        try:
            data = json.loads(raw)
            if data["format"] != FORMAT:
                raise BackupFileError(
                    f"backup format {data['format']!r} is not one this release reads ({FORMAT})"
                )
            kdf = data["kdf"]
            if kdf not in ("master", "key-file"):
                raise BackupFileError("the backup names a key derivation this release lacks")
            header = cls(
                kdf=kdf,
                salt=base64.b64decode(data["salt"], validate=True),
                nonce_prefix=base64.b64decode(data["nonce_prefix"], validate=True),
                fingerprint=str(data["secret_fingerprint"]),
                magic=magic,
                raw=raw,
            )
        except BackupFileError:
            raise
        except (ValueError, KeyError, TypeError) as exc:
            raise BackupFileError("the backup's header is malformed") from exc
        if len(header.nonce_prefix) != _NONCE_PREFIX_BYTES or len(header.salt) < 16:
            raise BackupFileError("the backup's header is malformed")
        return header


def derive_key(header: Header, *, master: bytes | None, key_file: bytes | None) -> bytes:
    """The file key: from the master secret or the key file, as the header says."""
    if header.kdf == "master":
        if master is None:
            raise BackupFileError("this backup is encrypted with the master secret")
        return HKDF(
            algorithm=hashes.SHA256(), length=32, salt=header.salt, info=_HKDF_INFO
        ).derive(master)
    if key_file is None:
        raise BackupFileError("this backup is encrypted with a key file: give --key-file")
    return Scrypt(salt=header.salt, length=32, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P).derive(
        key_file
    )


def read_key_file(raw: bytes) -> bytes:
    """A key file's key: its bytes without the line end an editor or `openssl rand
    -base64` leaves."""
    key = raw.rstrip(b"\r\n")
    if len(key) < MIN_KEY_FILE_BYTES:
        raise BackupFileError(f"a key file must hold at least {MIN_KEY_FILE_BYTES} bytes")
    return key


def new_header(kdf: Kdf, master: bytes, magic: bytes = MAGIC) -> Header:
    header = Header(
        kdf=kdf,
        salt=os.urandom(16),
        nonce_prefix=os.urandom(_NONCE_PREFIX_BYTES),
        fingerprint=secret_fingerprint(master),
        magic=magic,
    )
    return replace(header, raw=header.encode())


def _nonce(prefix: bytes, counter: int, final: bool) -> bytes:
    if counter >= 1 << 32:
        raise BackupFileError("a backup holds at most 2**32 chunks")
    return prefix + struct.pack(">I?", counter, final)


class EncryptingWriter:
    """A write-only binary file that encrypts into `out` chunk by chunk; close() writes
    the last chunk (flagged) and must be called for the file to be readable."""

    def __init__(self, out: BinaryIO, header: Header, key: bytes) -> None:
        self._out = out
        self._aad = header.aad
        self._aead = AESGCM(key)
        self._prefix = header.nonce_prefix
        self._counter = 0
        self._buffer = bytearray()
        self._closed = False
        out.write(header.magic)
        out.write(_LEN.pack(len(header.raw)))
        out.write(header.raw)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self._buffer += data
        while len(self._buffer) > CHUNK_BYTES:
            self._emit(bytes(self._buffer[:CHUNK_BYTES]), final=False)
            del self._buffer[:CHUNK_BYTES]
        return len(data)

    def _emit(self, plain: bytes, *, final: bool) -> None:
        nonce = _nonce(self._prefix, self._counter, final)
        sealed = self._aead.encrypt(nonce, plain, self._aad)
        self._out.write(_LEN.pack(len(sealed)))
        self._out.write(sealed)
        self._counter += 1

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._emit(bytes(self._buffer), final=True)
            self._buffer.clear()

    def flush(self) -> None:
        """Nothing to flush before close: a chunk is sealed once it is full."""


def read_header(src: BinaryIO, magic: bytes = MAGIC) -> Header:
    if src.read(len(magic)) != magic:
        raise BackupFileError(f"not a onetoken {_KIND[magic]} file")
    raw_len = src.read(_LEN.size)
    if len(raw_len) != _LEN.size:
        raise BackupFileError("the backup is cut short")
    (length,) = _LEN.unpack(raw_len)
    if length > _MAX_HEADER_BYTES:
        raise BackupFileError("the backup's header is malformed")
    raw = src.read(length)
    if len(raw) != length:
        raise BackupFileError("the backup is cut short")
    return Header.decode(raw, magic)


def decrypted_chunks(src: BinaryIO, header: Header, key: bytes) -> Iterator[bytes]:
    """The plaintext chunk by chunk, each authenticated before it is yielded; raises
    BackupFileError on a wrong key, an altered chunk, or a file without its last chunk."""
    aead = AESGCM(key)
    aad = header.aad
    counter = 0
    pending = _read_chunk(src)
    if pending is None:
        raise BackupFileError("the backup is cut short")
    while pending is not None:
        following = _read_chunk(src)
        final = following is None
        try:
            plain = aead.decrypt(_nonce(header.nonce_prefix, counter, final), pending, aad)
        except InvalidTag:
            if counter == 0:
                raise BackupFileError(
                    "the backup cannot be decrypted with this key (a different master secret "
                    "or key file?), or it was altered"
                ) from None
            raise BackupFileError("the backup was altered or cut short") from None
        counter += 1
        yield plain
        pending = following


def _read_chunk(src: BinaryIO) -> bytes | None:
    raw_len = src.read(_LEN.size)
    if not raw_len:
        return None
    if len(raw_len) != _LEN.size:
        raise BackupFileError("the backup is cut short")
    (length,) = _LEN.unpack(raw_len)
    if length < _TAG_BYTES or length > CHUNK_BYTES + _TAG_BYTES:
        raise BackupFileError("the backup was altered or cut short")
    sealed = src.read(length)
    if len(sealed) != length:
        raise BackupFileError("the backup is cut short")
    return sealed


class DecryptingReader:
    """A read-only binary file over decrypted_chunks, for tarfile's stream mode."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buffer = b""
        self._done = False

    def read(self, size: int = -1) -> bytes:
        while not self._done and (size < 0 or len(self._buffer) < size):
            try:
                self._buffer += next(self._chunks)
            except StopIteration:
                self._done = True
        if size < 0:
            out, self._buffer = self._buffer, b""
        else:
            out, self._buffer = self._buffer[:size], self._buffer[size:]
        return out

    def drain(self) -> None:
        """Read to the end: the last chunk's flag is checked only there."""
        while self.read(CHUNK_BYTES):
            pass


def fingerprints_match(header: Header, master: bytes) -> bool:
    return hmac.compare_digest(header.fingerprint, secret_fingerprint(master))
