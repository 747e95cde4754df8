"""Checks on a request's own text before it is decided: the destination it names must be one,
and what it asks an origin to switch to must be a protocol the proxy parses."""

from __future__ import annotations

from urllib.parse import parse_qsl

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


def invalid_request(flow: http.HTTPFlow, tunnel: Pin | None) -> Decision:
    """What a request mitmproxy refused as malformed is recorded as."""
    request = flow.request
    if tunnel is not None and request.method == "CONNECT":
        reason, detail = Reason.TUNNEL_PROTOCOL, "a CONNECT inside a tunnel"
    else:
        reason, detail = Reason.INVALID_REQUEST, str(flow.error.msg if flow.error else "")
    host = tunnel.name if tunnel is not None else request.pretty_host
    port = tunnel.port if tunnel is not None else request.port
    return Decision(Action.DENY, reason, host, port, detail=detail)


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


_GIT_SERVICES = ("git-receive-pack", "git-upload-pack")


def git_announced_request(method: str, target: str) -> tuple[str, str] | None:
    """The request a git smart-HTTP ref discovery announces: ``GET REPO/info/refs?service=
    git-receive-pack`` is followed by ``POST REPO/git-receive-pack`` (a push).

    Deciding the POST at discovery makes a refusal one git shows its user: git prints a
    refused discovery's text/plain body as "remote:" lines, not a refused POST's."""
    if method != "GET":
        return None
    path, _, query = target.partition("?")
    if not path.endswith("/info/refs"):
        return None
    services = [value for name, _, value in (part.partition("=") for part in query.split("&"))
                if name == "service"]
    if len(services) != 1 or services[0] not in _GIT_SERVICES:
        return None
    return "POST", f"{path.removesuffix('/info/refs')}/{services[0]}"


# Headers and a form field many frameworks read as the "real" method (Google APIs, Rails,
# Laravel, Symfony): a GET to a read-only host must not be a DELETE to the application.
_METHOD_OVERRIDES = ("x-http-method-override", "x-http-method", "x-method-override")


def implied_requests(request: http.Request) -> list[tuple[str, str, str]]:
    """Other requests this one stands for, each decided too: (method, target, why)."""
    implied = []
    if announced := git_announced_request(request.method, request.path):
        implied.append((*announced, "git asked for it in its ref discovery"))
    for name in _METHOD_OVERRIDES:
        for value in request.headers.get_all(name):
            for method in value.split(",") or [""]:  # Express takes the first of a list
                implied.append((_method_text(method), request.path,
                                f"the {name} header asks for it"))
    if request.method == "POST":
        for method in form_methods(request.path.partition("?")[2]):
            implied.append((method, request.path, "the _method parameter asks for it"))
    return implied


def form_methods(form: str) -> list[str]:
    """The `_method` values of a query or urlencoded body (names decoded, as frameworks do)."""
    return [_method_text(value) for name, value in parse_qsl(form, keep_blank_values=True)
            if name.strip() == "_method"]


def _method_text(value: str) -> str:
    return value.strip().upper()[:32] or "?"


def name_decided_host(request: http.Request, named: str) -> None:
    """RFC 9112 3.2.2: what goes upstream names the host that was decided, so an origin never
    picks a site of its own (its default vhost) for a Host-less request."""
    name = normalize_host(named).name
    default = 443 if request.scheme == "https" else 80
    request.host_header = name if request.port == default else (
        f"[{name}]:{request.port}" if ":" in name else f"{name}:{request.port}")
