"""The SOCKS5 port (`serve --socks-listen`): RFC 1928 CONNECT, decided as an HTTP CONNECT is.

mitmproxy's own SOCKS5 mode answers "succeeded" before any addon has decided anything. Here the
port is a regular proxy to mitmproxy, and this layer speaks SOCKS5 on it: the request becomes a
CONNECT flow that goes through the same hooks (agent name, limits, policy, approvals, pinning,
interception, fail-closed), and only then is the client told the outcome. After a success the
tunnel is Tunnels', exactly like a CONNECT tunnel: TLS is SNI-checked, HTTP is decided request
by request, anything else is raw TCP and needs a rule that allows it.

SOCKS4/4a, BIND, UDP ASSOCIATE and unknown address types are refused with their reply codes.
A user name (RFC 1929) names the agent, like the user part of the HTTP proxy URL; the password
is read and dropped.
"""

from __future__ import annotations

import base64
import socket
import time
from typing import Any

from agent_egress.policy import Decision, Reason
from mitmproxy import connection, ctx, http
from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.layers import modes
from mitmproxy.proxy.layers.http import HttpConnectedHook, HttpConnectHook

from .auditlog import AuditLog
from .connections import client_text, is_socks, socks_mode_spec
from .enforce import REFUSAL
from .relay import CloseClient

VERSION = 0x05
NO_AUTHENTICATION = 0x00
USER_PASSWORD = 0x02
NO_ACCEPTABLE_METHOD = 0xFF
CONNECT, BIND, UDP_ASSOCIATE = 0x01, 0x02, 0x03
IPV4, DOMAIN_NAME, IPV6 = 0x01, 0x03, 0x04
# Reply codes (RFC 1928, section 6).
SUCCEEDED = 0x00
GENERAL_FAILURE = 0x01
NOT_ALLOWED = 0x02  # connection not allowed by ruleset
HOST_UNREACHABLE = 0x04
COMMAND_NOT_SUPPORTED = 0x07
ADDRESS_TYPE_NOT_SUPPORTED = 0x08
SOCKS4_REJECTED = b"\x00\x5b\x00\x00\x00\x00\x00\x00"  # SOCKS4 "request rejected or failed"
_COMMANDS = {BIND: "BIND", UDP_ASSOCIATE: "UDP ASSOCIATE"}


def reply(code: int) -> bytes:
    """A SOCKS5 reply; the bound address is never told (0.0.0.0:0)."""
    return bytes([VERSION, code, 0x00, IPV4]) + b"\x00" * 6


def is_socks_stack(context: Any) -> bool:
    """The layer stack of an open SOCKS5 tunnel: the port's layer, then this one, decided."""
    stack = context.layers
    return (len(stack) == 2 and isinstance(stack[0], modes.HttpProxy)
            and isinstance(stack[1], Socks5Layer) and stack[1].child_layer is not None)


def connect_flow(client: connection.Client, server: connection.Server, host: str, port: int,
                 user: str | None) -> http.HTTPFlow:
    """The CONNECT a SOCKS5 request stands for; its user name as proxy credentials (the agent
    name, decided by AgentIdentity like the HTTP port's)."""
    headers = http.Headers()
    if user is not None:
        # Basic credentials end the name at a colon; a SOCKS5 name may hold one, which must
        # not shorten "codex:x" into "codex": it stays in, as a character no name may use.
        token = base64.b64encode(f"{user.replace(':', chr(0xFFFD))}:".encode()).decode()
        headers["Proxy-Authorization"] = f"Basic {token}"
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    now = time.time()
    flow = http.HTTPFlow(client, server, live=True)
    flow.request = http.Request(host, port, b"CONNECT", b"", authority.encode(), b"",
                                b"HTTP/1.1", headers, b"", None, now, now)
    return flow


class Socks5Layer(layer.Layer):
    """One SOCKS5 client: greeting, user name, request, decision; then the tunnel's layers."""

    def __init__(self, context: Any, port: SocksPort) -> None:
        super().__init__(context)
        self.port = port
        self.buf = b""
        self.step = self._greeting
        self.user: str | None = None
        self.child_layer: layer.Layer | None = None

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if self.child_layer is not None:
            yield from self.child_layer.handle_event(event)
        elif isinstance(event, events.DataReceived) and event.connection is self.context.client:
            self.buf += event.data
            yield from self.step()
        elif isinstance(event, events.ConnectionClosed):
            yield commands.CloseConnection(self.context.client)

    def _greeting(self) -> layer.CommandGenerator[None]:
        version = self.buf[0]
        if version == 0x04:
            yield from self._refuse("SOCKS4/4a is not supported (use SOCKS5, socks5h://)",
                                    SOCKS4_REJECTED)
            return
        if version != VERSION:
            guess = (" (an HTTP request? the HTTP proxy has its own port)"
                     if self.buf[:1].isalpha() else "")
            yield from self._refuse(f"not a SOCKS5 greeting{guess}")
            return
        if len(self.buf) < 2 or len(self.buf) < 2 + self.buf[1]:
            return
        methods, self.buf = self.buf[2:2 + self.buf[1]], self.buf[2 + self.buf[1]:]
        if USER_PASSWORD in methods:  # so that a client with a user name sends it
            method, self.step = USER_PASSWORD, self._authentication
        elif NO_AUTHENTICATION in methods:
            method, self.step = NO_AUTHENTICATION, self._request
        else:
            yield from self._refuse("the client offers neither no authentication nor a user "
                                    "name and password", bytes([VERSION, NO_ACCEPTABLE_METHOD]))
            return
        yield commands.SendData(self.context.client, bytes([VERSION, method]))
        if self.buf:
            yield from self.step()

    def _authentication(self) -> layer.CommandGenerator[None]:
        """RFC 1929: the user name names the agent; the password is not kept."""
        if self.buf[0] != 0x01:
            yield from self._refuse("a user/password negotiation of unknown version",
                                    b"\x01\x01")
            return
        if len(self.buf) < 2:
            return
        end = 2 + self.buf[1]
        if len(self.buf) < end + 1 or len(self.buf) < end + 1 + self.buf[end]:
            return
        name = self.buf[2:end]
        self.buf = self.buf[end + 1 + self.buf[end]:]
        # Not UTF-8: a replacement character, which AgentIdentity refuses as a name.
        self.user = name.decode("utf-8", "replace") if name else None
        self.step = self._request
        yield commands.SendData(self.context.client, b"\x01\x00")
        if self.buf:
            yield from self.step()

    def _request(self) -> layer.CommandGenerator[None]:
        if len(self.buf) < 5:
            return
        version, command, _, address_type = self.buf[:4]
        if version != VERSION:
            yield from self._refuse("a SOCKS5 request of another version", reply(GENERAL_FAILURE))
            return
        lengths = {IPV4: 4 + 4 + 2, IPV6: 4 + 16 + 2, DOMAIN_NAME: 5 + self.buf[4] + 2}
        if address_type not in lengths:
            yield from self._refuse(f"address type {address_type} (RFC 1928 knows 1, 3 and 4)",
                                    reply(ADDRESS_TYPE_NOT_SUPPORTED))
            return
        if len(self.buf) < lengths[address_type]:
            return
        message, self.buf = self.buf[:lengths[address_type]], self.buf[lengths[address_type]:]
        port = int.from_bytes(message[-2:], "big")
        if address_type == DOMAIN_NAME:
            # Not UTF-8: replacement characters, which the policy refuses as an invalid host.
            host = message[5:-2].decode("utf-8", "replace")
        else:
            family = socket.AF_INET if address_type == IPV4 else socket.AF_INET6
            host = socket.inet_ntop(family, message[4:-2])
        if command != CONNECT:
            what = _COMMANDS.get(command, f"command {command}")
            yield from self._refuse(f"SOCKS5 {what} is not supported (only CONNECT)",
                                    reply(COMMAND_NOT_SUPPORTED), (host, port))
            return
        self.step = self._ignore
        yield from self._decide(host, port)

    def _decide(self, host: str, port: int) -> layer.CommandGenerator[None]:
        client = self.context.client
        flow = connect_flow(client, self.context.server, host, port, self.user)
        yield HttpConnectHook(flow)
        if flow.error is not None or not flow.live:
            yield commands.CloseConnection(client)  # killed: the client left while held
            return
        response = flow.response
        if response is not None and not 200 <= response.status_code < 300:
            refusal = flow.metadata.get(REFUSAL)
            dns = isinstance(refusal, Decision) and refusal.reason is Reason.DNS_ERROR
            yield commands.SendData(client, reply(HOST_UNREACHABLE if dns else NOT_ALLOWED))
            yield commands.CloseConnection(client)
            return
        # The enforcer pinned the checked address: the tunnel goes there and nowhere else.
        self.context.server.address = (flow.request.host, flow.request.port)
        yield commands.SendData(client, reply(SUCCEEDED))
        yield HttpConnectedHook(flow)
        self.child_layer = layer.NextLayer(self.context)
        yield from self.child_layer.handle_event(events.Start())
        if self.buf:  # sent before the reply: the tunnel's first bytes
            data, self.buf = self.buf, b""
            yield from self.child_layer.handle_event(events.DataReceived(client, data))

    def _ignore(self) -> layer.CommandGenerator[None]:
        self.buf = b""  # nothing is read until the request is decided and answered
        yield from ()

    def _refuse(self, problem: str, answer: bytes = b"",
                target: tuple[str, int] | None = None) -> layer.CommandGenerator[None]:
        self.port.refused(self.context.client, problem, target, self.user)
        self.step, self.buf = self._ignore, b""
        if answer:
            yield commands.SendData(self.context.client, answer)
        yield commands.CloseConnection(self.context.client)


class SocksPort:
    """Speaks SOCKS5 to the clients of the SOCKS port (`socks_listen`)."""

    def __init__(self, audit: AuditLog) -> None:
        self.audit = audit
        self._mode: str | None = None  # the mitmproxy mode this addon added for the port

    def load(self, loader: Any) -> None:
        loader.add_option("socks_listen", str, "",
                          "HOST:PORT of the SOCKS5 port (empty: none)")

    def configure(self, updated: set[str]) -> None:
        if "socks_listen" not in updated:
            return
        spec = socks_mode_spec()
        kept = [mode for mode in ctx.options.mode if mode != self._mode]
        self._mode = spec
        ctx.options.update(mode=[*kept, spec] if spec else kept)

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        context = nextlayer.context
        if (not is_socks(context.client) or is_socks_stack(context)
                or isinstance(nextlayer.layer, Socks5Layer)):
            return  # not the SOCKS port's; or a tunnel (Tunnels'); or chosen already
        if len(context.layers) == 1 and isinstance(context.layers[0], modes.HttpProxy):
            nextlayer.layer = Socks5Layer(context, self)
            return
        self.audit.emit("connection.refused", client=client_text(context.client),
                        scheme="socks5", reason=Reason.INTERNAL_ERROR.value,
                        detail=f"unexpected protocol layer stack {context.layers!r}")
        nextlayer.layer = CloseClient(context)

    def refused(self, client: connection.Client, problem: str,
                target: tuple[str, int] | None, user: str | None) -> None:
        """A SOCKS request that is not a CONNECT this proxy decides: on the record."""
        if target is None:
            self.audit.emit("connection.refused", client=client_text(client), scheme="socks5",
                            reason=Reason.PROXY_PROTOCOL.value, detail=problem)
            return
        self.audit.emit("request.decided", client=client_text(client), scheme="socks5",
                        host=target[0][:300], port=target[1], decision="deny",
                        reason=Reason.PROXY_PROTOCOL.value, detail=problem,
                        agent_claimed=user[:128] if user else None)
