"""The backup file's encryption: a round trip over several chunks, and every way a file
can be wrong (another key, an altered, reordered, cut or extended file, an edited header,
an entry outside the stores) failing before a byte of it is used."""

from __future__ import annotations

import io
import os
import struct
import tarfile
from pathlib import Path

import pytest

from onetoken.backup import archive
from onetoken.backup.snapshot import BackupError
from onetoken.kit import sealed as container
from onetoken.kit.sealed import (
    CHUNK_BYTES,
    MAGIC,
    BackupFileError,
    EncryptingWriter,
    decrypted_chunks,
    derive_key,
    new_header,
    read_header,
    read_key_file,
)
from tests.support import TEST_SECRET

MASTER = TEST_SECRET.encode()
PLANTED = b"backup-unit-planted-6e0c2f9a41"


def _seal(plain: bytes, master: bytes = MASTER, key_file: bytes | None = None) -> bytes:
    header = new_header("key-file" if key_file else "master", master)
    key = derive_key(header, master=master, key_file=key_file)
    out = io.BytesIO()
    writer = EncryptingWriter(out, header, key)
    writer.write(plain)
    writer.close()
    return out.getvalue()


def _open(sealed: bytes, master: bytes = MASTER, key_file: bytes | None = None) -> bytes:
    src = io.BytesIO(sealed)
    header = read_header(src)
    key = derive_key(header, master=master, key_file=key_file)
    return b"".join(decrypted_chunks(src, header, key))


def _chunks(sealed: bytes) -> tuple[bytes, list[bytes]]:
    """(magic, length and header; each chunk with its length prefix)."""
    (length,) = struct.unpack(">I", sealed[len(MAGIC) : len(MAGIC) + 4])
    at = len(MAGIC) + 4 + length
    head, chunks = sealed[:at], []
    while at < len(sealed):
        (n,) = struct.unpack(">I", sealed[at : at + 4])
        chunks.append(sealed[at : at + 4 + n])
        at += 4 + n
    return head, chunks


PLAIN = PLANTED + os.urandom(CHUNK_BYTES * 2) + PLANTED


def test_round_trip_over_several_chunks_holds_no_plaintext() -> None:
    sealed = _seal(PLAIN)
    assert len(_chunks(sealed)[1]) == 3
    assert PLANTED not in sealed
    assert _open(sealed) == PLAIN
    # The header names how the key is derived and the secret's fingerprint, not the secret.
    header = read_header(io.BytesIO(sealed))
    assert header.kdf == "master" and TEST_SECRET.encode() not in sealed
    assert header.fingerprint == container.secret_fingerprint(MASTER)
    assert header.fingerprint != container.secret_fingerprint(b"x" * 40)


def test_another_master_secret_opens_nothing() -> None:
    with pytest.raises(BackupFileError, match="cannot be decrypted with this key"):
        _open(_seal(PLAIN), master=b"another-master-secret-0123456789abcdef")


@pytest.mark.parametrize("how", ["flip", "reorder", "cut", "extend", "empty"])
def test_an_altered_file_fails(how: str) -> None:
    sealed = _seal(PLAIN)
    head, chunks = _chunks(sealed)
    if how == "flip":
        middle = bytearray(chunks[1])
        middle[100] ^= 1
        chunks[1] = bytes(middle)
    elif how == "reorder":
        chunks[0], chunks[1] = chunks[1], chunks[0]
    elif how == "cut":
        # Whole chunks dropped from the end: only the last one carries the final flag.
        chunks = chunks[:-1]
    elif how == "extend":
        chunks.append(chunks[0])
    else:
        chunks = []
    with pytest.raises(BackupFileError):
        _open(head + b"".join(chunks))


def test_an_edited_header_fails() -> None:
    sealed = _seal(PLAIN)
    edited = sealed.replace(b'"chunk_bytes": 1048576', b'"chunk_bytes": 1048577 ')
    edited = edited[: len(MAGIC)] + struct.pack(">I", len(_chunks(sealed)[0]) - len(MAGIC) - 3) \
        + edited[len(MAGIC) + 4 :]
    with pytest.raises(BackupFileError):
        _open(edited)
    with pytest.raises(BackupFileError, match="not a onetoken backup"):
        _open(b"PK\x03\x04" + sealed)


def test_a_key_file_replaces_the_master_secret_for_the_encryption() -> None:
    key_file = read_key_file(b"a passphrase kept in a vault\n")
    assert key_file == b"a passphrase kept in a vault"
    sealed = _seal(PLAIN, key_file=key_file)
    assert read_header(io.BytesIO(sealed)).kdf == "key-file"
    assert _open(sealed, key_file=key_file) == PLAIN
    with pytest.raises(BackupFileError, match="--key-file"):
        _open(sealed)
    with pytest.raises(BackupFileError):
        _open(sealed, key_file=b"another passphrase entirely")
    with pytest.raises(BackupFileError, match="at least"):
        read_key_file(b"short\n")


def _sealed_tar(entries: dict[str, bytes]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return _seal(raw.getvalue())


@pytest.mark.parametrize(
    "name", ["../escape.txt", "/etc/cron.d/x", "spool/journal", "tickets/../../x"]
)
def test_unpack_refuses_entries_outside_the_stores(tmp_path: Path, name: str) -> None:
    src = io.BytesIO(_sealed_tar({"manifest.json": b"{}", name: PLANTED}))
    header = read_header(src)
    with pytest.raises(BackupError):
        archive.unpack(src, header, derive_key(header, master=MASTER, key_file=None), tmp_path)
    assert not (tmp_path.parent / "escape.txt").exists()


def test_unpack_writes_the_stores(tmp_path: Path) -> None:
    src = io.BytesIO(_sealed_tar({"manifest.json": b"{}", "tickets/ab/abcd": PLANTED}))
    header = read_header(src)
    archive.unpack(src, header, derive_key(header, master=MASTER, key_file=None), tmp_path)
    assert (tmp_path / "tickets" / "ab" / "abcd").read_bytes() == PLANTED


def test_an_export_and_a_backup_never_pass_for_each_other() -> None:
    """The termination export uses the same sealing under its own magic, which every
    chunk authenticates: neither file is read as the other."""
    header = container.new_header("master", MASTER, container.EXPORT_MAGIC)
    out = io.BytesIO()
    writer = container.EncryptingWriter(out, header, container.derive_key(
        header, master=MASTER, key_file=None))
    writer.write(b'{"format": "x"}')
    writer.close()
    raw = out.getvalue()
    with pytest.raises(BackupFileError, match="not a onetoken backup"):
        read_header(io.BytesIO(raw))
    # The export's bytes with the backup's magic put in front: the chunks refuse it.
    swapped = io.BytesIO(MAGIC + raw[len(MAGIC):])
    forged = read_header(swapped)
    key = container.derive_key(forged, master=MASTER, key_file=None)
    with pytest.raises(BackupFileError):
        b"".join(container.decrypted_chunks(swapped, forged, key))
    src = io.BytesIO(raw)
    opened = read_header(src, container.EXPORT_MAGIC)
    key = container.derive_key(opened, master=MASTER, key_file=None)
    assert b"".join(container.decrypted_chunks(src, opened, key)) == b'{"format": "x"}'
