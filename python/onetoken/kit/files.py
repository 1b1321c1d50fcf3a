"""Private files: everything under the data dir is readable by the service's user only.

The data dir holds key hashes, encrypted credentials, call records with source addresses
and the journal of records not yet stored; the process umask (often 022) must not decide
who can read them. Directories are 0700 and files 0600; existing ones are tightened on
start, so a deployment created by an older version is fixed too.
"""

from __future__ import annotations

import os
from pathlib import Path

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
# For files third-party code creates in the data dir (chDB's tables, SQLite's journals):
# no group or other bits, whatever umask the process was started with.
PRIVATE_UMASK = 0o077


def private_dir(path: Path) -> Path:
    """Create `path` (and missing parents) as 0700, or tighten it when it exists."""
    path.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    os.chmod(path, PRIVATE_DIR_MODE)
    return path


def private_file(path: Path) -> Path:
    """Create `path` empty as 0600 when missing, or tighten it when it exists (so a
    library that opens it later never creates it with the umask's mode)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, PRIVATE_FILE_MODE)
    try:
        os.fchmod(fd, PRIVATE_FILE_MODE)
    finally:
        os.close(fd)
    return path


def restrict_umask() -> None:
    """Make the rest of this process create private files (the server process: chDB
    writes its tables itself)."""
    os.umask(PRIVATE_UMASK)
