"""A name resolver for tests: what each stub name resolves to. Refusals happen on these
answers, before any connect, so nothing is ever sent to the addresses named here."""

from __future__ import annotations

STUB_DNS: dict[str, list[str]] = {
    "private.example.test": ["10.0.0.1"],
    "metadata.example.test": ["169.254.169.254"],
    "cgnat.example.test": ["100.64.0.1"],
    "mapped.example.test": ["::ffff:127.0.0.1"],
    "ula.example.test": ["fd00:ec2::254"],
    "loopback.example.test": ["127.0.0.1"],
    "mixed.example.test": ["93.184.216.34", "10.0.0.1"],
    "public.example.test": ["93.184.216.34"],
}


def stub_resolver(host: str, port: int) -> list[str]:
    if host not in STUB_DNS:
        raise OSError("stub: no such name")
    return STUB_DNS[host]
