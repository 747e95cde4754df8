"""Allowed CONNECT tunnels: check the TLS SNI, then pass bytes through untouched.

No certificate is needed by the agent: the proxy reads the ClientHello only to check that the
SNI names the host the CONNECT was allowed for (domain fronting otherwise), then relays it.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agent_egress.policy import Action, Decision, InvalidHost, Reason, normalize_host
from mitmproxy import connection, http
from mitmproxy.net.tls import starts_like_tls_record
from mitmproxy.proxy import commands, events, layer, layers
from mitmproxy.proxy.layers.tls import parse_client_hello

from .auditlog import AuditLog
from .enforce import decision_fields
from .identity import agent_of
from .pinning import UpstreamPinning


@dataclass(slots=True)
class Tunnel:
    """What the `tunnel.closed` event needs; one is held per open tunnel, so kept small."""

    peer: tuple[str, int] | None  # the client's address, formatted only for the event
    host: str
    port: int
    agent: str | None = None
    opened: float = field(default_factory=time.monotonic)
    bytes_up: int = 0
    bytes_down: int = 0
    protocol: str | None = None  # set once the layer is chosen: tls, http or tcp

    @property
    def client(self) -> str:
        return f"{self.peer[0]}:{self.peer[1]}" if self.peer else ""


class _EventQueue(list):
    """The queue a layer keeps events in while it waits for a command's reply.

    mitmproxy gives every layer a deque (about 600 bytes, held for the layer's life). The
    relay waits only while its upstream connection opens, for an event or two, so an empty
    list (56 bytes) does: it is what every idle tunnel holds.
    """

    __slots__ = ()

    def popleft(self) -> Any:
        return self.pop(0)


class CountingPassthrough(layers.TCPLayer):
    """mitmproxy's TCP relay without a flow object, counting bytes for the tunnel event."""

    __slots__ = ("tunnel",)  # a slot, not an instance-dict key: the dict stays its size

    def __init__(self, context: Any, tunnel: Tunnel) -> None:
        super().__init__(context, ignore=True)
        self.tunnel = tunnel
        queue = getattr(self, "_paused_event_queue", None)
        if isinstance(queue, collections.deque) and not queue:  # as mitmproxy 12 builds it
            self._paused_event_queue = _EventQueue()

    def handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        # Counts, then hands back mitmproxy's own generator: no generator of ours per event.
        if isinstance(event, events.DataReceived):
            if event.connection is self.context.client:
                self.tunnel.bytes_up += len(event.data)
            else:
                self.tunnel.bytes_down += len(event.data)
        return super().handle_event(event)


class CloseClient(layer.Layer):
    """Closes the client connection; nothing was or will be opened upstream."""

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, events.Start):
            yield commands.CloseConnection(self.context.client)


class Tunnels:
    def __init__(self, audit: AuditLog, pinning: UpstreamPinning,
                 auditing: Callable[[], bool] = lambda: False) -> None:
        self.audit = audit
        self.pinning = pinning
        self.auditing = auditing  # audit mode: a mismatch is logged, the tunnel still flows
        self._tunnels: dict[str, Tunnel] = {}  # client connection id -> its one tunnel

    def http_connected(self, flow: http.HTTPFlow) -> None:
        request = flow.request
        # The enforcer pointed the CONNECT at its checked address; the pin names the host.
        host = self.pinning.name_for(flow.client_conn, request.host, request.port)
        self._tunnels[flow.client_conn.id] = Tunnel(
            flow.client_conn.peername, host or request.host, request.port, agent_of(flow))

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        tunnel = self._tunnels.get(nextlayer.context.client.id)
        if tunnel is None or tunnel.protocol is not None:
            return
        data = nextlayer.data_client()
        if starts_like_tls_record(data):
            try:
                hello = parse_client_hello(data)
            except ValueError:
                self._reject(nextlayer, tunnel, "the TLS ClientHello could not be parsed", None)
                return
            if hello is None:
                self._replace(nextlayer, None)  # wait for the rest of the ClientHello
                return
            if not self._sni_matches(hello.sni, tunnel):
                detail = (f"TLS SNI {hello.sni!r} does not name the CONNECT target "
                          f"{tunnel.host}" if hello.sni else
                          f"TLS ClientHello without SNI for CONNECT target {tunnel.host}")
                if not self.auditing():
                    self._reject(nextlayer, tunnel, detail, hello.sni)
                    return
                self._log_mismatch(tunnel, detail, hello.sni, audit_mode=True)
            tunnel.protocol = "tls"
        elif isinstance(nextlayer.layer, layers.HttpLayer):
            tunnel.protocol = "http"  # plain HTTP in the tunnel: decided per request
            return
        elif nextlayer.layer is None:
            return
        else:
            tunnel.protocol = "tcp"
        self._replace(nextlayer, CountingPassthrough(nextlayer.context, tunnel))

    @staticmethod
    def _replace(nextlayer: layer.NextLayer, chosen: layer.Layer | None) -> None:
        """Use our layer instead of the one mitmproxy's NextLayer picked (TLS layers for a
        ClientHello), and drop the discarded ones from the context: each would otherwise
        stay referenced for the tunnel's lifetime (about 4 KiB per idle tunnel)."""
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

    def _reject(self, nextlayer: layer.NextLayer, tunnel: Tunnel, detail: str,
                sni: str | None) -> None:
        self._tunnels.pop(nextlayer.context.client.id, None)
        self._log_mismatch(tunnel, detail, sni)
        self._replace(nextlayer, CloseClient(nextlayer.context))

    def _log_mismatch(self, tunnel: Tunnel, detail: str, sni: str | None,
                      audit_mode: bool = False) -> None:
        decision = Decision(Action.DENY, Reason.SNI_MISMATCH, tunnel.host, tunnel.port,
                            detail=detail)
        extra = {"mode": "audit", "enforced": False} if audit_mode else {}
        self.audit.emit("request.decided", client=tunnel.client, scheme="connect", sni=sni,
                        agent=tunnel.agent, **decision_fields(decision), **extra)

    @property
    def open_count(self) -> int:
        return len(self._tunnels)

    def client_disconnected(self, client: connection.Client) -> None:
        tunnel = self._tunnels.pop(client.id, None)
        if tunnel is None:
            return
        self.audit.emit(
            "tunnel.closed", client=tunnel.client, agent=tunnel.agent, host=tunnel.host,
            port=tunnel.port,
            protocol=tunnel.protocol, bytes_up=tunnel.bytes_up, bytes_down=tunnel.bytes_down,
            duration_ms=round((time.monotonic() - tunnel.opened) * 1000, 1),
        )
