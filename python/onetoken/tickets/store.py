"""Where attachment bytes live: an interface an object store can implement, and the file
store under the data dir that implements it by default.

An implementation stores opaque bytes under keys it makes up itself (random, never derived
from anything a user sent), returns them by key and deletes them. It is never asked to
list, so an object store (S3, GCS, Azure Blob: `put` to `<prefix>/<key>`, `get`, `delete`)
fits it as is; set it with `tickets.store.install`. Nothing here writes to ClickHouse.
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path
from typing import Protocol

from onetoken.kit.files import PRIVATE_FILE_MODE, private_dir

_KEY_RE = re.compile(r"^[0-9a-f]{32}$")


class AttachmentStore(Protocol):
    def put(self, data: bytes) -> str:
        """Store `data`; returns the new key (at most 64 characters)."""

    def get(self, key: str) -> bytes:
        """The bytes stored under `key` (KeyError when there are none)."""

    def delete(self, key: str) -> None:
        """Forget `key`; a missing key is not an error (purges may repeat)."""


class FileStore:
    """One private file per attachment: `<root>/<key[:2]>/<key>`, mode 0600."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        if not _KEY_RE.match(key):
            raise KeyError("not a key of this store")
        return self.root / key[:2] / key

    def put(self, data: bytes) -> str:
        key = secrets.token_hex(16)
        path = self._path(key)
        private_dir(path.parent)
        # Written aside and renamed: a reader never sees half a file.
        partial = path.with_name(key + ".partial")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(partial, path)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        return key

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise KeyError("no such attachment") from None

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink(missing_ok=True)
        except KeyError:
            return


_installed: AttachmentStore | None = None


def install(store: AttachmentStore | None) -> None:
    """Use `store` (e.g. an object store) instead of files under the data dir."""
    global _installed
    _installed = store


def open_store(root: Path) -> AttachmentStore:
    """The installed store, else the file store at `root` (Settings.ticket_store_dir)."""
    return _installed if _installed is not None else FileStore(root)
