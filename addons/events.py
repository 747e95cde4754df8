"""The fields every event shares, shaped in one place: who (client, agent), what was asked,
and what was decided. Addresses are `ip:port`, an IPv6 one as `[ip]:port`."""

from __future__ import annotations

from typing import Any

from agent_egress.policy import Decision
from agent_egress.policy.paths import display_path
from mitmproxy import http

from .connections import address_text, client_text, tunnel_scheme
from .identity import agent_claimed, agent_of

__all__ = ["address_text", "client_text", "decision_fields", "interception_fields", "logged_path",
           "request_fields", "request_scheme", "tunnel_scheme"]


def decision_fields(decision: Decision) -> dict[str, Any]:
    return {
        "host": decision.host,
        "port": decision.port,
        "decision": "allow" if decision.allowed else "deny",
        "reason": decision.reason.value,
        "rule": decision.rule.text if decision.rule else None,
        "rule_origin": decision.rule.origin if decision.rule else None,
        "layer": decision.layer or None,
        "detail": decision.detail or None,
    }


def request_fields(flow: http.HTTPFlow) -> dict[str, Any]:
    """Who asked for what: never the query string (it can carry credentials)."""
    request = flow.request
    connect = request.method == "CONNECT"
    return {
        "client": client_text(flow.client_conn),
        "scheme": request_scheme(flow),
        "method": None if connect else request.method,
        "path": None if connect else logged_path(request.path),
        "websocket": True if request.headers.get("upgrade", "").lower() == "websocket" else None,
        "agent": agent_of(flow),
        "agent_claimed": agent_claimed(flow),
    }


def request_scheme(flow: http.HTTPFlow) -> str:
    """`connect` or `socks5` for a tunnel, else the request's scheme."""
    if flow.request.method == "CONNECT":
        return tunnel_scheme(flow.client_conn)
    return flow.request.scheme


def logged_path(target: str) -> str:
    """A request's path as events keep it (policy.paths.display_path): no query, fragment or
    ';' parameter values, which can carry credentials."""
    return display_path(target, limit=None)


def interception_fields(flow: http.HTTPFlow) -> dict[str, Any]:
    """`intercepted: true` on the events of requests the proxy decrypted to decide."""
    request = flow.request
    intercepted = request.method != "CONNECT" and request.scheme == "https"
    return {"intercepted": True} if intercepted else {}
