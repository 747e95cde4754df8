"""Resolve each allowed upstream once, check every address, connect to exactly that address.

No second lookup happens between the check and the connection, so DNS rebinding cannot swap a
checked public address for a private one. Connections nobody decided on are refused: the proxy
fails closed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from typing import Any

from agent_egress.policy import CompiledPolicy, normalize_host
from agent_egress.policy.hosts import IPAddress
from mitmproxy import connection, ctx
from mitmproxy.proxy import server_hooks


@dataclass(frozen=True, slots=True)
class Resolution:
    addresses: tuple[IPAddress, ...] = ()
    refusal: str | None = None  # why the upstream must not be used
    dns_failed: bool = False


class UpstreamPinning:
    def __init__(self) -> None:
        # client connection id -> (normalised host, port) -> the address that was checked,
        # and the reverse: (address, port) -> the host name it stands for.
        self._pins: dict[str, dict[tuple[str, int], IPAddress]] = {}
        self._names: dict[str, dict[tuple[str, int], str]] = {}

    def load(self, loader: Any) -> None:
        loader.add_option(
            "dns_timeout", float, 5.0,
            "Seconds to wait for the proxy's own DNS lookup of an upstream.",
        )

    async def resolve(self, policy: CompiledPolicy, host: str, port: int) -> Resolution:
        """Addresses for a normalised host (static overrides first), checked against policy."""
        target = normalize_host(host)
        if target.ip is not None:
            addresses: tuple[IPAddress, ...] = (target.ip,)
        elif (override := policy.resolve_override(target.name)) is not None:
            addresses = (override,)
        else:
            try:
                infos = await asyncio.wait_for(
                    asyncio.get_running_loop().getaddrinfo(
                        target.name, port, type=socket.SOCK_STREAM),
                    timeout=ctx.options.dns_timeout,
                )
            except (TimeoutError, OSError) as exc:
                why = "timed out" if isinstance(exc, TimeoutError) else str(exc)
                return Resolution(refusal=f"DNS lookup of {target.name} failed: {why}",
                                  dns_failed=True)
            unique = dict.fromkeys(ipaddress.ip_address(info[4][0].split("%")[0])
                                   for info in infos)
            addresses = tuple(unique)
        refusal = policy.address_refusal(addresses)
        if refusal:
            return Resolution(addresses, f"{target.name} resolves to {refusal}")
        return Resolution(addresses)

    def pin(self, client: connection.Client, host: str, port: int, address: IPAddress) -> None:
        name = normalize_host(host).name
        self._pins.setdefault(client.id, {})[(name, port)] = address
        self._names.setdefault(client.id, {})[(str(address), port)] = name

    def pinned(self, client: connection.Client, host: str, port: int) -> IPAddress | None:
        return self._pins.get(client.id, {}).get((normalize_host(host).name, port))

    def name_for(self, client: connection.Client, address: str, port: int) -> str | None:
        """The host name a pinned address stands for on this client connection."""
        return self._names.get(client.id, {}).get((address, port))

    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        # The enforcer points each allowed request at its checked address; anything else
        # trying to open an upstream connection was not decided, so it is refused.
        if data.server.address is None:
            return
        host, port = data.server.address[:2]
        if (host, port) not in self._names.get(data.client.id, {}):
            data.server.error = "agent-egress: no policy decision pinned this upstream"

    def client_disconnected(self, client: connection.Client) -> None:
        self._pins.pop(client.id, None)
        self._names.pop(client.id, None)
