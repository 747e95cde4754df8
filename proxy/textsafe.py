"""Agent-chosen text (agent names, hosts, paths, SNI) shown to people as data, never as control.

Whoever controls an agent chooses the text that ends up on an approver's terminal, in a report
or in a spreadsheet. Escape sequences could redraw the terminal, carriage returns and bidi
controls could make one request look like another, and a leading `=` runs a spreadsheet
formula. These helpers make such text inert and visible.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

# Control (Cc: C0, DEL, C1), format (Cf: bidi controls and marks, zero-width and tag
# characters), lone surrogates (Cs: unprintable), line/paragraph separators, and unassigned
# code points (Cn: may be format characters to a terminal that knows a newer Unicode).
# Spaces other than the ASCII one (Zs: no-break, em, ideographic...) are escaped too: they can
# pad a line until the real text is off screen, or pass for the separators of our own output.
_HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp", "Zs", "Cn"})
_SUSPECT = re.compile(r"[^ -\[\]-~]")  # anything but printable ASCII without the backslash
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


@lru_cache(maxsize=4096)  # bounded: a flood of distinct characters must not grow memory
def _shown(char: str) -> str:
    if char == "\\":
        return "\\\\"  # so that a literal "\x1b" can never pass for an escaped ESC
    if unicodedata.category(char) not in _HIDDEN_CATEGORIES:
        return char
    code = ord(char)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def _replace(match: re.Match[str]) -> str:
    return _shown(match.group())


def printable(text: object) -> str:
    """The text with every control, format and invisible character (and the backslash)
    escaped as \\xNN, \\uNNNN or \\UNNNNNNNN; letters of every script unchanged."""
    return _SUSPECT.sub(_replace, str(text))


def shortened(text: object, limit: int = 60) -> str:
    """printable(), cut to about `limit` characters with a marker: agent text in a one-line
    summary must not push the proxy's own words off the screen."""
    text = str(text)
    return printable(text) if len(text) <= limit else printable(text[:limit]) + "...(cut)"


def printable_lines(text: object) -> str:
    """Multi-line text (an error listing problems) with its own line breaks kept and every
    line escaped with printable()."""
    return "\n".join(printable(line) for line in str(text).split("\n"))


def host_display(host: str, port: object = None) -> str:
    """An internationalised host as punycode with its Unicode form beside it, both escaped.

    The punycode is what the policy matches; the Unicode form is what a homograph imitates
    (`xn--80ak6aa92e.com (аррӏе.com)`), so a person sees both. With a port: `HOST:PORT (...)`.
    """
    shown = printable(host) + ("" if port is None else f":{printable(port)}")
    if "xn--" not in host.lower():
        return shown
    unicode_form = ".".join(_decoded(label) for label in host.split("."))
    if unicode_form == host:
        return shown
    return f"{shown} ({printable(unicode_form)})"


def _decoded(label: str) -> str:
    """A punycode label's Unicode form; any other label, or one that does not decode, as is."""
    if label[:4].lower() != "xn--":
        return label
    import idna  # only for the rare internationalised host

    try:
        return idna.decode(label)
    except (idna.IDNAError, UnicodeError):
        return label


def csv_cell(value: object) -> str:
    """A CSV cell a spreadsheet shows as text: one that could start a formula gets a leading
    quote (OWASP CSV injection)."""
    text = str(value)
    if text.startswith(_FORMULA_START):
        return "'" + text
    return text


_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]<>|&~])")


def markdown_text(text: object) -> str:
    """Shown as typed by any CommonMark renderer: no links, HTML, entities, code or cells."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", printable(text))
