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

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from agent_egress.policy import Action, CompiledPolicy, Decision, Reason
from mitmproxy import http

from .auditlog import AuditLog
from .enforce import DECIDED
from .events import decision_fields, interception_fields, request_fields
from .pinning import UpstreamPinning
from .placeholders import (
    binding,
    body,
    misdirection,
    places,
    put_back,
    scanner,
    swapped,
)
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


class CredentialSwap:
    """The broker's second place in the addon chain, right after the enforcer: the swap
    happens once the request is allowed, before mitmproxy sends its head (a streamed body
    goes out right after)."""

    def __init__(self, broker: CredentialBroker) -> None:
        self.broker = broker

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        self.broker.swap(flow)


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
        # Each credential as the proxy started with it: a reload cannot rebind it (the agent
        # may be able to edit the user policy file; with credentials, that would steal them).
        self._started: dict[str, tuple[Any, ...]] | None = None

    def sync(self, policy: CompiledPolicy | None) -> None:
        """Read the secrets of a policy not loaded before (at start, after each reload); a
        secret that cannot be read is said once per load (the message holds no secret)."""
        problems = self.vault.sync(policy)
        if problems is None or policy is None:
            return
        current = {c.name: binding(c) for c in (policy.credentials.all
                                                   if policy.credentials else ())}
        if self._started is None:
            self._started = current
        for name, now in current.items():
            if self._started.get(name) != now:
                problems.append(f"credential {name!r} changed after the proxy started (hosts, "
                                "header, source or variable): it is not used until the proxy "
                                "is restarted")
        for problem in problems:
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
            found = places(request, credential.placeholder)
            if not found:
                continue
            allowed = next((c for c in bound if c.name == credential.name), None)
            where = misdirection(request, found, allowed.header if allowed else None) if (
                allowed is not None) else f"to {host}:{port}, which it is not bound to"
            if where is None and credential.secret is None:
                self._refuse(flow, credential, Reason.CREDENTIAL_UNAVAILABLE,
                             f"its secret could not be read ({credential.problem})")
                return
            if where is not None:
                self._refuse(flow, credential, Reason.CREDENTIAL_MISDIRECTED,
                             f"its placeholder was sent {where}")
                return
            swaps.append(credential)
        if swaps:
            flow.metadata[_SWAP] = swaps
        if request.method in ("GET", "HEAD"):
            return
        length = request.headers.get("content-length", "")
        if not (length.isdigit() and int(length) <= _HELD_BODY):
            request.stream = scanner([c.placeholder.encode() for c in held],
                                     lambda index: self._cut(flow, held[index]))

    def request(self, flow: http.HTTPFlow) -> None:
        """After the body: a placeholder in it is refused (the head was not sent yet for a
        held body; a streamed one is scanned as it passes)."""
        if flow.response is not None:
            return
        content = body(flow.request)
        if content:
            for credential in self.vault.held():
                if credential.placeholder.encode() in content:
                    self._refuse(flow, credential, Reason.CREDENTIAL_MISDIRECTED,
                                 "its placeholder was sent in a request body")
                    return

    def swap(self, flow: http.HTTPFlow) -> None:
        """Once the enforcer allowed the request (CredentialSwap, after it in the chain):
        the placeholders in the bound header become the secrets, before the head is sent."""
        swaps: list[Held] = flow.metadata.pop(_SWAP, [])
        if not swaps or flow.response is not None or not flow.metadata.get(DECIDED):
            return
        request = flow.request
        bound_now = self._bound(*self._destination(flow))
        for credential in swaps:
            bound = next((c for c in bound_now if c.name == credential.name), None)
            if bound is None or credential.secret is None:
                # Unbound meanwhile (a reload): refused, never sent with a stale binding.
                self._refuse(flow, credential, Reason.CREDENTIAL_UNAVAILABLE,
                             "it is no longer bound to this host")
                return
            values = request.headers.get_all(bound.header)
            sent = [swapped(v, credential.placeholder, credential.secret) for v in values]
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
            scrubbed = [put_back(value, pairs) for value in values]
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

    def websocket_message(self, flow: http.HTTPFlow) -> None:
        """Frames of a WebSocket opened with a secret: the origin's are put back, the agent's
        may not carry a placeholder (a misdirection: the connection is closed)."""
        pairs: list[tuple[str, str]] = flow.metadata.get(_SWAPPED, [])
        if flow.websocket is None or not flow.websocket.messages:
            return
        message = flow.websocket.messages[-1]
        if not message.from_client:
            for sent, original in pairs:
                message.content = message.content.replace(sent.encode(), original.encode())
            return
        for credential in self.vault.held():
            if credential.placeholder.encode() in message.content:
                message.drop()
                self._record(flow, credential, Reason.CREDENTIAL_MISDIRECTED,
                             "its placeholder was sent in a WebSocket message")
                flow.kill()
                return

    def _destination(self, flow: http.HTTPFlow) -> tuple[str, int]:
        tunnel = self.pinning.tunnel(flow.client_conn)
        if tunnel is not None:
            return tunnel.name, tunnel.port
        return flow.request.pretty_host, flow.request.port

    def _bound(self, host: str, port: int) -> tuple[Any, ...]:
        """The credentials bound to this destination, as the proxy started with them."""
        policy = self.policy()
        if policy is None or policy.credentials is None or self._started is None:
            return ()
        return tuple(c for c in policy.credentials.bound(host, port)
                     if self._started.get(c.name) == binding(c))

    def _record(self, flow: http.HTTPFlow, credential: Held, reason: Reason,
                why: str) -> Decision:
        """The refusal's event: high severity, the credential's name, never its value."""
        host, port = self._destination(flow)
        decision = Decision(Action.DENY, reason, host, port,
                            detail=f"credential {credential.name!r} ({credential.env}): {why}")
        self.audit.emit("request.decided", **request_fields(flow), **decision_fields(decision),
                        credential=credential.name, severity="high",
                        **interception_fields(flow))
        return decision

    def _refuse(self, flow: http.HTTPFlow, credential: Held, reason: Reason, why: str) -> None:
        flow.response = blocked_response(self._record(flow, credential, reason, why),
                                         flow.request)

    def _cut(self, flow: http.HTTPFlow, credential: Held) -> None:
        """A placeholder in a streamed body: the part before it has gone, the rest never does."""
        self._record(flow, credential, Reason.CREDENTIAL_MISDIRECTED,
                     "its placeholder was sent in a streamed request body")
        flow.kill()
