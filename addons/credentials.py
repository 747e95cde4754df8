"""The credential broker: the agent holds placeholders, the proxy adds the real secrets.

A placeholder is swapped for its secret only in a request to a host the credential is bound
to, over TLS the proxy intercepted, in the credential's header (a bare token, `Bearer X`,
`token X`, or inside `Basic` credentials), and nowhere else. A placeholder anywhere else (in
another header, the URL, a body, another host, plain HTTP) is what a prompt injection trying
to send a secret away looks like: the request is refused (`credential_misdirected`) with a
high-severity event naming the credential, never its value.

The secrets live in the Vault (proxy/secretstore.py reads them): no event, log line or
response of this module contains one.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import unquote

from agent_egress.policy import Action, CompiledPolicy, Decision, Reason
from mitmproxy import http

from .auditlog import AuditLog
from .enforce import DECIDED
from .events import decision_fields, interception_fields, request_fields
from .pinning import UpstreamPinning
from .refusals import blocked_response

logger = logging.getLogger(__name__)

_HELD_BODY = 1 << 20  # serve's stream_large_bodies: larger bodies are scanned as they pass
_SWAP = "agent_egress_credential_swap"  # flow metadata: credentials to swap once decided
_SWAPPED = "agent_egress_credential_swapped"  # flow metadata: credentials added to the request


@dataclass(frozen=True)
class Held:
    """A credential as the proxy holds it: the placeholder the agent got, and the secret
    (None when its source could not be read: requests carrying the placeholder are refused)."""

    name: str
    env: str
    placeholder: str
    secret: str | None = field(repr=False)
    problem: str = ""

    def __repr__(self) -> str:  # a traceback or log line never shows the secret
        return f"Held({self.name!r}, env={self.env!r})"


class Vault(Protocol):
    def held(self) -> Iterable[Held]: ...
    def sync(self, policy: CompiledPolicy | None) -> list[str] | None: ...


class CredentialBroker:
    """Checks every request the proxy sees for placeholders; swaps them where bound."""

    def __init__(self, audit: AuditLog, pinning: UpstreamPinning,
                 policy: Callable[[], CompiledPolicy | None], vault: Vault) -> None:
        self.audit = audit
        self.pinning = pinning
        self.policy = policy
        self.vault = vault

    def sync(self, policy: CompiledPolicy | None) -> None:
        """Read the secrets of a policy not loaded before (at start, after each reload); a
        secret that cannot be read is said once per load (the message holds no secret)."""
        for problem in self.vault.sync(policy) or ():
            self.audit.emit("credential.unavailable", detail=problem)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        """Before the enforcer: a misdirected placeholder is refused before any decision."""
        request = flow.request
        self.sync(self.policy())
        held = list(self.vault.held())
        if flow.response is not None or not held or request.method == "CONNECT":
            return
        host, port = self._destination(flow)
        bound = self._bound(host, port)
        swaps = []
        for credential in held:
            places = _places(request, credential.placeholder)
            if not places:
                continue
            allowed = next((c for c in bound if c.name == credential.name), None)
            where = _misdirection(request, places, allowed.header if allowed else None) if (
                allowed is not None) else f"to {host}:{port}, which it is not bound to"
            if where is None and credential.secret is None:
                self._refuse(flow, credential, host, port, Reason.CREDENTIAL_UNAVAILABLE,
                             f"its secret could not be read ({credential.problem})")
                return
            if where is not None:
                self._refuse(flow, credential, host, port, Reason.CREDENTIAL_MISDIRECTED,
                             f"its placeholder was sent {where}")
                return
            swaps.append(credential)
        if swaps:
            flow.metadata[_SWAP] = swaps
        if request.method in ("GET", "HEAD"):
            return
        length = request.headers.get("content-length", "")
        if not (length.isdigit() and int(length) <= _HELD_BODY):
            request.stream = _scanner([c.placeholder.encode() for c in held],
                                      lambda: self._cut(flow, host, port))

    def request(self, flow: http.HTTPFlow) -> None:
        """After the body, and after the enforcer allowed the request: a placeholder in the
        body is refused; the bound ones in the header are swapped."""
        swaps: list[Held] = flow.metadata.pop(_SWAP, [])
        if flow.response is not None:
            return
        content = flow.request.raw_content
        if content:
            for credential in self.vault.held():
                if credential.placeholder.encode() in content:
                    host, port = self._destination(flow)
                    self._refuse(flow, credential, host, port, Reason.CREDENTIAL_MISDIRECTED,
                                 "its placeholder was sent in a request body")
                    return
        if not swaps or not flow.metadata.get(DECIDED):
            return
        request = flow.request
        for credential in swaps:
            bound = next(c for c in self._bound(*self._destination(flow))
                         if c.name == credential.name)
            assert credential.secret is not None
            values = request.headers.get_all(bound.header)
            sent = [_swapped(v, credential.placeholder, credential.secret) for v in values]
            request.headers.set_all(bound.header, sent)
            # What an echo would show, longest first: a whole header value, a Basic token
            # (base64 of user:secret), the secret; each mapped back to what the agent sent.
            pairs = flow.metadata.setdefault(_SWAPPED, [])
            for new, old in zip(sent, values, strict=True):
                if new != old:
                    pairs += [(new, old), (new.split()[-1], old.split()[-1])]
            pairs.append((credential.secret, credential.placeholder))
            self.audit.emit("credential.used", credential=credential.name,
                            header=bound.header, **request_fields(flow),
                            host=request.pretty_host, port=request.port)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        """An origin that echoes a request's headers back (a debugging endpoint, an error
        page) would hand the agent the secret: in the response to a request that carried
        one, what was sent is put back as what the agent sent (headers here, a held body
        below)."""
        pairs: list[tuple[str, str]] = flow.metadata.get(_SWAPPED, [])
        response = flow.response
        if not pairs or response is None:
            return
        for name in set(response.headers.keys()):
            values = response.headers.get_all(name)
            scrubbed = [_put_back(value, pairs) for value in values]
            if scrubbed != values:
                response.headers.set_all(name, scrubbed)

    def response(self, flow: http.HTTPFlow) -> None:
        pairs: list[tuple[str, str]] = flow.metadata.get(_SWAPPED, [])
        response = flow.response
        if not pairs or response is None or not response.raw_content:
            return
        content = response.get_content(strict=False) or b""
        scrubbed = content
        for sent, original in pairs:
            scrubbed = scrubbed.replace(sent.encode(), original.encode())
        if scrubbed != content:
            response.set_content(scrubbed)

    def _destination(self, flow: http.HTTPFlow) -> tuple[str, int]:
        tunnel = self.pinning.tunnel(flow.client_conn)
        if tunnel is not None:
            return tunnel.name, tunnel.port
        return flow.request.pretty_host, flow.request.port

    def _bound(self, host: str, port: int) -> tuple[Any, ...]:
        policy = self.policy()
        if policy is None or policy.credentials is None:
            return ()
        return policy.credentials.bound(host, port)

    def _refuse(self, flow: http.HTTPFlow, credential: Held, host: str, port: int,
                reason: Reason, why: str) -> None:
        decision = Decision(Action.DENY, reason, host, port,
                            detail=f"credential {credential.name!r} ({credential.env}): {why}")
        self.audit.emit("request.decided", **request_fields(flow), **decision_fields(decision),
                        credential=credential.name, severity="high",
                        **interception_fields(flow))
        flow.response = blocked_response(decision, flow.request)

    def _cut(self, flow: http.HTTPFlow, host: str, port: int) -> None:
        decision = Decision(Action.DENY, Reason.CREDENTIAL_MISDIRECTED, host, port,
                            detail="a credential's placeholder was sent in a streamed body")
        self.audit.emit("request.decided", **request_fields(flow), **decision_fields(decision),
                        severity="high", **interception_fields(flow))
        flow.kill()


def _places(request: http.Request, placeholder: str) -> list[str]:
    """Where in the request head a placeholder appears: header names, "url"."""
    places = []
    target = request.path
    if placeholder in target or placeholder in unquote(target):
        places.append("url")
    for name, value in request.headers.items(multi=True):
        if placeholder in value or placeholder in _basic_text(value):
            places.append(name.lower())
    return places


def _misdirection(request: http.Request, places: list[str], header: str | None) -> str | None:
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


def _put_back(value: str, pairs: list[tuple[str, str]]) -> str:
    for sent, original in pairs:
        value = value.replace(sent, original)
    return value


def _basic_text(value: str) -> str:
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "basic" or not token:
        return ""
    try:
        return base64.b64decode(token.strip(), validate=True).decode("utf-8", "replace")
    except (binascii.Error, ValueError):
        return ""


def _swapped(value: str, placeholder: str, secret: str) -> str:
    """The header value with the placeholder replaced: in place, or inside Basic."""
    if placeholder in value:
        return value.replace(placeholder, secret)
    decoded = _basic_text(value)
    if placeholder not in decoded:
        return value
    scheme = value.strip().partition(" ")[0]
    encoded = base64.b64encode(decoded.replace(placeholder, secret).encode()).decode()
    return f"{scheme} {encoded}"


def _scanner(needles: list[bytes], cut: Callable[[], None]) -> Callable[[bytes], bytes]:
    """A stream filter that cuts the request when a placeholder appears, across chunks."""
    keep = max(len(n) for n in needles) - 1
    tail = b""

    def scan(chunk: bytes) -> bytes:
        nonlocal tail
        window = tail + chunk
        if any(needle in window for needle in needles):
            cut()
            return b""
        tail = window[-keep:] if keep else b""
        return chunk

    return scan


