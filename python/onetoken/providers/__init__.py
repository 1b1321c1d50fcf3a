"""Upstream providers (credentials encrypted at rest, never returned) and priced models."""
