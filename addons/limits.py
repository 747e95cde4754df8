"""How much of a shared proxy one client may hold: connections, time to send a head, memory.

A client that never finishes its request head (the CONNECT or request line and headers), or
never sends a tunnel's first bytes, is closed after `network.header_timeout`; one address may
keep at most `network.max_connections_per_client` connections open. mitmproxy's own idle
timeout (10 minutes, reset by every byte) bounds neither.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable

from agent_egress.policy import CompiledPolicy, Reason, Settings
from mitmproxy import connection, http
from mitmproxy.proxy import server_hooks

from . import connections
from .auditlog import AuditLog
from .events import client_text
from .proxyport import plain_response


class _Deadline:
    __slots__ = ("timer", "first_request")

    def __init__(self, timer: asyncio.TimerHandle, first_request: bool) -> None:
        self.timer = timer
        self.first_request = first_request  # nothing answered yet: a 408 tells the client why


class ClientLimits:
    """Runs before the enforcer: a head is complete when mitmproxy calls the request hooks,
    and a request held for a person must not be cut by the head deadline meanwhile. (A
    tunnel's first bytes have a deadline of their own, in Tunnels.)"""

    def __init__(self, audit: AuditLog, policy: Callable[[], CompiledPolicy | None]) -> None:
        self.audit = audit
        self.policy = policy
        self._open: collections.Counter[str] = collections.Counter()  # client -> connections
        self._deadlines: dict[str, _Deadline] = {}  # client connection id -> its deadline
        self._connecting: set[str] = set()  # upstream connections opening, their client paused

    def _settings(self) -> Settings:
        policy = self.policy()
        return policy.settings if policy is not None else Settings()

    def client_connected(self, client: connection.Client) -> None:
        key = connections.client_key(client)
        self._open[key] += 1
        limit = self._settings().max_connections_per_client
        if self._open[key] > limit:
            detail = (f"{key} has {limit} connections open to this proxy already "
                      "(network.max_connections_per_client)")
            if not connections.is_socks(client):  # SOCKS5 has no words for it: closed
                connections.write(client, plain_response(
                    429, f"agent-egress refused this connection: {detail}.\n"))
            client.error = f"agent-egress: {detail}"  # mitmproxy closes it
            self.audit.emit("connection.refused", client=client_text(client),
                            reason=Reason.TOO_MANY_CONNECTIONS.value, detail=detail)
            return
        self._arm(client, first_request=True)

    def client_disconnected(self, client: connection.Client) -> None:
        key = connections.client_key(client)
        self._open[key] -= 1
        if self._open[key] <= 0:
            del self._open[key]
        self._disarm(client)

    # While an upstream connection opens, mitmproxy would queue all the client sends in memory
    # (its layers wait for the connection): the client is not read until it is open or failed.
    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        if data.server.error is None and connections.pause_reading(data.client):
            self._connecting.add(data.server.id)

    def server_connected(self, data: server_hooks.ServerConnectionHookData) -> None:
        if data.server.id in self._connecting:
            self._connecting.discard(data.server.id)
            connections.resume_reading(data.client)

    server_connect_error = server_connected

    # A head is complete when mitmproxy calls these: nothing more to wait for.
    def http_connect(self, flow: http.HTTPFlow) -> None:
        self._disarm(flow.client_conn)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        self._disarm(flow.client_conn)

    def websocket_message(self, flow: http.HTTPFlow) -> None:
        # mitmproxy keeps every relayed WebSocket message on the flow for the connection's
        # life (for its UI); relayed, a message is nobody's business here any more. The one
        # being relayed stays for the addons after this one (the credential broker).
        if flow.websocket is not None:
            del flow.websocket.messages[:-1]

    def response(self, flow: http.HTTPFlow) -> None:
        if flow.request.method != "CONNECT" and flow.websocket is None:
            self._arm(flow.client_conn, first_request=False)  # the next request's head

    def _arm(self, client: connection.Client, *, first_request: bool) -> None:
        self._disarm(client)
        timeout = self._settings().header_timeout
        timer = asyncio.get_running_loop().call_later(timeout, self._expire, client, timeout)
        self._deadlines[client.id] = _Deadline(timer, first_request)

    def _disarm(self, client: connection.Client) -> None:
        deadline = self._deadlines.pop(client.id, None)
        if deadline is not None:
            deadline.timer.cancel()

    def _expire(self, client: connection.Client, timeout: float) -> None:
        deadline = self._deadlines.pop(client.id, None)
        if deadline is None:
            return
        socks_handshake = deadline.first_request and connections.is_socks(client)
        what = "SOCKS5 request" if socks_handshake else "request head"
        self.audit.emit("connection.refused", client=client_text(client),
                        reason=Reason.HEADER_TIMEOUT.value,
                        detail=f"no complete {what} within {timeout:g} s "
                               "(network.header_timeout)")
        if deadline.first_request and not connections.is_socks(client):
            connections.write(client, plain_response(
                408, f"agent-egress closed this connection: no complete request head "
                     f"within {timeout:g} s.\n"))
        connections.close(client)
