"""Where a credential's placeholder is in a request, and how it becomes the secret: pure
functions over mitmproxy's request objects, for the credential broker (addons/credentials.py)."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

from mitmproxy import http


def binding(credential: Any) -> tuple[Any, ...]:
    return (credential.env, credential.source, credential.header.lower(),
            tuple(sorted(p.text for p in credential.hosts)))


def places(request: http.Request, placeholder: str) -> list[str]:
    """Where in the request head a placeholder appears: header names, "url"."""
    places = []
    target = request.path
    if placeholder in target or placeholder in unquote(target):
        places.append("url")
    for name, value in request.headers.items(multi=True):
        if placeholder in value or placeholder in basic_text(value):
            places.append(name.lower())
    return places


def misdirection(request: http.Request, places: list[str], header: str | None) -> str | None:
    """Where a placeholder went that it may not go, or None when only its bound header."""
    if header is None:
        return "to a host the credential is not bound to"
    if request.scheme != "https":
        return "over plain HTTP"
    for place in places:
        if place == "url":
            return "in the URL"
        if place != header.lower():
            return f"in the {place} header"
    return None


def put_back(value: str, pairs: list[tuple[str, str]]) -> str:
    for sent, original in pairs:
        value = value.replace(sent, original)
    return value


def body(request: http.Request) -> bytes:
    """The body as the origin will read it: decoded when it says it is compressed."""
    if request.headers.get("content-encoding"):
        return request.get_content(strict=False) or request.raw_content or b""
    return request.raw_content or b""


def basic_text(value: str) -> str:
    parts = value.split(None, 1)
    if len(parts) != 2 or parts[0].lower() != "basic":
        return ""
    token = parts[1].strip()
    for decode in (base64.b64decode, base64.urlsafe_b64decode):
        try:
            return decode(token + "=" * (-len(token) % 4)).decode("utf-8", "replace")
        except (binascii.Error, ValueError):
            continue
    return ""


def swapped(value: str, placeholder: str, secret: str) -> str:
    """The header value with the placeholder replaced: in place, or inside Basic."""
    if placeholder in value:
        return value.replace(placeholder, secret)
    decoded = basic_text(value)
    if placeholder not in decoded:
        return value
    scheme = value.split(None, 1)[0]
    encoded = base64.b64encode(decoded.replace(placeholder, secret).encode()).decode()
    return f"{scheme} {encoded}"


def scanner(needles: list[bytes], cut: Callable[[int], None]) -> Callable[[bytes], bytes]:
    """A stream filter that cuts the request when a placeholder appears, across chunks
    (``cut`` is told which one)."""
    keep = max(len(n) for n in needles) - 1
    tail = b""

    def scan(chunk: bytes) -> bytes:
        nonlocal tail
        window = tail + chunk
        if found := [i for i, needle in enumerate(needles) if needle in window]:
            cut(found[0])
            return b""
        tail = window[-keep:] if keep else b""
        return chunk

    return scan


