"""Acting on a client connection from outside mitmproxy's layers.

The layers only act on events; a deadline, a limit or a held request has to reach the
connection itself: write a refusal before closing, close it, stop reading from it while a
person decides, and tell whether its peer has gone. mitmproxy's proxyserver addon keeps the
connection handlers by client id (`connections`), each with the transports of its connections.
"""

from __future__ import annotations

import functools
import ipaddress
import select
import weakref
from typing import Any

from mitmproxy import connection, ctx


def address_text(peer: tuple[Any, ...] | None) -> str | None:
    """`ip:port` for a socket address, `[ip]:port` for IPv6; None without one."""
    if not peer:
        return None
    host = str(peer[0])
    return f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"


def listen_ports() -> set[int]:
    """The ports this proxy listens on (the SOCKS5 one too)."""
    return {address[1] for address in ctx.master.addons.get("proxyserver").listen_addrs()}


def listen_addresses(socks: bool = False) -> list[str]:
    """Where this proxy's HTTP port (or, with socks, its SOCKS5 port) listens, as `ip:port`
    (`[ip]:port` for IPv6)."""
    spec = socks_mode_spec()
    return [address_text(address) or "" for server in ctx.master.addons.get("proxyserver").servers
            if (server.mode.full_spec == spec) == socks for address in server.listen_addrs]


def socks_mode_spec(listen: str | None = None) -> str | None:
    """The mitmproxy mode of the SOCKS5 port (`serve --socks-listen HOST:PORT`), or None.

    The port is a regular proxy to mitmproxy: the SOCKS5 side is this proxy's own layer
    (addons/socks.py), chosen for the connections that arrive there."""
    if listen is None:  # the option, where the SOCKS port's addon declared it
        listen = getattr(getattr(ctx, "options", None), "socks_listen", "")
    return _mode_spec(listen) if listen else None


@functools.lru_cache(maxsize=4)
def _mode_spec(listen: str) -> str:
    """Parsed once per value: `is_socks` asks on every connection and decision."""
    host, _, port = listen.rpartition(":")
    return f"regular@{host.strip('[]')}:{port}"


def is_socks(client: connection.Client) -> bool:
    """Whether the client connected to the SOCKS5 port."""
    spec = socks_mode_spec()
    return spec is not None and client.proxy_mode.full_spec == spec


def tunnel_scheme(client: connection.Client) -> str:
    """How a tunnel was asked for, as events name it: `socks5` or `connect`."""
    return "socks5" if is_socks(client) else "connect"


def client_text(client: connection.Client) -> str | None:
    return address_text(client.peername)


def client_key(client: connection.Client) -> str:
    """Which client a connection counts against for per-client limits: its address, with all
    of loopback as one (a local agent can bind any of 127.0.0.0/8 and ::1)."""
    if not client.peername:
        return "unknown"
    host = client.peername[0].split("%", 1)[0]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return "loopback" if address.is_loopback else str(address)


def handler_of(client: connection.Client) -> Any:
    """mitmproxy's connection handler for this client, if it is still connected."""
    server = ctx.master.addons.get("proxyserver")
    return server.connections.get(client.id) if server is not None else None


def _io(client: connection.Client) -> Any:
    handler = handler_of(client)
    return handler.transports.get(client) if handler is not None else None


def write(client: connection.Client, data: bytes) -> None:
    """Bytes to the client outside the layers (a refusal, just before closing)."""
    io = _io(client)
    if io is not None and io.writer is not None and not io.writer.is_closing():
        io.writer.write(data)


def close(client: connection.Client) -> None:
    """Close the client connection (what it was sent still goes out first)."""
    handler = handler_of(client)
    io = handler.transports.get(client) if handler is not None else None
    if io is not None and io.handler is not None:
        handler.close_connection(client)


# Why each paused transport is paused (a held request, an upstream connection opening): it
# reads again only when every reason is gone.
_pauses: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()


def _transport(client: connection.Client) -> Any:
    io = _io(client)
    return getattr(io.writer, "transport", None) if io is not None else None


def pause_reading(client: connection.Client) -> bool:
    """Stop reading from the client: what it sends waits in the kernel's buffers (bounded)
    instead of queueing in the proxy's memory. Whether it was paused; each pause that was is
    undone by one `resume_reading`."""
    transport = _transport(client)
    if transport is None or transport.is_closing():
        return False
    _pauses[transport] = _pauses.get(transport, 0) + 1
    transport.pause_reading()
    return True


def resume_reading(client: connection.Client) -> None:
    transport = _transport(client)
    if transport is None:
        return
    still = _pauses.pop(transport, 1) - 1
    if still > 0:
        _pauses[transport] = still  # paused for another reason too
    elif not transport.is_closing() and not transport.is_reading():
        transport.resume_reading()


def peer_closed(client: connection.Client) -> bool:
    """Whether the client has closed its side, for a connection whose reading is paused: the
    socket is polled for the end of its stream (POLLRDHUP), which shows even when unread data
    comes before it."""
    io = _io(client)
    if io is None or io.writer is None:
        return True
    raw = io.writer.get_extra_info("socket")
    if raw is None:
        return False
    poller = select.poll()
    poller.register(raw.fileno(), select.POLLRDHUP)
    try:
        ready = poller.poll(0)
    except OSError:
        return True
    gone = select.POLLRDHUP | select.POLLHUP | select.POLLERR | select.POLLNVAL
    return any(events & gone for _, events in ready)
