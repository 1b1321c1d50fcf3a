"""The engines' journals in the spool dir, as ingestion sees them (docs/metering.md).

`journal-<instance>-<seg:08>.jsonl` holds one record per line; `journal-<instance>.lock`
is flocked by the engine for its whole life, so an instance is live iff that lock is held.
A segment is complete when a higher one of the same instance exists or the instance is
not live; only complete segments are read to their very end (a torn last line of a dead
instance counts as bad), and only complete segments are ever deleted.

The gateways of a dedicated pool journal into `pools/<pool>/` under the spool dir (one
gateway per spool dir: docs/pools.md); `scan` finds their instances there too.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from onetoken._core import JournalBatch

_SEGMENT = re.compile(r"^journal-([0-9A-Za-z_]+)-(\d+)\.jsonl$")
_LOCK = re.compile(r"^journal-([0-9A-Za-z_]+)\.lock$")
# onetoken.orgs.terms.POOL_NAME: a directory of another name is not a pool's.
_POOL = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")
POOLS_DIR = "pools"


def pool_spool_dir(spool_dir: Path, pool: str) -> Path:
    """Where the gateways of `pool` journal."""
    return spool_dir / POOLS_DIR / pool


def segment_name(instance_id: str, segment: int) -> str:
    return f"journal-{instance_id}-{segment:08d}.jsonl"


def lock_name(instance_id: str) -> str:
    return f"journal-{instance_id}.lock"


@dataclass
class InstanceJournal:
    instance_id: str
    live: bool
    #: Segment numbers on disk, ascending.
    segments: list[int] = field(default_factory=list)
    #: The directory its files are in.
    directory: Path = Path()
    #: The gateway pool whose gateway wrote it; None: a shared gateway.
    pool: str | None = None

    def segment_path(self, segment: int) -> Path:
        return self.directory / segment_name(self.instance_id, segment)

    def lock_path(self) -> Path:
        return self.directory / lock_name(self.instance_id)

    def complete(self, segment: int) -> bool:
        return not self.live or (bool(self.segments) and segment < self.segments[-1])

    def first_from(self, segment: int) -> int | None:
        """The lowest segment on disk at or after `segment`."""
        return next((s for s in self.segments if s >= segment), None)


def instance_live(lock_path: Path) -> bool:
    if not lock_path.exists():
        return False
    from onetoken import _core

    return bool(_core.journal_instance_live(str(lock_path)))


def scan(spool_dir: Path) -> dict[str, InstanceJournal]:
    """Every instance with a segment or a lock file in the spool dir or a pool's."""
    found = _scan_dir(spool_dir, None)
    pools = spool_dir / POOLS_DIR
    if pools.is_dir():
        for name in sorted(os.listdir(pools)):
            if _POOL.fullmatch(name) and (pools / name).is_dir():
                found.update(_scan_dir(pools / name, name))
    return found


def _scan_dir(spool_dir: Path, pool: str | None) -> dict[str, InstanceJournal]:
    if not spool_dir.is_dir():
        return {}
    names = os.listdir(spool_dir)
    instances: dict[str, InstanceJournal] = {}
    # Liveness first, then the listing that decides completeness: an instance that dies
    # in between is taken as live this round (conservative), never the other way round.
    for name in names:
        if (m := _LOCK.match(name)) is not None:
            iid = m[1]
            instances[iid] = InstanceJournal(
                iid, live=instance_live(spool_dir / name), directory=spool_dir, pool=pool
            )
    for name in os.listdir(spool_dir):
        if (m := _SEGMENT.match(name)) is not None:
            iid = m[1]
            journal = instances.get(iid)
            if journal is None:
                # Segments without a lock file (or one created after the first listing,
                # then not yet holding segments we saw): never locked means not live.
                journal = instances[iid] = InstanceJournal(
                    iid,
                    live=instance_live(spool_dir / lock_name(iid)),
                    directory=spool_dir,
                    pool=pool,
                )
            journal.segments.append(int(m[2]))
    for journal in instances.values():
        journal.segments.sort()
    return instances


def read(
    path: Path, offset: int, max_records: int, complete: bool, until: int | None = None
) -> JournalBatch:
    """The records from `offset` (none past `until`), as the engine's reader builds them."""
    from onetoken import _core

    return _core.read_journal_batch(str(path), offset, max_records, complete, until=until)


def remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
