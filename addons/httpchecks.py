"""Checks on a request's own text before it is decided: the destination it names must be one,
and what it asks an origin to switch to must be a protocol the proxy parses."""

from __future__ import annotations

from agent_egress.policy import (
    Action,
    Decision,
    InvalidHost,
    Reason,
    normalize_host,
    split_host_port,
)
from mitmproxy import http

from .pinning import Pin

_UPGRADE_HEADERS = ("upgrade", "http2-settings")


def strip_upgrade(request: http.Request) -> None:
    """Remove any protocol upgrade but WebSocket, so an origin can never switch the connection
    to a protocol the proxy does not parse (h2c, in any case, or anything else)."""
    upgrade = request.headers.get_all("upgrade")
    if not upgrade or [value.strip().lower() for value in upgrade] == ["websocket"]:
        return
    for name in _UPGRADE_HEADERS:
        request.headers.pop(name, None)
    tokens = [token.strip() for value in request.headers.get_all("connection")
              for token in value.split(",")]
    kept = [t for t in tokens if t and t.lower() not in ("upgrade", *_UPGRADE_HEADERS)]
    request.headers.pop("connection", None)
    if kept:
        request.headers["connection"] = ", ".join(kept)


def tunnel_target_mismatch(request: http.Request, tunnel: Pin) -> Decision | None:
    """A request inside a tunnel must name the tunnel's host, in its target and its Host
    header; an absolute-form target naming another host is domain fronting over HTTP."""
    named = []
    if request.authority:
        named.append(("request target", request.authority, request.scheme))
    if (header := request.host_header) is not None:
        named.append(("Host header", header, request.scheme))
    for where, authority, _scheme in named:
        try:
            name, port = split_host_port(authority, default_port=tunnel.port)
            same = normalize_host(name).name == tunnel.name and port == tunnel.port
        except InvalidHost:
            same = False
        if not same:
            return Decision(Action.DENY, Reason.HOST_MISMATCH, tunnel.name, tunnel.port,
                            detail=f"the {where} ({authority}) inside the tunnel to "
                                   f"{tunnel.name}:{tunnel.port} names another destination")
    return None

def host_header_mismatch(request: http.Request) -> Decision | None:
    """A Host header naming another host than the request target is a smuggling attempt."""
    header = request.host_header
    if header is None:
        return None
    try:
        name, port = split_host_port(header, default_port=request.port)
        same = normalize_host(name).name == normalize_host(request.host).name
    except InvalidHost:
        same, port = False, request.port
    if same and port == request.port:
        return None
    return Decision(Action.DENY, Reason.HOST_MISMATCH, request.host, request.port,
                    detail=f"the Host header ({header}) names another destination than "
                           f"the request ({request.host}:{request.port})")
