"""IP address and network types, and the comma-separated CIDR lists settings hold."""

from __future__ import annotations

import ipaddress

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def networks(spec: str) -> tuple[IpNetwork, ...]:
    """A comma-separated CIDR list (a settings value) as networks; ValueError names the
    first entry that does not parse."""
    out = []
    for part in spec.split(","):
        part = part.strip()
        if part:
            out.append(ipaddress.ip_network(part, strict=False))
    return tuple(out)
