"""`<data_dir>/control.json`: where the control process serving a data dir listens, and
where its gateway child serves (and its metrics listener) once it is ready.

The control process writes it at start (mode 0600: it names a local endpoint of the
service, nothing secret, but the data dir's files are private) and removes it at stop. CLI
commands read it before falling back to ONETOKEN_CONTROL_LISTEN, so they reach a server
started with a different listen address or port 0; scripts and tests read the gateway's
address there the same way.

Standard library only: the CLI reads it before anything heavy is imported.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

CONTROL_FILE: Final = "control.json"


@dataclass(frozen=True, slots=True)
class ControlEndpoint:
    url: str
    pid: int
    gateway: str | None = None
    metrics: str | None = None


def path(data_dir: Path) -> Path:
    return Path(data_dir) / CONTROL_FILE


def write(data_dir: Path, endpoint: ControlEndpoint) -> None:
    """Write the file whole (temp file, then rename), 0600 whatever the umask. The
    endpoint's `gateway` and `metrics` (the gateway child's URL and its metrics
    listener's) are written again once the child reports its bound addresses."""
    target = path(data_dir)
    tmp = target.with_name(f".{CONTROL_FILE}.{endpoint.pid}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        found = {k: v for k, v in dataclasses.asdict(endpoint).items() if v is not None}
        os.write(fd, json.dumps(found).encode())
    finally:
        os.close(fd)
    os.replace(tmp, target)


def remove(data_dir: Path, pid: int) -> None:
    """Remove the file if it is still this process's (a newer server may have replaced it)."""
    found = _load(path(data_dir))
    if found is not None and found.pid == pid:
        with contextlib.suppress(FileNotFoundError):
            path(data_dir).unlink()


def read(data_dir: Path) -> ControlEndpoint | None:
    """The endpoint of the control process serving `data_dir`, None when there is no file
    or the process that wrote it is gone (killed before it could remove it)."""
    found = _load(path(data_dir))
    if found is None or not _alive(found.pid):
        return None
    return found


def _load(file: Path) -> ControlEndpoint | None:
    try:
        data = json.loads(file.read_text())
        url, pid = data["url"], data["pid"]
        gateway, metrics = data.get("gateway"), data.get("metrics")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if not isinstance(url, str) or not isinstance(pid, int) or isinstance(pid, bool):
        return None
    if any(v is not None and not isinstance(v, str) for v in (gateway, metrics)):
        return None
    return ControlEndpoint(url=url, pid=pid, gateway=gateway, metrics=metrics)


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
