"""`serve --managed-url`: download the managed policy and its signature, verify them, and keep
the last good version on disk for a restart without the network.

The proxy fetches directly (never through HTTP_PROXY, which may point at itself), with the
system's trust (or SSL_CERT_FILE / SSL_CERT_DIR). What is decided about a download is pure
(policy/signed.py); this module only moves bytes. The cache is one JSON file written
atomically: the policy bytes, the signature and the metadata (URL, ETag, serial, the floor). It
is used at start only if its signature verifies with a trusted key.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import os
import ssl
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
from agent_egress.policy.files import UnsafePath, read_own_file, replace_file
from agent_egress.policy.signed import (
    BAD_SIGNATURE,
    FETCH_FAILED,
    INVALID,
    MAX_POLICY_BYTES,
    MAX_SIGNATURE_BYTES,
    TOO_LARGE,
    UNSIGNED,
    Rejection,
    SignedPolicy,
    accept,
)
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .paths import state_dir
from .textsafe import printable

CACHE_FILE = "cache.json"
_OPTION = "--managed-cache"


def default_cache_dir() -> Path:
    return state_dir() / "managed"


def signature_url(url: str) -> str:
    """Where the signature of the policy at ``url`` is: the same path with `.sig` appended."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=parts.path + ".sig"))


def shown_url(url: str) -> str:
    """The URL for logs, events and people: without credentials or a query (a presigned URL's
    token), which are not for them."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    netloc = f"{host}:{parts.port}" if parts.port else host
    return printable(urlunsplit((parts.scheme, netloc, parts.path, "", "")))


def _trust() -> ssl.SSLContext:
    """The system's trust, or the bundle SSL_CERT_FILE / SSL_CERT_DIR names (like OpenSSL)."""
    return ssl.create_default_context(cafile=os.environ.get("SSL_CERT_FILE") or None,
                                      capath=os.environ.get("SSL_CERT_DIR") or None)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class ManagedURL:
    """Fetches and caches the managed policy published at one URL (the ManagedSource the
    ManagedURLPolicy addon drives)."""

    def __init__(self, url: str, keys: Sequence[Ed25519PublicKey], cache_dir: Path,
                 timeout: float = 5.0, deadline: float = 20.0) -> None:
        self.url = url
        self.shown = shown_url(url)
        self.deadline = deadline  # for a whole refresh, however slowly the server answers
        self.keys = tuple(keys)
        self.cache_path = cache_dir / CACHE_FILE
        self.timeout = timeout
        self.floor = 0  # the highest serial ever accepted (kept in the cache)
        self.etag: str | None = None  # the ETag of the version in force
        self.fetched_at: str | None = None  # when the URL last answered with a good version
        self._fetched_etag: str | None = None  # the ETag of the version fetch() last returned

    async def fetch(self, in_force: SignedPolicy | None) -> SignedPolicy | None:
        """The version the URL serves now if it is new and good; None if it is the one in
        force (304, or the same bytes); Rejection otherwise."""
        try:
            return await asyncio.wait_for(self._fetch(in_force), self.deadline)
        except TimeoutError:
            raise Rejection(FETCH_FAILED, f"{self.shown}: no complete answer within "
                                          f"{self.deadline:g} s") from None

    async def _fetch(self, in_force: SignedPolicy | None) -> SignedPolicy | None:
        headers = {"If-None-Match": self.etag} if self.etag and in_force is not None else {}
        async with httpx.AsyncClient(verify=_trust(), trust_env=False, follow_redirects=False,
                                     timeout=httpx.Timeout(self.timeout)) as client:
            status, data, etag = await self._get(client, self.url, headers, MAX_POLICY_BYTES)
            if status == 304 and in_force is not None:
                self.fetched_at = _now()
                return None
            if status != 200:
                raise Rejection(FETCH_FAILED, f"{self.shown} answered HTTP {status}; the "
                                              "policy must be served with 200")
            if in_force is not None and data == in_force.data:
                self.etag, self.fetched_at = etag, _now()  # same version, maybe a new ETag
                return None
            sig_url = signature_url(self.url)
            sig_shown = shown_url(sig_url)
            sig_status, signature, _ = await self._get(client, sig_url, {}, MAX_SIGNATURE_BYTES)
            if sig_status in (404, 410):
                raise Rejection(UNSIGNED, f"{sig_shown} answered HTTP {sig_status}: the policy "
                                          "is not signed; publish its signature there "
                                          "('agent-egress policy sign')")
            if sig_status != 200:
                raise Rejection(FETCH_FAILED, f"{sig_shown} answered HTTP {sig_status}")
        signed = accept(data, signature, self.keys, self.shown, self.floor, in_force)
        if signed is in_force:
            return None
        self._fetched_etag = etag
        return signed

    async def _get(self, client: httpx.AsyncClient, url: str, headers: dict[str, str],
                   limit: int) -> tuple[int, bytes, str | None]:
        """Status, body (at most ``limit`` bytes, else too_large) and ETag of one GET."""
        shown = shown_url(url)
        try:
            async with client.stream("GET", url, headers=headers) as response:
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > limit:
                    raise Rejection(TOO_LARGE, f"{shown}: {declared} bytes, more than the "
                                               f"{limit} a policy or signature may have")
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > limit:
                        raise Rejection(TOO_LARGE, f"{shown}: more than {limit} bytes, more than "
                                                   "a policy or signature may have")
                return response.status_code, bytes(body), response.headers.get("etag")
        except httpx.HTTPError as exc:
            raise Rejection(FETCH_FAILED, f"{shown}: {type(exc).__name__}: "
                                          f"{printable(exc) or 'no answer'}") from None

    def commit(self, signed: SignedPolicy) -> None:
        """Record ``signed`` as the version in force: the floor, its ETag, the cache (OSError
        or UnsafePath if the cache cannot be written; the policy stays in force)."""
        self.floor = max(self.floor, signed.serial)
        self.etag, self._fetched_etag = self._fetched_etag, None
        self.fetched_at = _now()
        record = {"url": self.shown, "etag": self.etag, "fetched_at": self.fetched_at,
                  "serial": signed.serial, "floor": self.floor, "key": signed.key,
                  "policy": base64.b64encode(signed.data).decode(),
                  "signature": base64.b64encode(signed.signature).decode()}
        replace_file(self.cache_path, json.dumps(record, indent=1) + "\n", 0o600, _OPTION)

    def cached(self) -> SignedPolicy | None:
        """The last good version from the cache, verified again (None when there is none);
        Rejection when the cache is unreadable, tampered with or no longer verifies."""
        where = str(self.cache_path)
        try:
            text, _ = read_own_file(self.cache_path, _OPTION)
        except FileNotFoundError:
            return None
        except (OSError, UnsafePath, UnicodeDecodeError) as exc:
            raise Rejection(INVALID, f"cache {where}: {exc}") from None
        try:
            record: dict[str, Any] = json.loads(text)
            data = base64.b64decode(record["policy"], validate=True)
            signature = base64.b64decode(record["signature"], validate=True)
            floor = record.get("floor", 0)
        except (ValueError, KeyError, TypeError, binascii.Error):
            raise Rejection(INVALID, f"cache {where}: not a cache file this proxy wrote; "
                                     "remove it (the next good download replaces it)") from None
        try:
            signed = accept(data, signature, self.keys, where, 0)
        except Rejection as exc:
            reason = BAD_SIGNATURE if exc.reason == BAD_SIGNATURE else INVALID
            raise Rejection(reason, f"cache: {exc}", exc.serial) from None
        signed = signed._replace(parsed=signed.parsed._replace(source=self.shown))
        # The floor is the signed serial at least: an edited floor cannot lower it below that.
        self.floor = max(signed.serial, floor if isinstance(floor, int) else 0)
        same_url = record.get("url") == self.shown and isinstance(record.get("etag"), str)
        self.etag = record["etag"] if same_url else None
        self.fetched_at = record.get("fetched_at") if isinstance(
            record.get("fetched_at"), str) else None
        return signed


def open_source(url: str, key_files: Sequence[str], cache_dir: str | None) -> ManagedURL:
    """serve's --managed-url, --managed-key and --managed-cache, checked; ValueError says what
    is wrong and what to do."""
    from agent_egress.policy.files import secure_directory
    from agent_egress.policy.signing import SigningKeyError, load_public_key

    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError(f"--managed-url {shown_url(url)!r}: expected an https:// (or http://) "
                         "URL of the policy file")
    if not key_files:
        raise ValueError("--managed-url needs --managed-key FILE: the public key its signature "
                         "is checked with ('agent-egress policy keygen' makes one)")
    try:
        keys = [load_public_key(Path(path)) for path in key_files]
    except SigningKeyError as exc:
        raise ValueError(f"--managed-key: {printable(exc)}") from None
    directory = Path(cache_dir) if cache_dir else default_cache_dir()
    try:
        secure_directory(directory, _OPTION)
    except (UnsafePath, OSError) as exc:
        raise ValueError(f"{_OPTION}: {printable(exc)}") from None
    return ManagedURL(url, keys, directory)
