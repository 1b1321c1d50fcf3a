"""Incident handling over the security log: acknowledge, assign, annotate and resolve
security events, grouped into incidents, with an append-only history (docs/operations.md)."""
