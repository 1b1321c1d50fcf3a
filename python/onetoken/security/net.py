"""Addresses: the source address, network and User-Agent family of a control-API request,
and which network addresses outgoing connections (webhooks, tenants' providers) may reach."""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable, Sequence
from functools import lru_cache
from urllib.parse import urlsplit

from starlette.requests import Request

from onetoken import _core
from onetoken.kit.net import IpAddress, IpNetwork, networks

# A name resolver: (host, port) -> the addresses it resolves to, as text. Raises OSError
# when the name does not resolve. Tests inject stubs; the default asks the system.
Resolver = Callable[[str, int], Sequence[str]]


@lru_cache(maxsize=16)
def parse_ip(value: str) -> IpAddress | None:
    try:
        ip = ipaddress.ip_address(value.strip())
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def client_ip(request: Request, settings: object) -> str:
    """The peer address; behind proxies listed in ONETOKEN_TRUSTED_PROXIES, the right-most
    X-Forwarded-For entry that is not one of them. "" when it is not an IP address.

    uvicorn runs with its own proxy-header handling off (onetoken.serve), so the peer is
    the TCP peer and this is the only place forwarding headers are believed."""
    peer = request.client.host if request.client else ""
    ip = parse_ip(peer)
    trusted = networks(str(getattr(settings, "trusted_proxies", "") or ""))
    if ip is not None and trusted and any(ip in n for n in trusted):
        forwarded = request.headers.get("x-forwarded-for", "")
        for hop in reversed([h for h in forwarded.split(",") if h.strip()]):
            hop_ip = parse_ip(hop)
            if hop_ip is None:
                break
            ip = hop_ip
            if not any(hop_ip in n for n in trusted):
                break
    return str(ip) if ip is not None else ""


# -- outgoing connections ------------------------------------------------------------------

def is_public(ip: IpAddress) -> bool:
    """Whether `ip` is a globally routable unicast address: not loopback, private (RFC 1918,
    ULA, site-local), link-local (the 169.254.169.254 metadata address among them), CGNAT
    (100.64/10), multicast, unspecified, broadcast, documentation or otherwise reserved;
    IPv6 forms that carry an IPv4 address (mapped, 6to4, NAT64) are judged by that address.
    The engine's own rule, so that what a tenant may save is what the gateway may reach."""
    return _core.address_is_public(str(ip))


def target_allowed(ip: IpAddress, allow: Sequence[IpNetwork]) -> bool:
    """A public address, or one inside the operator's allow-list `allow`."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return is_public(ip) or any(ip in net for net in allow)


class AddressRefused(Exception):
    """A target host is, or resolves to, an address outside the public internet and the
    allow-list. Carries no address: messages built from it never echo a tenant's URL."""


def system_resolver(host: str, port: int) -> list[str]:
    return [str(info[4][0]) for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]


def resolve_checked(
    host: str, port: int, allow: Sequence[IpNetwork], resolver: Resolver | None = None
) -> list[IpAddress]:
    """Every address `host` resolves to, resolved once, each one checked: AddressRefused
    when any is not allowed (a client could pick any of them), OSError when the name does
    not resolve. Connect only to what this returns, so that DNS cannot answer differently
    between the check and the connect."""
    literal = parse_ip(host.strip("[]"))
    if literal is not None:
        found: list[IpAddress] = [literal]
    else:
        answers = (resolver or system_resolver)(host, port)
        found = []
        for text in answers:
            ip = parse_ip(text)
            if ip is None:
                raise AddressRefused  # a scoped or malformed answer: nothing to judge
            if ip not in found:
                found.append(ip)
        if not found:
            raise OSError(f"no address for {host}")
    if not all(target_allowed(ip, allow) for ip in found):
        raise AddressRefused
    return found


def url_target_refused(
    url: str, allow: Sequence[IpNetwork], resolver: Resolver | None = None
) -> bool:
    """At save time: whether the URL's host is, or now resolves to, an address that is
    not allowed. A name that does not resolve now is not refused here: every connect
    checks again (webhook delivery, the engine's upstream connector)."""
    parts = urlsplit(url.strip())
    host = parts.hostname or ""
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        resolve_checked(host, port, allow, resolver)
    except AddressRefused:
        return True
    except (OSError, ValueError, UnicodeError):
        return False
    return False


def network_of(ip: str) -> str:
    """The /24 (IPv4) or /64 (IPv6) a source address belongs to; "" when unknown."""
    parsed = parse_ip(ip)
    if parsed is None:
        return ""
    prefix = 24 if parsed.version == 4 else 64
    return str(ipaddress.ip_network(f"{parsed}/{prefix}", strict=False))


# Checked in order: Edge and Opera announce Chrome too, Chrome announces Safari.
_UA_FAMILIES: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (name, re.compile(pattern, re.IGNORECASE))
    for name, pattern in (
        ("edge", r"\bEdg(e|A|iOS)?/"),
        ("opera", r"\bOPR/|\bOpera\b"),
        ("firefox", r"\bFirefox/"),
        ("chrome", r"\bChrome/|\bCriOS/"),
        ("safari", r"\bSafari/"),
        ("curl", r"^curl/"),
        ("python-httpx", r"^python-httpx/"),
        ("python-requests", r"^python-requests/"),
        ("openai-python", r"^OpenAI/Python"),
        ("go-http-client", r"^Go-http-client/"),
        ("okhttp", r"^okhttp/"),
        ("postman", r"^PostmanRuntime/"),
        ("node", r"^node-fetch|^axios/|^undici"),
        ("java", r"^Java/|^Apache-HttpClient/"),
        ("testclient", r"^testclient$"),
    )
)


def ua_family(user_agent: str) -> str:
    """A fixed, low-cardinality family name for a User-Agent ("other" / "none")."""
    if not user_agent:
        return "none"
    for name, pattern in _UA_FAMILIES:
        if pattern.search(user_agent):
            return name
    return "other"
