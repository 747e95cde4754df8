"""Request paths and the globs that match them, for request rules.

A path is matched in one canonical form, so that no other spelling of it reaches what a rule
refuses: the query dropped, percent-escapes decoded once, runs of '/' merged. What has no
single meaning across servers is refused: '.' and '..' segments (also encoded, or with ';'
parameters), a fragment, a backslash, an encoded NUL or control character, %u escapes, escapes
left after decoding. Deny rules are also checked against the path without ';' parameters and
without a trailing '/' (deny_forms).
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import NamedTuple
from urllib.parse import unquote_to_bytes

from .errors import InvalidPattern

MAX_PATH = 8192
_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")
_IIS_ESCAPE = re.compile(r"%u[0-9A-Fa-f]{4}", re.IGNORECASE)
_PARAMETERS = re.compile(r";[^/]*")
_GLOB_TEXT = re.compile(r"/[\x21-\x7e]*")


class InvalidPath(ValueError):
    """A request target that cannot be put in one canonical form (and so is never allowed)."""


def display_path(target: str, limit: int | None = 200) -> str:
    """A request's path as events, refusals and approvers see it: never the query or
    fragment, nor the values of ';' parameters (`;jsessionid=...`): any can carry a secret."""
    path = target.split("?", 1)[0].split("#", 1)[0]
    return (_PARAMETERS.sub(";", path) if ";" in path else path)[:limit]


@lru_cache(maxsize=4096)
def canonical_path(target: str) -> str:
    """The path of a request target, as rules see it; raises InvalidPath.

    The origin is sent the target as the agent wrote it, so anything a server could resolve
    to another path than the one judged here is refused rather than normalised: dot segments
    (clients resolve them before sending), fragments, IIS-style %u escapes."""
    path = target.split("?", 1)[0]
    if not path.startswith("/"):
        raise InvalidPath(f"{target[:80]!r} is not an absolute path")
    if "#" in path:
        raise InvalidPath("a fragment ('#') in the request target (clients never send one)")
    if len(path) > MAX_PATH:
        raise InvalidPath(f"a path of {len(path)} characters (at most {MAX_PATH})")
    if _IIS_ESCAPE.search(path):
        raise InvalidPath("a %u escape in the path (some servers decode it)")
    try:
        decoded = unquote_to_bytes(path).decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidPath("the path's escapes are not UTF-8") from None
    if "\\" in decoded:
        raise InvalidPath("a backslash in the path (some servers read it as '/')")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in decoded):
        raise InvalidPath("a control character in the path")
    if _ESCAPE.search(decoded):
        raise InvalidPath("the path is percent-encoded twice")
    segments = [part for part in decoded.split("/")[1:] if part]
    for part in segments:
        if part.split(";", 1)[0] in (".", ".."):
            raise InvalidPath(f"a {part[:40]!r} segment in the path (clients resolve dot "
                              "segments before sending; servers differ on what they mean)")
    trailing = decoded.endswith("/") and bool(segments)
    return "/" + "/".join(segments) + ("/" if trailing else "")


def deny_forms(path: str) -> tuple[str, ...]:
    """The spellings of a canonical path a deny rule is checked against: as sent, without
    ';' parameters (Tomcat, Jetty and Spring drop them), and without a trailing '/' (most
    routers serve both)."""
    forms = [path]
    if ";" in path:
        forms.append(_PARAMETERS.sub("", path))
    forms += [form.rstrip("/") or "/" for form in forms if len(form) > 1 and form.endswith("/")]
    return tuple(dict.fromkeys(forms))


class PathGlob(NamedTuple):
    """A path glob: '*' is any run within one segment, '**' any run of segments."""

    text: str
    regex: re.Pattern[str]
    folded: re.Pattern[str]  # the same, case-insensitive (deny rules)

    def matches(self, path: str, *, any_case: bool = False) -> bool:
        return bool((self.folded if any_case else self.regex).fullmatch(path))


def parse_path_glob(text: str) -> PathGlob:
    """A glob from a policy file; raises InvalidPattern saying what would be valid."""
    if not _GLOB_TEXT.fullmatch(text):
        raise InvalidPattern(f"path glob {text!r} must start with '/' and hold printable "
                             "ASCII only, no spaces (e.g. '/myorg/**')")
    if "?" in text or "#" in text:
        raise InvalidPattern(f"path glob {text!r}: rules match the path only, never the query "
                             "('?') or fragment ('#')")
    if "\\" in text or "%" in text:
        raise InvalidPattern(f"path glob {text!r}: write the path decoded, without '%' escapes "
                             "or backslashes")
    pieces = []
    segments = text.split("/")[1:]
    for position, segment in enumerate(segments):
        if segment in (".", ".."):
            raise InvalidPattern(f"path glob {text!r}: '.' and '..' segments never match "
                                 "(paths are resolved before matching)")
        if "**" in segment and segment != "**":
            raise InvalidPattern(f"path glob {text!r}: '**' must be a whole segment "
                                 "(like '/a/**/b'); use '*' within a segment")
        if segment == "**":  # at the end: anything below; inside: any number of segments
            pieces.append("/.*" if position == len(segments) - 1 else "(?:/[^/]*)*")
        else:
            pieces.append("/" + "[^/]*".join(re.escape(part) for part in segment.split("*")))
    pattern = "".join(pieces)
    return PathGlob(text, re.compile(pattern), re.compile(pattern, re.IGNORECASE))
