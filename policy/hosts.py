"""Host normalisation: one canonical spelling per destination.

Every host the proxy sees (CONNECT target, absolute URL, Host header, TLS SNI) and every rule
pattern goes through here, so a destination cannot dodge a rule by being spelled differently:
case, a trailing dot, Unicode vs punycode, full-width digits, or one of the many legacy
spellings of an IPv4 address (``127.1``, ``0x7f.1``, ``2130706433``, ``0177.0.0.1``).
"""

from __future__ import annotations

import ipaddress
import re
from functools import lru_cache
from typing import NamedTuple

from .errors import InvalidHost

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_NAME_CHARACTERS = str.maketrans("", "", "abcdefghijklmnopqrstuvwxyz0123456789-_.")
_HEX_NUMBER = re.compile(r"0[xX][0-9a-fA-F]*")


class Host(NamedTuple):
    """A normalised destination: a domain name in punycode, or an IP address."""

    name: str
    ip: IPAddress | None = None

    @property
    def is_ip(self) -> bool:
        return self.ip is not None

    def __str__(self) -> str:
        return self.name


def _ends_in_number(host: str) -> bool:
    """WHATWG URL "ends in a number": such a host is parsed as IPv4 or rejected."""
    last = host.rpartition(".")[2]
    return (last.isascii() and last.isdigit()) or (
        last[:1] == "0" and bool(_HEX_NUMBER.fullmatch(last)))


def _parse_ipv4_number(part: str) -> int:
    if not part:
        raise InvalidHost("empty part in an IPv4 address")
    if part[:2] in ("0x", "0X"):
        digits, base = part[2:], 16
    elif len(part) > 1 and part[0] == "0":
        digits, base = part[1:], 8
    else:
        digits, base = part, 10
    if not digits:
        return 0
    try:
        return int(digits, base)
    except ValueError:
        raise InvalidHost(f"{part!r} is not a number in an IPv4 address") from None


def parse_ipv4(host: str) -> ipaddress.IPv4Address:
    """Parse any IPv4 spelling a browser or libc would accept (WHATWG IPv4 parser)."""
    parts = host.split(".")
    if parts and parts[-1] == "" and len(parts) > 1:
        parts.pop()
    if len(parts) > 4:
        raise InvalidHost(f"{host!r} has more than four parts but ends in a number")
    numbers = [_parse_ipv4_number(part) for part in parts]
    if any(n > 255 for n in numbers[:-1]) or numbers[-1] >= 256 ** (5 - len(numbers)):
        raise InvalidHost(f"{host!r} is out of range for an IPv4 address")
    value = numbers[-1]
    for index, number in enumerate(numbers[:-1]):
        value += number * 256 ** (3 - index)
    return ipaddress.IPv4Address(value)


def _idna_encode(host: str) -> str:
    import idna  # its UTS-46 tables cost ~3 MiB: loaded only for names that need them

    try:
        return idna.encode(host, uts46=True, transitional=False).decode("ascii")
    except (idna.IDNAError, UnicodeError) as exc:
        raise InvalidHost(f"{host!r} is not a valid internationalised host name: {exc}") from None


def _is_valid_ascii_name(host: str) -> bool:
    """Letters, digits, '-', '_'; labels of 1-63 characters not starting or ending in '-'."""
    if len(host) > 253 or host.translate(_NAME_CHARACTERS):
        return False
    if host[0] == "-" or host[-1] == "-" or ".-" in host or "-." in host:
        return False
    return len(host) <= 63 or max(map(len, host.split("."))) <= 63


# A name is at most 253 characters; brackets, an IPv6 zone and a port fit within this too.
MAX_HOST_TEXT = 300


def normalize_host(raw: str) -> Host:
    """Return the canonical form of a host, or raise InvalidHost (cached per spelling).

    Longer text is refused before the cache: its keys come from the agent, and 65536 of them
    must not be allowed to hold megabytes each.
    """
    if len(raw) > MAX_HOST_TEXT:
        raise InvalidHost(f"a host of {len(raw)} characters (a name has at most 253)")
    return _normalize_cached(raw)


def normalize_host_uncached(raw: str) -> Host:
    """normalize_host without its cache: for policy compilation and benchmarks.

    Domain names come back lower-case, in punycode, without the trailing dot. Anything that looks
    like an IP address in any spelling comes back as an IP (IPv4-mapped IPv6 stays IPv6: the
    caller decides what it embeds). Only spaces and tabs around the host are ignored.
    """
    if len(raw) > MAX_HOST_TEXT:
        raise InvalidHost(f"a host of {len(raw)} characters (a name has at most 253)")
    host = raw.strip(" \t")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if ":" not in host:
            raise InvalidHost(f"{raw!r}: brackets are only for IPv6 addresses")
    if not host:
        raise InvalidHost("empty host")
    if ":" in host:
        try:
            ip6 = ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            raise InvalidHost(f"{raw!r} is not a valid IPv6 address") from None
        return Host(str(ip6), ip6)
    if not host.isascii():
        # UTS-46 maps full-width digits and ideographic full stops to ASCII, so the IPv4 check
        # below must see the mapped form.
        host = _idna_encode(host)
    host = host.lower()
    if host.endswith("."):
        host = host[:-1]
    if not host or host.endswith(".") or ".." in host:
        raise InvalidHost(f"{raw!r} has an empty label")
    if _ends_in_number(host):
        ip4 = parse_ipv4(host)
        return Host(str(ip4), ip4)
    if not _is_valid_ascii_name(host):
        raise InvalidHost(
            f"{raw!r} is not a valid host name (letters, digits, '-', '_' and dots only, "
            "labels of at most 63 characters)"
        )
    if "xn--" in host:
        # A punycode label must decode, or two spellings could name one host.
        import idna

        try:
            host = _idna_encode(idna.decode(host))
        except (idna.IDNAError, UnicodeError) as exc:
            raise InvalidHost(f"{raw!r} has an invalid punycode label: {exc}") from None
    return Host(host)


_normalize_cached = lru_cache(maxsize=65536)(normalize_host_uncached)


def split_host_port(target: str, default_port: int | None = None) -> tuple[str, int | None]:
    """Split ``host:port`` / ``[v6]:port`` / ``host``; the port must be 1-65535."""
    if target.startswith("["):
        end = target.find("]")
        if end == -1:
            raise InvalidHost(f"{target!r}: missing ']' after the IPv6 address")
        host, rest = target[: end + 1], target[end + 1 :]
        if rest and not rest.startswith(":"):
            raise InvalidHost(f"{target!r}: unexpected text after ']'")
        port_text = rest[1:] if rest else None
    elif target.count(":") == 1:
        host, port_text = target.split(":")
    else:
        host, port_text = target, None
    if port_text is None:
        return host, default_port
    # ASCII digits only: str.isdigit() also accepts '²' and '٤', which int() then refuses
    # or reads as another number.
    if not (port_text.isascii() and port_text.isdigit()) or not 1 <= int(port_text) <= 65535:
        raise InvalidHost(f"{target!r}: port must be a number from 1 to 65535")
    return host, int(port_text)
