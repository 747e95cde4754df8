"""A policy file as read: its validated model, where it came from, its text, and where in that
text a key sits (for messages that say file:line: key: problem)."""

from __future__ import annotations

import re
from typing import Any, NamedTuple

from .model import PolicyFile

_HEADER = re.compile(r"^\s*\[\s*([^\[\]]+?)\s*\]\s*(?:#.*)?$")
_KEY = re.compile(r"""^\s*(?:"([^"]+)"|'([^']+)'|([A-Za-z0-9_.-]+))\s*=""")


class ParsedFile(NamedTuple):
    """A policy file that validated: its model, where it came from, and its text."""

    model: PolicyFile
    source: str
    text: str

    def explicitly_set(self, table: str, key: str) -> bool:
        section = getattr(self.model, table) if table else self.model
        return key in section.model_fields_set


def locate(text: str, loc: tuple[Any, ...], value: str | None = None) -> int | None:
    """Best-effort line number of a key (and list item) in TOML text; None when unsure."""
    names = [part for part in loc if not isinstance(part, int)]
    table, found = "", None
    for number, line in enumerate(text.splitlines(), start=1):
        header = _HEADER.match(line)
        if header:
            table = header.group(1).replace(" ", "")
            if table == ".".join(names):
                found = number
            continue
        key = _KEY.match(line)
        if key:
            name = next(group for group in key.groups() if group)
            full = f"{table}.{name}" if table else name
            if full == ".".join(names):
                found = number
                break
    if found and value is not None and any(isinstance(part, int) for part in loc):
        quoted = (f'"{value}"', f"'{value}'")
        for number, line in enumerate(text.splitlines()[found - 1:], start=found):
            if any(q in line for q in quoted):
                return number
    return found
