"""Ingestion of the engines' journals into call_log and the ledger (docs/metering.md)."""
