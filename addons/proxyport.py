"""What may be spoken to the proxy's own port: HTTP/1 with bounded request heads (and its own
`GET /healthz`), nothing else.

mitmproxy's NextLayer addon would negotiate TLS (and HTTP/2) on the listening port with a CA it
writes under ~/.mitmproxy, and its HTTP/1 server buffers request heads without limit. This addon
takes that choice over: it answers TLS to the port with a closed connection, gives every client
(and every plain-HTTP tunnel) an HTTP/1 server with a head size and header count limit, and
closes any layer stack it does not know rather than guess.
"""

from __future__ import annotations

import json
import re
import weakref
from collections.abc import Callable
from typing import Any

from agent_egress.policy import Reason
from mitmproxy import connection, http
from mitmproxy.net.http import http1
from mitmproxy.proxy import commands, events, layer, layers
from mitmproxy.proxy.layers import modes
from mitmproxy.proxy.layers.http import (
    HTTPMode,
    ReceiveHttp,
    RequestData,
    RequestHeaders,
    ResponseData,
    ResponseEndOfMessage,
    ResponseHeaders,
    ResponseProtocolError,
)
from mitmproxy.proxy.layers.http._http1 import Http1Server
from mitmproxy.proxy.layers.http._http2 import Http2Server

from .auditlog import AuditLog
from .connections import is_socks, listen_ports
from .events import client_text
from .relay import CloseClient
from .tunnels import is_tunnel_stack

_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,32}")
MAX_REQUEST_HEAD = 64 * 1024
MAX_REQUEST_HEADERS = 200
MAX_FRAMING_LINE = 16 * 1024


def plain_response(status: int, text: str) -> bytes:
    """A complete response the proxy sends on its own, closing the connection."""
    response = http.Response.make(status, text, {"Content-Type": "text/plain; charset=utf-8",
                                                 "Connection": "close"})
    return http1.assemble_response(response)


class GuardedHttp1Server(Http1Server):
    """mitmproxy's HTTP/1 server side with what it lacks: a bound on the request head, and the
    body of a refused request read and dropped instead of buffered.

    mitmproxy buffers a head until its blank line arrives ("FIXME: protect against header size
    DoS"); one connection could send it tens of MiB. Reads arrive in chunks of at most 64 KiB,
    so the buffer never grows past the limit by more than one chunk.
    """

    def __init__(self, context: Any, port: ProxyPort) -> None:
        super().__init__(context)
        self.port = port

    def send(self, event: Any) -> layer.CommandGenerator[None]:
        answer = self.port.failure_response(self.context.client, event)
        if answer is None:
            yield from super().send(event)
            return
        if self.response is None:  # nothing of another response has been sent
            yield commands.SendData(self.conn, http1.assemble_response(answer))
        yield commands.CloseConnection(self.conn)

    def read_headers(self, event: events.ConnectionEvent) -> layer.CommandGenerator[None]:
        answered_400 = False
        for command in super().read_headers(event):
            problem = (_head_problem(command.event.request) if isinstance(command, ReceiveHttp)
                       and isinstance(command.event, RequestHeaders) else None)
            if problem is not None:
                yield from self._refuse_head(*problem)
                return
            if isinstance(command, commands.SendData) and command.data.startswith(b"HTTP/1.1 400"):
                answered_400 = True
            elif isinstance(command, commands.Log) and answered_400 and self.request is None:
                # mitmproxy answered 400 to a request line or head it could not parse.
                self.port.invalid_request(self.context.client, command.message)
            yield command
        if self.state == self.read_headers and len(self.buf) > MAX_REQUEST_HEAD:
            yield from self._refuse_head(431, Reason.REQUEST_HEAD_TOO_LARGE,
                                         f"the request head is larger than "
                                         f"{MAX_REQUEST_HEAD // 1024} KiB")

    def _refuse_head(self, status: int, reason: Reason,
                     problem: str) -> layer.CommandGenerator[None]:
        self.port.refused(self.context.client, reason, problem)
        yield commands.SendData(self.conn, plain_response(
            status, f"agent-egress refused this request: {problem}.\n"))
        yield commands.CloseConnection(self.conn)
        self.state = self.done

    def read_body(self, event: events.Event) -> layer.CommandGenerator[None]:
        discard = self.request is not None and self.port.is_discarded(self.request)
        for command in super().read_body(event):
            if discard and isinstance(command, ReceiveHttp) and isinstance(
                    command.event, RequestData):
                continue  # a refused request's body: read to keep the connection in step
            yield command
        # Body data is taken from the buffer as it comes; what stays is an unfinished framing
        # line (a chunk size, an extension, a trailer), which h11 would buffer without end.
        if self.state == self.read_body and len(self.buf) > MAX_FRAMING_LINE:
            self.port.refused(self.context.client, Reason.INVALID_REQUEST,
                              f"a chunked-body framing line longer than "
                              f"{MAX_FRAMING_LINE // 1024} KiB")
            yield commands.SendData(self.conn, plain_response(
                400, "agent-egress refused this request: a chunked-body framing line is too "
                     "long.\n"))
            yield commands.CloseConnection(self.conn)
            self.state = self.done


class GuardedHttp2Server(Http2Server):
    """mitmproxy's HTTP/2 server side (intercepted tunnels whose agent chose h2), answering
    an upstream failure with the proxy's own response rather than mitmproxy's error page."""

    def __init__(self, context: Any, port: ProxyPort) -> None:
        super().__init__(context)
        self.port = port

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        answer = self.port.failure_response(self.context.client, event)
        if answer is None or not self.is_open_for_us(event.stream_id):
            yield from super()._handle_event(event)
            return
        yield from super()._handle_event(ResponseHeaders(event.stream_id, answer))
        yield from super()._handle_event(ResponseData(event.stream_id, answer.content or b""))
        yield from super()._handle_event(ResponseEndOfMessage(event.stream_id))


def _head_problem(request: http.Request) -> tuple[int, Reason, str] | None:
    """Why a parsed request head is refused: (status, reason, what), or None."""
    fields = request.headers.fields
    if len(fields) > MAX_REQUEST_HEADERS:
        return (431, Reason.REQUEST_HEAD_TOO_LARGE, f"the request has {len(fields)} header "
                                                    f"fields (at most {MAX_REQUEST_HEADERS})")
    size = len(request.data.method) + len(request.data.path) + len(request.data.authority) + sum(
        len(name) + len(value) + 4 for name, value in fields)
    if size > MAX_REQUEST_HEAD:
        return (431, Reason.REQUEST_HEAD_TOO_LARGE,
                f"the request head is larger than {MAX_REQUEST_HEAD // 1024} KiB")
    if any(b"\n" in value or b"\r" in value for _, value in fields):
        # RFC 9112 5.2: a proxy must not forward obsolete line folding; each origin would read
        # the continuation line its own way (" Host: other.test").
        return 400, Reason.INVALID_REQUEST, "a header folded over several lines (obs-fold)"
    return None


def _request_line_problem(request: http.Request) -> str | None:
    if not _TOKEN.fullmatch(request.data.method):
        return "the request's method is not an HTTP token (RFC 9110)"
    if any(byte <= 0x20 or byte == 0x7F for byte in request.data.path):
        return "whitespace or a control character in the request target"
    return None


def _is_proxy_port_stack(context: Any) -> bool:
    return len(context.layers) == 1 and isinstance(context.layers[0], modes.HttpProxy)


class ProxyPort:
    """Chooses the layer for what a client sends to the proxy port (tunnels: see Tunnels)."""

    def __init__(self, audit: AuditLog,
                 upstream_failure: Callable[[connection.Client, str], http.Response | None]
                 ) -> None:
        self.audit = audit
        self.upstream_failure = upstream_failure  # the proxy's answer to a failed upstream
        self._discarded: weakref.WeakSet[http.Request] = weakref.WeakSet()

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        context = nextlayer.context
        if is_tunnel_stack(context):
            return  # the tunnel's first bytes are Tunnels' to judge
        if is_socks(context.client):
            return  # the SOCKS5 port: SocksPort's
        if not _is_proxy_port_stack(context):
            self.refused(context.client, Reason.INTERNAL_ERROR,
                         f"unexpected protocol layer stack {context.layers!r}")
            nextlayer.layer = CloseClient(context)
            return
        data = nextlayer.data_client()
        if not data:
            return
        if problem := _not_http1(data):
            self.refused(context.client, Reason.PROXY_PROTOCOL, problem)
            nextlayer.layer = CloseClient(context)
            return
        nextlayer.layer = self.http_layer(context, HTTPMode.regular)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        """A request line no origin could read one way only is refused (HTTP/2 carries the
        method and target as free text, translated into an HTTP/1 request line upstream);
        `GET /healthz` sent to the proxy itself (not proxied) answers container probes."""
        request = flow.request
        if flow.response is None and (problem := _request_line_problem(request)):
            self.invalid_request(flow.client_conn, problem)
            flow.response = http.Response.make(400, f"agent-egress: {problem}\n", {
                "Content-Type": "text/plain; charset=utf-8", "Connection": "close"})
            return
        if request.path != "/healthz" or request.method != "GET" or flow.response is not None:
            return
        if request.port not in listen_ports() or flow.client_conn.tls_established:
            return
        flow.response = http.Response.make(200, json.dumps({"status": "ok"}),
                                           {"Content-Type": "application/json"})

    def http_layer(self, context: Any, mode: HTTPMode = HTTPMode.transparent) -> layer.Layer:
        """mitmproxy's HTTP layer, with our guarded HTTP/1 (or, after TLS that negotiated
        it, HTTP/2) server for the client side."""
        http_layer = layers.HttpLayer(context, mode)
        server_class = GuardedHttp2Server if context.client.alpn == b"h2" else GuardedHttp1Server
        http_layer.connections[context.client] = server_class(context.fork(), self)
        return http_layer

    def failure_response(self, client: connection.Client, event: Any) -> http.Response | None:
        """The proxy's own answer to an upstream failure (a 502 with its reason), if this
        event reports one the proxy knows about."""
        if not isinstance(event, ResponseProtocolError):
            return None
        if (answer := self.upstream_failure(client, event.message)) is not None:
            return answer
        if event.code.http_status_code() != 502:
            return None  # not the origin's failure (a client error, a killed flow)
        # mitmproxy's own page quotes what the origin sent, which can echo the request (a
        # credential the proxy added): said in the proxy's words instead.
        what = event.message.split(":", 1)[0][:80]
        self.audit.emit("upstream.failed", client=client_text(client), detail=what)
        return http.Response.make(502, f"agent-egress: the origin's response could not be "
                                       f"read ({what}); nothing of it was passed on.\n",
                                  {"Content-Type": "text/plain; charset=utf-8",
                                   "Connection": "close"})

    def discard_body(self, request: http.Request) -> None:
        """Read and drop this (refused) request's body rather than buffer it."""
        self._discarded.add(request)

    def is_discarded(self, request: http.Request) -> bool:
        return request in self._discarded

    def invalid_request(self, client: connection.Client, detail: str) -> None:
        """A request mitmproxy's parser refused with a 400: a decision too, on the record."""
        self.audit.emit("request.decided", client=client_text(client), decision="deny",
                        reason=Reason.INVALID_REQUEST.value, detail=detail[:1000])

    def refused(self, client: connection.Client, reason: Reason, detail: str) -> None:
        self.audit.emit("connection.refused", client=client_text(client), reason=reason.value,
                        detail=detail)


def _not_http1(data: bytes) -> str | None:
    """Why the first bytes sent to the proxy port cannot be an HTTP/1 request, or None."""
    first = data[0]
    if first == 0x16:
        return "TLS sent to the proxy port (use http://, not https://, for the proxy URL)"
    if first >= 0x80 or (first < 0x20 and first not in b"\r\n"):
        return "binary data sent to the proxy port (it speaks HTTP/1 only)"
    if data.startswith(b"PRI * HTTP/2"):
        return "HTTP/2 sent to the proxy port (it speaks HTTP/1 only)"
    return None
