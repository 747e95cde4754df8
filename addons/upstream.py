"""A parent (corporate) proxy: every allowed connection leaves through it (`serve
--upstream-proxy`), except destinations `network.no_upstream` names; a refused one never
reaches it, because the hop is added only where a decision allowed the connection.

mitmproxy's own machinery makes the hop: a connection's `via` and its HttpUpstreamProxy layer,
which sends CONNECT host:port to the parent (the name, not the address this proxy checked: the
parent resolves it, and its own rules see the name). The parent's credentials are added to
those CONNECTs only, never logged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from agent_egress.policy import CompiledPolicy
from mitmproxy import http
from mitmproxy.proxy import layer
from mitmproxy.proxy.layers.http._upstream_proxy import HttpUpstreamProxy

Via = tuple[str, tuple[str, int]]


class ParentProxy:
    def __init__(self, policy: Callable[[], CompiledPolicy | None],
                 address: tuple[str, int] | None, authorization: str | None = None) -> None:
        self.policy = policy
        self.address = address  # None: no parent proxy
        self._authorization = authorization  # a Proxy-Authorization value, or None

    def via(self, host: str, port: int) -> Via | None:
        """The parent proxy to reach this (allowed) destination through, or None: direct."""
        if self.address is None:
            return None
        policy = self.policy()
        if policy is not None and policy.goes_direct(host, port):
            return None
        return ("http", self.address)

    def route(self, flow: http.HTTPFlow, host: str, port: int, plain: bool) -> bool:
        """Whether an allowed request goes through the parent; a plain-HTTP one is pointed
        at it (or straight at the origin). Through the parent, the request keeps the name."""
        via = self.via(host, port)
        if plain:
            flow.server_conn.via = via
        if via is not None:
            # The name as decided (normalised), never the agent's spelling: the parent would
            # read "faß" or "0177.0.0.1" its own way. The Host header stays as sent.
            flow.request.data.host = host
        return via is not None

    def wrap(self, context: Any, host: str, port: int,
             build: Callable[[], layer.Layer]) -> layer.Layer:
        """The tunnel's layer (made by `build`), behind the hop to the parent if it goes
        through one. The hop is made first: layers file themselves in the context in order."""
        via = self.via(host, port)
        if via is None:
            return build()
        context.server.via = via
        context.server.address = (host, port)  # the name: the parent resolves it
        hop = HttpUpstreamProxy.make(context, True)[0]
        hop.child_layer = build()
        return hop

    def is_parent(self, address: tuple[Any, ...] | None) -> bool:
        """Whether an upstream connection goes to the parent proxy (which is never pinned)."""
        return self.address is not None and address is not None and (
            tuple(address[:2]) == self.address)

    def http_connect_upstream(self, flow: http.HTTPFlow) -> None:
        """A CONNECT to the parent: its credentials, if it needs any."""
        if self._authorization and self.is_parent(flow.server_conn.address):
            flow.request.headers["Proxy-Authorization"] = self._authorization
