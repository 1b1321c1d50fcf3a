"""Ingestion of the engines' journals into call_log and the ledger (docs/metering.md)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from onetoken.ingest.ingestor import Ingestor

__all__ = ["Ingestor"]


def __getattr__(name: str) -> Any:
    # Lazy: onetoken.db.base imports onetoken.ingest.models while the DB layer that the
    # ingestor needs is still initialising.
    if name == "Ingestor":
        from onetoken.ingest.ingestor import Ingestor

        return Ingestor
    raise AttributeError(name)
