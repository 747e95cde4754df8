"""Allowed CONNECT tunnels: judge the first bytes, then pass them through untouched.

No certificate is needed by the agent: the proxy reads the ClientHello only to check that the
SNI names the host the CONNECT was allowed for (domain fronting otherwise), then relays it.
Plain HTTP/1 in a tunnel is handed to the HTTP layer and decided request by request; anything
else is raw TCP, relayed only to destinations `network.raw_tcp` lists. mitmproxy's own
fallbacks (its NextLayer addon, raw TCP, TLS interception) are not part of this proxy.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from agent_egress.policy import (
    Action,
    CompiledPolicy,
    Decision,
    InvalidHost,
    Reason,
    Settings,
    normalize_host,
)
from mitmproxy import connection, http
from mitmproxy.proxy import layer, layers
from mitmproxy.proxy.layers import modes
from mitmproxy.proxy.layers.http import HttpStream

from . import connections
from .auditlog import AuditLog
from .events import client_text, decision_fields, tunnel_scheme
from .identity import agent_of
from .intercept import Interception
from .pinning import UpstreamPinning
from .relay import CloseClient, CountingPassthrough, Tunnel
from .sniff import HelloRetryWatch, Sniffed, sniff
from .socks import is_socks_stack
from .upstream import ParentProxy


def is_tunnel_stack(context: Any) -> bool:
    """The layer stack of a tunnel: an HTTP proxy's CONNECT, as mitmproxy builds it, or a
    SOCKS5 CONNECT (addons/socks.py)."""
    stack = context.layers
    return (len(stack) == 3 and isinstance(stack[0], modes.HttpProxy)
            and isinstance(stack[1], layers.HttpLayer)
            and isinstance(stack[2], HttpStream)) or is_socks_stack(context)


class Tunnels:
    """Decides what an allowed tunnel may carry, from its first bytes (see sniff.py)."""

    def __init__(self, audit: AuditLog, pinning: UpstreamPinning,
                 policy: Callable[[], CompiledPolicy | None],
                 http_layer: Callable[[Any], layer.Layer], interception: Interception,
                 parent: ParentProxy | None = None) -> None:
        self.audit = audit
        self.pinning = pinning
        self.policy = policy
        self.http_layer = http_layer  # HTTP inside a tunnel: the proxy's guarded HTTP layer
        self.interception = interception
        self.parent = parent  # the corporate proxy allowed tunnels leave through, if any
        self._tunnels: dict[str, Tunnel] = {}  # client connection id -> its one tunnel

    def http_connected(self, flow: http.HTTPFlow) -> None:
        # The enforcer pinned the CONNECT's host as this connection's tunnel.
        pin = self.pinning.tunnel(flow.client_conn)
        marked = self.interception.intercepted(flow.client_conn)
        if pin is not None:
            tunnel = Tunnel(flow.client_conn.peername, pin.name, pin.port, agent_of(flow))
        elif marked is not None and marked.refusal is not None:
            # A refused destination explained over TLS (explain_https): nothing is relayed.
            tunnel = Tunnel(flow.client_conn.peername, marked.host, marked.port, agent_of(flow))
        else:
            return  # no decision pinned this tunnel: next_layer will close it
        tunnel.scheme = tunnel_scheme(flow.client_conn)
        tunnel.intercepted = marked is not None
        self._tunnels[flow.client_conn.id] = tunnel
        policy = self.policy()
        timeout = policy.settings.header_timeout if policy else Settings.header_timeout
        tunnel.deadline = asyncio.get_running_loop().call_later(
            timeout, self._expire, flow.client_conn, timeout)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        # HTTP in a tunnel: its first request head is complete, nothing more is awaited.
        tunnel = self._tunnels.get(flow.client_conn.id)
        if tunnel is not None and tunnel.deadline is not None:
            tunnel.deadline.cancel()
            tunnel.deadline = None

    def _expire(self, client: connection.Client, timeout: float) -> None:
        """Nothing complete in the tunnel within header_timeout: it is cut, on the record."""
        tunnel = self._tunnels.get(client.id)
        if tunnel is None or tunnel.deadline is None:
            return
        tunnel.deadline = None
        what = ("request head" if tunnel.protocol == "http" else
                "TLS ClientHello or HTTP request")
        self._log_refusal(tunnel, self._decision(
            tunnel, Reason.TUNNEL_PROTOCOL, f"no complete {what} in the tunnel within "
                                            f"{timeout:g} s (network.header_timeout)"), None)
        connections.close(client)

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        if not is_tunnel_stack(nextlayer.context):
            return
        tunnel = self._tunnels.get(nextlayer.context.client.id)
        if tunnel is None or tunnel.protocol is not None:
            # Bytes in a tunnel no policy decision pinned: never relayed (fail closed).
            self._replace(nextlayer, CloseClient(nextlayer.context))
            self.audit.emit("request.decided", client=client_text(nextlayer.context.client),
                            scheme=tunnel_scheme(nextlayer.context.client), decision="deny",
                            reason=Reason.INTERNAL_ERROR,
                            detail="tunnel without a pinned policy decision")
            return
        sniffed = sniff(nextlayer.data_client())
        if sniffed is None:
            self._replace(nextlayer, None)  # not enough bytes to be sure yet
            return
        marked = self.interception.intercepted(nextlayer.context.client)
        explaining = marked is not None and marked.refusal is not None
        refusal = self._refusal(sniffed, tunnel, explaining)
        if refusal is not None and not self._auditing():
            self._reject(nextlayer, tunnel, refusal, sniffed.sni)
            return
        if refusal is not None:
            self._log_refusal(tunnel, refusal, sniffed.sni, audit_mode=True)
        tunnel.protocol = sniffed.protocol
        tunnel.ech = sniffed.ech
        if sniffed.protocol != "http" and tunnel.deadline is not None:
            tunnel.deadline.cancel()  # judged, and relayed from now on: nothing is awaited
            tunnel.deadline = None
        context = nextlayer.context
        if explaining or self.parent is None:  # an explained refusal goes nowhere upstream
            self._replace(nextlayer, self._carrier(context, tunnel, sniffed))
        else:
            self._replace(nextlayer, self.parent.wrap(
                context, tunnel.host, tunnel.port,
                lambda: self._carrier(context, tunnel, sniffed)))

    def _carrier(self, context: Any, tunnel: Tunnel, sniffed: Sniffed) -> layer.Layer:
        """The layer that carries what the tunnel's first bytes showed."""
        if sniffed.protocol == "http":
            return self.http_layer(context)
        if sniffed.protocol == "tls" and tunnel.intercepted:
            return self.interception.layers_for(context, self.http_layer)
        if sniffed.protocol == "tls":
            return CountingPassthrough(context, tunnel, HelloRetryWatch(),
                                       self._judge_second_hello)
        return CountingPassthrough(context, tunnel)

    def _judge_second_hello(self, sniffed: Sniffed, tunnel: Tunnel) -> bool:
        """The ClientHello a HelloRetryRequest asked for: judged like the first."""
        refusal = self._refusal(sniffed, tunnel) if sniffed.protocol == "tls" else (
            self._decision(tunnel, Reason.TUNNEL_PROTOCOL, f"the tunnel to {tunnel.host} sent "
                           "something else than a ClientHello after a HelloRetryRequest"))
        if refusal is None:
            return True
        if self._auditing():
            self._log_refusal(tunnel, refusal, sniffed.sni, audit_mode=True)
            return True
        self._log_refusal(tunnel, refusal, sniffed.sni)
        return False

    def _refusal(self, sniffed: Sniffed, tunnel: Tunnel,
                 explaining: bool = False) -> Decision | None:
        """Why a tunnel's first bytes may not go on to its upstream; None when they may."""
        if sniffed.problem is not None:
            return self._decision(tunnel, Reason.TUNNEL_PROTOCOL,
                                  f"the tunnel to {tunnel.host} started with {sniffed.problem}")
        if explaining:
            # Nothing goes upstream: TLS or HTTP is answered with the refusal, the rest cut.
            return None if sniffed.protocol in ("tls", "http") else self._decision(
                tunnel, Reason.TUNNEL_PROTOCOL, f"the refused tunnel to {tunnel.host} carries "
                                                "neither TLS nor HTTP/1")
        if sniffed.ech and not self._allows_ech():
            return self._decision(
                tunnel, Reason.TUNNEL_PROTOCOL,
                f"the ClientHello to {tunnel.host} carries an encrypted ClientHello (ECH), "
                "whose real server name the proxy cannot check; network.allow_ech = true "
                "lets such tunnels through")
        if sniffed.protocol == "tls" and not self._sni_matches(sniffed.sni, tunnel):
            detail = (f"TLS SNI {sniffed.sni!r} does not name the CONNECT target {tunnel.host}"
                      if sniffed.sni else
                      f"TLS ClientHello without SNI for CONNECT target {tunnel.host}")
            return self._decision(tunnel, Reason.SNI_MISMATCH, detail)
        if sniffed.protocol == "tcp":
            policy = self.policy()
            if policy is None or policy.raw_tcp_rule(tunnel.host, tunnel.port) is None:
                return self._decision(
                    tunnel, Reason.TUNNEL_PROTOCOL,
                    f"the tunnel to {tunnel.host}:{tunnel.port} carries neither TLS nor HTTP/1; "
                    "raw TCP is allowed only where an allow rule names the port "
                    f"({tunnel.host}:{tunnel.port}) or network.raw_tcp lists the destination")
        return None

    @staticmethod
    def _decision(tunnel: Tunnel, reason: Reason, detail: str) -> Decision:
        return Decision(Action.DENY, reason, tunnel.host, tunnel.port, detail=detail)

    def _allows_ech(self) -> bool:
        policy = self.policy()
        return policy is not None and policy.settings.allow_ech

    def _auditing(self) -> bool:
        policy = self.policy()
        return policy is not None and policy.settings.mode == "audit"

    @staticmethod
    def _replace(nextlayer: layer.NextLayer, chosen: layer.Layer | None) -> None:
        """Set the tunnel's layer, and drop any other one from the context: a discarded layer
        would otherwise stay referenced for the tunnel's lifetime (about 4 KiB per tunnel)."""
        discarded = nextlayer.layer
        while discarded is not None:
            if discarded in nextlayer.context.layers:
                nextlayer.context.layers.remove(discarded)
            discarded = getattr(discarded, "child_layer", None)
        nextlayer.layer = chosen

    @staticmethod
    def _sni_matches(sni: str | None, tunnel: Tunnel) -> bool:
        target = normalize_host(tunnel.host)
        if not sni:
            return target.is_ip  # clients send no SNI for IP addresses
        try:
            return normalize_host(sni).name == target.name
        except InvalidHost:
            return False

    def _reject(self, nextlayer: layer.NextLayer, tunnel: Tunnel, decision: Decision,
                sni: str | None) -> None:
        self._tunnels.pop(nextlayer.context.client.id, None)
        if tunnel.deadline is not None:
            tunnel.deadline.cancel()
        self._log_refusal(tunnel, decision, sni)
        self._replace(nextlayer, CloseClient(nextlayer.context))

    def _log_refusal(self, tunnel: Tunnel, decision: Decision, sni: str | None,
                     audit_mode: bool = False) -> None:
        extra = {"mode": "audit", "enforced": False} if audit_mode else {}
        self.audit.emit("request.decided", client=tunnel.client, scheme=tunnel.scheme, sni=sni,
                        agent=tunnel.agent, **decision_fields(decision), **extra)

    @property
    def open_count(self) -> int:
        return len(self._tunnels)

    def client_disconnected(self, client: connection.Client) -> None:
        tunnel = self._tunnels.pop(client.id, None)
        if tunnel is None:
            return
        if tunnel.deadline is not None:
            tunnel.deadline.cancel()
        self._closed(tunnel)

    def proxy_stopping(self) -> None:
        """Tunnels still open when the proxy stops: their `tunnel.closed` with what they
        carried so far (mitmproxy does not close connections before `done`)."""
        tunnels, self._tunnels = list(self._tunnels.values()), {}
        for tunnel in tunnels:
            self._closed(tunnel, stopped=True)

    def _closed(self, tunnel: Tunnel, stopped: bool = False) -> None:
        self.audit.emit(
            "tunnel.closed", client=tunnel.client, agent=tunnel.agent, scheme=tunnel.scheme,
            host=tunnel.host, port=tunnel.port, proxy_stopped=stopped or None,
            protocol=tunnel.protocol, ech=tunnel.ech or None,
            intercepted=tunnel.intercepted or None,  # its requests have their own events
            bytes_up=None if tunnel.intercepted else tunnel.bytes_up,
            bytes_down=None if tunnel.intercepted else tunnel.bytes_down,
            duration_ms=round((time.monotonic() - tunnel.opened) * 1000, 1),
        )
