"""Resolve each allowed upstream once, check every address, connect to exactly that address.

No second lookup happens between the check and the connection, so DNS rebinding cannot swap a
checked public address for a private one. Connections nobody decided on are refused: the proxy
fails closed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from agent_egress.policy import CompiledPolicy, InvalidHost, normalize_host
from mitmproxy import connection, ctx
from mitmproxy.proxy import server_hooks

from .resolver import Resolution, resolve_upstream

__all__ = ["Pin", "Resolution", "UpstreamPinning"]


@dataclass(frozen=True, slots=True)
class Pin:
    """One checked upstream of a client connection, linked to the connection's earlier pins.

    A connection pins one upstream per (host, port) it reaches: one for a tunnel, a few for a
    keep-alive plain-HTTP client. A short chain is scanned faster than dictionaries are built,
    and it is what every idle tunnel holds, so it is kept to one small object per pin.
    """

    name: str  # normalised host name
    port: int
    address: str  # the checked address, as the request now targets it
    earlier: Pin | None = None
    tunnel: bool = False  # pinned by a CONNECT: everything after it on the connection is in it

    def chain(self) -> Iterator[Pin]:
        pin: Pin | None = self
        while pin is not None:
            yield pin
            pin = pin.earlier


class UpstreamPinning:
    def __init__(self, is_parent: Callable[[Any], bool] = lambda address: False) -> None:
        self._pins: dict[str, Pin] = {}  # client connection id -> its latest pin
        # The parent proxy (addons/upstream.py): its hop is added only after a decision.
        self.is_parent = is_parent

    def load(self, loader: Any) -> None:
        loader.add_option(
            "dns_timeout", float, 5.0,
            "Seconds to wait for the proxy's own DNS lookup of an upstream.",
        )

    async def resolve(self, policy: CompiledPolicy, host: str, port: int) -> Resolution:
        """Addresses for a normalised host (static overrides first), checked against policy."""
        return await resolve_upstream(policy, host, port, ctx.options.dns_timeout)

    def _chain(self, client: connection.Client) -> Iterator[Pin]:
        latest = self._pins.get(client.id)
        return latest.chain() if latest is not None else iter(())

    def pin(self, client: connection.Client, host: str, port: int, address: str, *,
            tunnel: bool = False) -> None:
        """Remember the checked address for (host, port) on this client connection.

        The enforcer pins only what `pinned` does not know yet; a newer pin for the same
        (host, port) would be found first anyway. ``host`` must be a valid host (decided).
        """
        self._pins[client.id] = Pin(normalize_host(host).name, port, address,
                                    self._pins.get(client.id), tunnel)

    def pinned(self, client: connection.Client, host: str, port: int) -> str | None:
        try:
            name = normalize_host(host).name
        except InvalidHost:
            return None  # nothing is ever pinned for an invalid host
        return next((pin.address for pin in self._chain(client)
                     if pin.name == name and pin.port == port), None)

    def tunnel(self, client: connection.Client) -> Pin | None:
        """The CONNECT tunnel this client connection has become, if it has."""
        latest = self._pins.get(client.id)
        return latest if latest is not None and latest.tunnel else None

    def name_for(self, client: connection.Client, address: str, port: int) -> str | None:
        """The host name a pinned address stands for on this client connection."""
        return next((pin.name for pin in self._chain(client)
                     if pin.address == address and pin.port == port), None)

    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        # The enforcer points each allowed request at its checked address; anything else
        # trying to open an upstream connection was not decided, so it is refused.
        if data.server.address is None:
            return
        host, port = data.server.address[:2]
        if self.name_for(data.client, host, port) is None and not self.is_parent(
                data.server.address):
            data.server.error = "agent-egress: no policy decision pinned this upstream"

    def client_disconnected(self, client: connection.Client) -> None:
        self._pins.pop(client.id, None)
