"""A policy file as read: its validated model, where it came from, its text, and where in that
text a key sits (for messages that say file:line: key: problem)."""

from __future__ import annotations

import re
from typing import Any, NamedTuple

from .model import PolicyFile

_HEADER = re.compile(r"^\s*\[\s*([^\[\]]+?)\s*\]\s*(?:#.*)?$")
_ARRAY_HEADER = re.compile(r"^\s*\[\[\s*([^\[\]]+?)\s*\]\]\s*(?:#.*)?$")
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
    if (in_array := _locate_in_array_table(text, loc, value)) is not None:
        return in_array
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


def _locate_in_array_table(text: str, loc: tuple[Any, ...], value: str | None) -> int | None:
    """A key inside the Nth [[table]] (like network.requests[2].paths), or None."""
    cut = next((i for i, part in enumerate(loc) if isinstance(part, int)), None)
    if cut is None:
        return None
    lines = text.splitlines()
    array = ".".join(str(part) for part in loc[:cut])
    starts = [number for number, line in enumerate(lines, start=1)
              if (m := _ARRAY_HEADER.match(line)) and m.group(1).replace(" ", "") == array]
    if loc[cut] >= len(starts):
        return None
    start = starts[loc[cut]]
    rest = loc[cut + 1:]
    if not rest:
        return start
    for number in range(start + 1, len(lines) + 1):
        line = lines[number - 1]
        if line.lstrip().startswith("["):
            break
        key = _KEY.match(line)
        if key and next(group for group in key.groups() if group) == rest[0]:
            if value is not None and len(rest) > 1:
                quoted = (f'"{value}"', f"'{value}'")
                return next((n for n in range(number, len(lines) + 1)
                             if any(q in lines[n - 1] for q in quoted)), number)
            return number
    return start
