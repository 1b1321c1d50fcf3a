"""API keys: created once, shown once, stored as a keyed hash and a display id."""
