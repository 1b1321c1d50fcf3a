"""Restriction of processing (policy section XIII.4): the client's address and User-Agent
as the records of a restricted account or org keep them.

The engine builds its call records the same way (rust/gateway/src/restrict.rs); both
must give the same token for the same address, so a source seen in the control API's
security events and in call_log is still one source. The address becomes `hmac:` and the
first 64 bits of HMAC-SHA256 under a secret derived from the key-hash secret (the same
address, the same token: floods and key risks still correlate, the address cannot be read
back); the User-Agent keeps its product token (`OpenAI/Python 1.54.0 (...)` -> `OpenAI`).
What the login guard compares between sign-ins (the /24 or /64 network, the User-Agent
family) is worked out from the clear values in memory, the network kept as a token too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from onetoken.kit.crypto import Secrets, derive_secret, keyed_hash
from onetoken.security.net import network_of, parse_ip, ua_family

#: Context of the restriction secret under the key-hash secret (restrict.rs: CONTEXT).
CONTEXT = b"onetoken client restriction v1"
#: What a restricted address starts with (not an address: nothing parses it as one).
RESTRICTED_ADDRESS_PREFIX = "hmac:"
_MAX_PRODUCT = 32
_PRODUCT_END = re.compile(r"[/ (\t]")
_PRODUCT_CHARS = re.compile(r"[^A-Za-z0-9._+-]")


def secret(secrets: Secrets) -> bytes:
    return derive_secret(secrets.key_hash, CONTEXT)


def ip_token(key: bytes, ip: str) -> str:
    """The keyed token of an address ("" stays ""). An IPv4-mapped IPv6 address is its
    IPv4 address, as in the engine."""
    if not ip:
        return ""
    parsed = parse_ip(ip)
    text = str(parsed) if parsed is not None else ip
    return RESTRICTED_ADDRESS_PREFIX + keyed_hash(key, text)[:16]


def product(user_agent: str) -> str:
    """The product token of a User-Agent: up to the first `/`, space or `(`, only the
    characters product names are made of, at most 32."""
    head = _PRODUCT_END.split(user_agent, maxsplit=1)[0]
    return _PRODUCT_CHARS.sub("", head)[:_MAX_PRODUCT]


@dataclass(frozen=True, slots=True)
class Client:
    """A control-API request's client as records may keep it."""

    source_ip: str
    user_agent: str
    #: The sign-in network the login guard compares (a token when restricted).
    network: str
    #: The User-Agent family (low cardinality, identifies no one).
    family: str


def client(key: bytes, source_ip: str, user_agent: str, *, restricted: bool) -> Client:
    network = network_of(source_ip)
    family = ua_family(user_agent)
    if not restricted:
        return Client(source_ip, user_agent, network, family)
    return Client(
        ip_token(key, source_ip),
        product(user_agent),
        ip_token(key, network) if network else "",
        family,
    )
