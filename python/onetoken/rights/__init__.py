"""Users' rights: see, correct, export and erase one's own data; retention of every
record kind (docs/retention.md)."""
