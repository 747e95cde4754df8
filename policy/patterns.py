"""Rule patterns: parsed once, into forms the index can look up by suffix.

The forms are Codex's network-rule forms, so users can carry their rules over:

==========================  =====================================================
``example.com``              exactly that host
``*.example.com``            any subdomain at any depth, not ``example.com`` itself
``**.example.com``           ``example.com`` and every subdomain
``region*.example.com``      ``*`` inside a label matches within that label only
``*``                        every host name (allow lists only; never an IP literal)
``example.com:8443``         any of the above, restricted to one port
``203.0.113.0/24``           IP literals in that network (``2001:db8::/32`` too)
==========================  =====================================================
"""

from __future__ import annotations

import ipaddress
import re
from enum import Enum
from typing import NamedTuple

from .errors import InvalidHost, InvalidPattern
from .hosts import normalize_host_uncached, split_host_port

VALID_FORMS = (
    "valid forms: 'example.com', '*.example.com', '**.example.com', 'region*.example.com', "
    "'*' (allow only), 'example.com:8443', '203.0.113.0/24'"
)
_GLOB_LABEL = re.compile(r"[a-z0-9_*-]+")


class Kind(Enum):
    EXACT = "exact"  # name
    SUBTREE = "subtree"  # strictly below suffix
    SUBTREE_AND_SELF = "subtree_and_self"  # suffix and below
    GLOB = "glob"  # regex over the whole host, indexed by its fixed suffix
    ANY = "any"  # bare '*'
    NETWORK = "network"  # CIDR / IP literal


GlobLabel = str | tuple[str, ...]  # a literal label, or the pieces between its '*'s


class Pattern(NamedTuple):
    """A parsed pattern. ``key`` is what the index files it under."""

    text: str
    kind: Kind
    key: str = ""
    port: int | None = None
    # GLOB only: how many extra leading labels ('' none, '*' one or more, '**' any), and the
    # labels the host must end with, literal or glob.
    lead: str = ""
    labels: tuple[GlobLabel, ...] = ()
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None

    def glob_matches(self, host: str) -> bool:
        host_labels = host.split(".")
        extra = len(host_labels) - len(self.labels)
        if extra < 0 or (extra == 0 and self.lead == "*") or (extra > 0 and not self.lead):
            return False
        return all(_label_matches(glob, label)
                   for glob, label in zip(self.labels, host_labels[extra:], strict=True))


def _label_matches(glob: GlobLabel, label: str) -> bool:
    if isinstance(glob, str):
        return glob == label
    first, *middle, last = glob
    if len(label) < len(first) + len(last) or not label.startswith(first):
        return False
    if not label.endswith(last):
        return False
    position, stop = len(first), len(label) - len(last)
    for piece in middle:
        found = label.find(piece, position, stop)
        if found == -1:
            return False
        position = found + len(piece)
    return True


def _split_port(text: str) -> tuple[str, int | None]:
    if ":" not in text:
        return text, None
    if "/" in text or text.count(":") > 1 and not text.startswith("["):
        return text, None  # CIDR or bare IPv6: no port suffix form
    try:
        return split_host_port(text)
    except InvalidHost as exc:
        raise InvalidPattern(str(exc)) from None


def _network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(text.strip("[]"), strict=True)
    except ValueError as exc:
        hint = ""
        if "host bits set" in str(exc):
            hint = f"; did you mean {ipaddress.ip_network(text, strict=False)}?"
        raise InvalidPattern(f"{text!r} is not a valid CIDR block ({exc}){hint}") from None


def _normal_label(label: str, pattern: str) -> str:
    try:
        host = normalize_host_uncached(label)
    except InvalidHost as exc:
        raise InvalidPattern(f"{pattern!r}: {exc}") from None
    if host.is_ip:
        raise InvalidPattern(f"{pattern!r}: label {label!r} is a number, not a name")
    return host.name


def parse_pattern(text: str, *, allow_any: bool = True) -> Pattern:
    """Parse one rule pattern, raising InvalidPattern with the valid forms on failure."""
    raw = text
    text = text.strip()
    if not text:
        raise InvalidPattern(f"empty pattern; {VALID_FORMS}")
    if text == "*":
        if not allow_any:
            raise InvalidPattern("a bare '*' is allowed in allow lists only")
        return Pattern(raw, Kind.ANY)
    host_text, port = _split_port(text)
    if "/" in host_text:
        return Pattern(raw, Kind.NETWORK, port=port, network=_network(host_text))
    if "*" not in host_text:
        try:
            # Uncached: a large policy would only flush the lookup cache the proxy relies on.
            host = normalize_host_uncached(host_text)
        except InvalidHost as exc:
            raise InvalidPattern(f"{raw!r}: {exc}; {VALID_FORMS}") from None
        if host.ip is not None:
            network = ipaddress.ip_network(host.ip)
            return Pattern(raw, Kind.NETWORK, port=port, network=network)
        return Pattern(raw, Kind.EXACT, key=host.name, port=port)
    return _parse_wildcard(raw, host_text.lower().rstrip("."), port)


def _parse_wildcard(raw: str, text: str, port: int | None) -> Pattern:
    labels = text.split(".")
    lead = labels[0] if labels[0] in ("*", "**") else None
    rest = labels[1:] if lead else labels
    if not rest or "" in rest:
        raise InvalidPattern(f"{raw!r}: empty label; {VALID_FORMS}")
    if any("**" in label for label in rest):
        raise InvalidPattern(f"{raw!r}: '**' is only valid as the whole first label")
    if lead and "*" not in "".join(rest):
        suffix = _normal_label(".".join(rest), raw)
        kind = Kind.SUBTREE if lead == "*" else Kind.SUBTREE_AND_SELF
        return Pattern(raw, kind, key=suffix, port=port)
    # A '*' inside a label: matched label by label, filed under the labels after the last
    # glob so lookup stays O(labels).
    last_glob = max(i for i, label in enumerate(rest) if "*" in label)
    fixed = ".".join(rest[last_glob + 1 :])
    fixed_key = _normal_label(fixed, raw) if fixed else ""
    labels: list[GlobLabel] = []
    for label in rest[: last_glob + 1]:
        if "*" in label:
            if not _GLOB_LABEL.fullmatch(label):
                raise InvalidPattern(
                    f"{raw!r}: label {label!r} may hold letters, digits, '-', '_' and '*' only"
                )
            labels.append(tuple(label.split("*")))
        else:
            labels.append(_normal_label(label, raw))
    if fixed_key:
        labels.extend(fixed_key.split("."))
    return Pattern(raw, Kind.GLOB, key=fixed_key, port=port, lead=lead or "",
                   labels=tuple(labels))
