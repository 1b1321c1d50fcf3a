"""Source address, network and User-Agent family of a control-API request."""

from __future__ import annotations

import ipaddress
import re
from functools import lru_cache
from typing import Protocol

from starlette.requests import Request


class _ProxySettings(Protocol):
    @property
    def trusted_proxies(self) -> str: ...


@lru_cache(maxsize=16)
def _networks(spec: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    out = []
    for part in spec.split(","):
        part = part.strip()
        if part:
            out.append(ipaddress.ip_network(part, strict=False))
    return tuple(out)


def parse_ip(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(value.strip())
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def client_ip(request: Request, settings: object) -> str:
    """The peer address; behind proxies listed in ONETOKEN_TRUSTED_PROXIES, the right-most
    X-Forwarded-For entry that is not one of them. "" when it is not an IP address."""
    peer = request.client.host if request.client else ""
    ip = parse_ip(peer)
    trusted = _networks(str(getattr(settings, "trusted_proxies", "") or ""))
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
