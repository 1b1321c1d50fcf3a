"""Balances and the ledger: integer nano-units, idempotent entries."""
