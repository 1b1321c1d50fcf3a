"""A staging directory into one encrypted backup file, and back."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Final

from onetoken.backup.snapshot import CLICKHOUSE, CONTROL_DB, MANIFEST, TICKETS, BackupError
from onetoken.kit.files import PRIVATE_FILE_MODE
from onetoken.kit.sealed import (
    DecryptingReader,
    EncryptingWriter,
    Header,
    decrypted_chunks,
)

_TOP_LEVEL: Final = frozenset({MANIFEST, CONTROL_DB, CLICKHOUSE, TICKETS})


def _anonymous(info: tarfile.TarInfo) -> tarfile.TarInfo:
    # The service's user and group names are none of the backup's business.
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def write_backup(staging: Path, out: Path, header: Header, key: bytes) -> int:
    """Encrypt the staging directory into `out` (0600, written aside and renamed, so a
    failed backup leaves no file that looks whole); returns its size in bytes."""
    partial = out.with_name(f".{out.name}.partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as handle:
            writer = EncryptingWriter(handle, header, key)
            # Stream mode: the plaintext exists only chunk by chunk, in memory.
            with tarfile.open(  # type: ignore[call-overload]
                fileobj=writer, mode="w|", format=tarfile.PAX_FORMAT
            ) as tar:
                tar.add(staging / MANIFEST, arcname=MANIFEST, filter=_anonymous)
                for name in (CONTROL_DB, CLICKHOUSE, TICKETS):
                    if (staging / name).exists():
                        tar.add(staging / name, arcname=name, filter=_anonymous)
            writer.close()
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, out)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return out.stat().st_size


def unpack(handle: BinaryIO, header: Header, key: bytes, dest: Path) -> None:
    """Decrypt the rest of `handle` (just past its header) into `dest`, an empty staging
    directory. Every chunk is authenticated before its bytes are used, and the whole file
    before this returns: a wrong key, an altered or a cut file raises BackupFileError."""
    reader = DecryptingReader(decrypted_chunks(handle, header, key))
    with tarfile.open(fileobj=reader, mode="r|") as tar:  # type: ignore[call-overload]
        for member in tar:
            _check_member(member)
            tar.extract(member, dest, filter="data")
    reader.drain()


def _check_member(member: tarfile.TarInfo) -> None:
    path = PurePosixPath(member.name)
    if (
        path.is_absolute()
        or ".." in path.parts
        or not path.parts
        or path.parts[0] not in _TOP_LEVEL
        or not (member.isfile() or member.isdir())
    ):
        raise BackupError("the backup holds an entry a onetoken backup never has")
