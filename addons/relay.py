"""The relay of an allowed tunnel: mitmproxy's TCP layer without a flow object, counting bytes,
watching a TLS handshake until it can no longer bring a new ClientHello; and the layer that
closes a refused one."""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mitmproxy.proxy import commands, events, layer, layers

from .connections import address_text
from .sniff import HelloRetryWatch, Sniffed


@dataclass(slots=True)
class Tunnel:
    """What the `tunnel.closed` event needs; one is held per open tunnel, so kept small."""

    peer: tuple[str, int] | None  # the client's address, formatted only for the event
    host: str
    port: int
    agent: str | None = None
    scheme: str = "connect"  # or socks5: how the tunnel was asked for
    opened: float = field(default_factory=time.monotonic)
    bytes_up: int = 0
    bytes_down: int = 0
    protocol: str | None = None  # set once the layer is chosen: tls, http or tcp
    ech: bool = False  # the ClientHello carried an encrypted one (allowed by network.allow_ech)
    intercepted: bool = False  # TLS terminated by the proxy, requests decided one by one
    deadline: asyncio.TimerHandle | None = None  # for the first bytes (or the first head)

    @property
    def client(self) -> str | None:
        return address_text(self.peer)


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
    """mitmproxy's TCP relay without a flow object, counting bytes for the tunnel event.

    For TLS it also watches the handshake until no second ClientHello can come (see
    HelloRetryWatch): one asked for by a HelloRetryRequest is held and judged by ``judge``
    before a byte of it is relayed.
    """

    # Slots, not instance-dict keys: the dict stays its size (this is what idle tunnels hold).
    __slots__ = ("tunnel", "watch", "judge")

    def __init__(self, context: Any, tunnel: Tunnel, watch: HelloRetryWatch | None = None,
                 judge: Callable[[Sniffed, Tunnel], bool] | None = None) -> None:
        super().__init__(context, ignore=True)
        self.tunnel = tunnel
        self.watch = watch
        self.judge = judge
        queue = getattr(self, "_paused_event_queue", None)
        if isinstance(queue, collections.deque) and not queue:  # as mitmproxy 12 builds it
            self._paused_event_queue = _EventQueue()

    def handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        # Counts, then hands back mitmproxy's own generator: no generator of ours per event
        # once the handshake can no longer bring a new ClientHello.
        if isinstance(event, events.DataReceived):
            from_client = event.connection is self.context.client
            if from_client:
                self.tunnel.bytes_up += len(event.data)
            else:
                self.tunnel.bytes_down += len(event.data)
            if self.watch is not None:
                return self._watched(event, from_client)
        return super().handle_event(event)

    def _watched(self, event: events.DataReceived,
                 from_client: bool) -> layer.CommandGenerator[None]:
        assert self.watch is not None
        if not from_client:
            if not self.watch.server_bytes(event.data):
                self.watch = self.judge = None  # no second ClientHello can come: idle cost 0
            yield from super().handle_event(event)
            return
        if not self.watch.retry:
            yield from super().handle_event(event)  # early data before the server answered
            return
        verdict = self.watch.client_bytes(event.data)
        if verdict is None:
            return  # held until the second ClientHello is complete
        held, judge = self.watch.held(), self.judge
        self.watch = self.judge = None
        if judge is not None and not judge(verdict, self.tunnel):
            yield commands.CloseConnection(self.context.client)
            yield commands.CloseConnection(self.context.server)
            return
        yield from super().handle_event(events.DataReceived(self.context.client, held))


class CloseClient(layer.Layer):
    """Closes the client connection; nothing was or will be opened upstream."""

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, events.Start):
            yield commands.CloseConnection(self.context.client)
