"""Which addresses an upstream may not be: loopback, private, metadata and the like.

Checked after DNS, on every address a name resolves to, and on IP literals. IPv6 forms that
carry an IPv4 address (IPv4-mapped, SIIT's IPv4-translated, IPv4-compatible, NAT64 and local-use
NAT64, 6to4, Teredo) are judged by the IPv4 address they reach, so ``[::ffff:169.254.169.254]``
is as blocked as the plain form.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from functools import lru_cache

from .hosts import IPAddress

_V4 = ipaddress.IPv4Network
_V6 = ipaddress.IPv6Network

_BLOCKED_V4: tuple[tuple[ipaddress.IPv4Network, str], ...] = (
    (_V4("169.254.169.254/32"), "link-local (cloud metadata service)"),
    (_V4("0.0.0.0/8"), "unspecified"),
    (_V4("127.0.0.0/8"), "loopback"),
    (_V4("10.0.0.0/8"), "private (RFC 1918)"),
    (_V4("172.16.0.0/12"), "private (RFC 1918)"),
    (_V4("192.168.0.0/16"), "private (RFC 1918)"),
    (_V4("100.64.0.0/10"), "shared address space (RFC 6598)"),
    (_V4("169.254.0.0/16"), "link-local"),
    (_V4("224.0.0.0/4"), "multicast"),
    (_V4("255.255.255.255/32"), "broadcast"),
    (_V4("240.0.0.0/4"), "reserved"),
    (_V4("192.0.0.0/24"), "IETF protocol assignments"),
    (_V4("198.18.0.0/15"), "benchmarking"),
)
_BLOCKED_V6: tuple[tuple[ipaddress.IPv6Network, str], ...] = (
    (_V6("::/128"), "unspecified"),
    (_V6("::1/128"), "loopback"),
    (_V6("fc00::/7"), "unique local (IPv6 ULA)"),
    (_V6("fe80::/10"), "link-local"),
    (_V6("fec0::/10"), "site-local (deprecated)"),
    (_V6("ff00::/8"), "multicast"),
    (_V6("100::/64"), "discard-only"),
)
_NAT64 = _V6("64:ff9b::/96")
# RFC 8215: an operator's own translator. The /96 layout (address in the last 32 bits) is the
# one in use; whatever it carries, the prefix itself is never a public upstream.
_LOCAL_NAT64 = _V6("64:ff9b:1::/48")
_IPV4_TRANSLATED = _V6("::ffff:0:0:0/96")  # SIIT (RFC 7915)
_IPV4_COMPATIBLE = _V6("::/96")
_SIX_TO_FOUR = _V6("2002::/16")


def embedded_ipv4(ip: ipaddress.IPv6Address) -> tuple[str, ipaddress.IPv4Address] | None:
    """The IPv4 address an IPv6 address reaches through a translation mechanism, if any."""
    if ip.ipv4_mapped is not None:
        return "IPv4-mapped", ip.ipv4_mapped
    if ip in _IPV4_TRANSLATED:
        return "IPv4-translated", ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip in _NAT64:
        return "NAT64", ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip in _LOCAL_NAT64:
        return "local-use NAT64", ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip in _IPV4_COMPATIBLE and int(ip) > 1:
        return "IPv4-compatible", ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip in _SIX_TO_FOUR:
        return "6to4", ipaddress.IPv4Address((int(ip) >> 80) & 0xFFFFFFFF)
    if ip.teredo is not None:
        return "Teredo", ip.teredo[1]
    return None


@lru_cache(maxsize=16384)
def non_public_reason(ip: IPAddress) -> str | None:
    """Why an address is not a public upstream, or None when it is one."""
    if isinstance(ip, ipaddress.IPv4Address):
        for network, reason in _BLOCKED_V4:
            if ip in network:
                return reason
        return None if ip.is_global else "reserved"
    embedded = embedded_ipv4(ip)
    if embedded is not None:
        form, ip4 = embedded
        inner = non_public_reason(ip4)
        if inner:
            return f"{form} form of a {inner} address"
        return "local-use NAT64" if ip in _LOCAL_NAT64 else None
    for network, reason in _BLOCKED_V6:
        if ip in network:
            return reason
    return None if ip.is_global else "reserved"


def in_networks(
    ip: IPAddress, networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]
) -> bool:
    """Membership that also sees through IPv4-mapped IPv6 (the same destination)."""
    candidates: list[IPAddress] = [ip]
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        candidates.append(ip.ipv4_mapped)
    return any(c.version == n.version and c in n for c in candidates for n in networks)
