"""TLS interception, only for the tunnels that need it: hosts with request rules (or
`read_only`), and refused HTTPS destinations the agent is told about (`explain_https`).

Such a tunnel meets the local CA: the agent gets a certificate for the tunnel's host, its
requests are decided one by one, and the origin is verified against the system's trust (or
`network.upstream_ca_file`), never accepted unverified. Every other tunnel stays passthrough,
its bytes untouched (see Tunnels). mitmproxy's TlsConfig addon is not loaded: it would write a
CA under ~/.mitmproxy and supply TLS to any layer that asks; here TLS is set up only for the
tunnels this addon marked.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any, Protocol

import certifi
from agent_egress.policy import Action, CompiledPolicy, Decision, Reason
from mitmproxy import certs, connection, http, tls
from mitmproxy.net import tls as net_tls
from mitmproxy.proxy import layer, layers
from mitmproxy.proxy.layers.tls import HTTP_ALPNS
from OpenSSL import SSL

from .auditlog import AuditLog
from .connections import is_socks
from .enforce import DECIDED, REFUSAL
from .events import client_text, decision_fields, request_fields
from .pinning import UpstreamPinning
from .refusals import blocked_response

logger = logging.getLogger(__name__)

# Refusals told as they are (no certificate can name an invalid host; an agent that failed
# its own identity check is answered at the proxy level).
_NOT_EXPLAINED = frozenset({Reason.INVALID_HOST, Reason.INVALID_AGENT, Reason.INTERNAL_ERROR})


class Certificates(Protocol):
    """Where the certificates an intercepted agent is shown come from (the local CA)."""

    def entry(self, host: str) -> certs.CertStoreEntry: ...

    @property
    def dhparams(self) -> certs.DHParams: ...


@dataclass(slots=True)
class Intercepted:
    """A tunnel this addon terminates TLS for."""

    host: str  # the name the agent's certificate is for (the tunnel's checked name)
    port: int
    refusal: Decision | None = None  # explain_https: every request is answered with it


@cache
def system_trust() -> tuple[str | None, str | None]:
    """The system's CA bundle (file, directory) as OpenSSL finds it (SSL_CERT_FILE and
    SSL_CERT_DIR apply), with certifi's bundle when the system has none; looked up once, not
    per upstream connection."""
    paths = ssl.get_default_verify_paths()
    cafile = paths.cafile if paths.cafile and os.path.isfile(paths.cafile) else None
    capath = paths.capath if paths.capath and os.path.isdir(paths.capath) else None
    if cafile is None and capath is None:
        return certifi.where(), None
    return cafile, capath


class _AfterHandshake(layer.Layer):
    """Builds the HTTP layer once the agent's TLS is up: its ALPN picks HTTP/1 or HTTP/2.
    Like mitmproxy's NextLayer, it steps out of the stack once it has built its layer."""

    def __init__(self, context: Any, build: Callable[[Any], layer.Layer]) -> None:
        super().__init__(context)
        self.context.layers.remove(self)
        self._build = build

    def handle_event(self, event: Any) -> layer.CommandGenerator[None]:  # type: ignore[override]
        child = self._build(self.context)
        self.handle_event = child.handle_event  # type: ignore[method-assign]
        self._handle_event = child.handle_event  # type: ignore[method-assign]
        yield from child.handle_event(event)

    def _handle_event(self, event: Any) -> layer.CommandGenerator[None]:  # pragma: no cover
        yield from self.handle_event(event)


class Interception:
    """Terminates TLS for marked tunnels; every other TLS handshake is refused."""

    def __init__(self, audit: AuditLog, pinning: UpstreamPinning,
                 policy: Callable[[], CompiledPolicy | None],
                 certificates: Callable[[], Certificates], *, explain_https: bool = False) -> None:
        self.audit = audit
        self.explain_https = explain_https  # serve --explain-https: whatever the policy says
        self.pinning = pinning
        self.policy = policy
        self.certificates = certificates  # the local CA, created on first use
        self._tunnels: dict[str, Intercepted] = {}  # client connection id -> its tunnel
        self._upstream_failures: dict[str, dict[str, http.Response]] = {}

    def http_connect(self, flow: http.HTTPFlow) -> None:
        """Mark an allowed tunnel whose host has request rules; with explain_https, turn a
        refused CONNECT into a tunnel where the refusal is told over TLS."""
        policy = self.policy()
        if policy is None or flow.error is not None:
            return
        client = flow.client_conn
        if flow.response is None:
            pin = self.pinning.tunnel(client)
            if pin is not None and flow.metadata.get(DECIDED) and policy.intercepts(
                    pin.name, pin.port):
                self._tunnels[client.id] = Intercepted(pin.name, pin.port)
            return
        refusal = flow.metadata.get(REFUSAL)
        explaining = self.explain_https or policy.settings.explain_https
        if (not explaining or not isinstance(refusal, Decision)
                or refusal.reason in _NOT_EXPLAINED or is_socks(client)):
            return  # (a SOCKS5 client is told by its reply code; it need not speak TLS)
        self._tunnels[client.id] = Intercepted(refusal.host, refusal.port, refusal)
        now = time.time()
        flow.response = http.Response(flow.request.data.http_version, 200,
                                      b"Connection established", http.Headers(), b"", None,
                                      now, now)

    def layers_for(self, context: Any, http_layer: Callable[[Any], layer.Layer]) -> layer.Layer:
        """The layers that replace the relay for a marked tunnel: TLS towards the origin
        (opened lazily, once a request is allowed), TLS towards the agent, then HTTP. A
        refusal being explained has no TLS towards the origin: nothing is sent upstream."""
        tunnel = self._tunnels[context.client.id]
        # Made outermost first: each layer files itself in context.layers, and the HTTP
        # streams find their HTTP layer as the one just before them.
        server_tls = layers.ServerTLSLayer(context) if tunnel.refusal is None else None
        client_tls = layers.ClientTLSLayer(context)
        client_tls.child_layer = _AfterHandshake(context, http_layer)
        if server_tls is None:
            return client_tls
        server_tls.child_layer = client_tls
        return server_tls

    def intercepted(self, client: connection.Client) -> Intercepted | None:
        return self._tunnels.get(client.id)

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        if data.context.client.id in self._tunnels:
            data.establish_server_tls_first = False  # the agent's request decides first

    def tls_start_client(self, tls_start: tls.TlsData) -> None:
        """TLS towards the agent: a certificate for the tunnel's host from the local CA."""
        tunnel = self._tunnels.get(tls_start.context.client.id)
        if tunnel is None or tls_start.ssl_conn is not None:
            return  # not ours: no TLS is set up, the handshake fails (closed)
        try:
            ca = self.certificates()
            entry = ca.entry(tunnel.host)
        except Exception as exc:  # an unusable CA directory: no TLS, the handshake fails
            logger.error("no certificate for %s: %s", tunnel.host, exc)
            self.audit.emit("tls.failed", client=client_text(tls_start.context.client),
                            side="agent", host=tunnel.host, port=tunnel.port,
                            detail=f"no certificate from the local CA: {exc}")
            return
        # Imported here, not at the top: mitmproxy.addons must be registered first
        # (proxy.master), or its package __init__ loads every default addon (Flask and all).
        from mitmproxy.addons.tlsconfig import AppData, alpn_select_callback

        ssl_ctx = net_tls.create_client_proxy_context(
            method=net_tls.Method.TLS_SERVER_METHOD,
            min_version=net_tls.DEFAULT_MIN_VERSION, max_version=net_tls.DEFAULT_MAX_VERSION,
            cipher_list=None, ecdh_curve=None, chain_file=entry.chain_file,
            alpn_select_callback=alpn_select_callback, request_client_cert=False,
            extra_chain_certs=tuple(entry.chain_certs[1:]) if entry.chain_file is None else (),
            dhparams=ca.dhparams)
        conn = SSL.Connection(ssl_ctx)
        conn.use_certificate(entry.cert.to_cryptography())
        conn.use_privatekey(entry.privatekey)
        conn.set_app_data(AppData(client_alpn=None, server_alpn=None, http2=True))
        conn.set_accept_state()
        tls_start.ssl_conn = conn

    def tls_start_server(self, tls_start: tls.TlsData) -> None:
        """TLS towards the origin: verified (system trust or network.upstream_ca_file), for
        the tunnel's name, never the address it was pinned to."""
        tunnel = self._tunnels.get(tls_start.context.client.id)
        if tunnel is None or tunnel.refusal is not None or tls_start.ssl_conn is not None:
            return
        server = tls_start.conn
        assert isinstance(server, connection.Server)
        server.sni = tunnel.host
        client = tls_start.context.client
        if not server.alpn_offers:
            server.alpn_offers = tuple(a for a in client.alpn_offers if a in HTTP_ALPNS)
        cafile, capath = self._upstream_trust()
        ssl_ctx = net_tls.create_proxy_server_context(
            method=net_tls.Method.TLS_CLIENT_METHOD,
            min_version=net_tls.DEFAULT_MIN_VERSION, max_version=net_tls.DEFAULT_MAX_VERSION,
            cipher_list=None, ecdh_curve=None, verify=net_tls.Verify.VERIFY_PEER,
            ca_path=capath, ca_pemfile=cafile, client_cert=None, legacy_server_connect=False)
        conn = SSL.Connection(ssl_ctx)
        _verify_name(conn, tunnel.host)
        if server.alpn_offers:
            conn.set_alpn_protos(list(server.alpn_offers))
        conn.set_connect_state()
        tls_start.ssl_conn = conn

    def _upstream_trust(self) -> tuple[str | None, str | None]:
        policy = self.policy()
        if policy is not None and policy.settings.upstream_ca_file:
            return str(policy.settings.upstream_ca_file), None
        return system_trust()

    def tls_failed_client(self, data: tls.TlsData) -> None:
        tunnel = self._tunnels.get(data.context.client.id)
        if tunnel is None:
            return
        self.audit.emit("tls.failed", client=client_text(data.context.client), side="agent",
                        host=tunnel.host, port=tunnel.port, detail=data.conn.error,
                        hint="the agent may not trust the agent-egress CA "
                             "(agent-egress ca path; docs/interception.md)")

    def tls_failed_server(self, data: tls.TlsData) -> None:
        """The origin's TLS failed (its certificate did not verify, most often): the request
        that asked for it is answered 502, with the reason, on the record."""
        tunnel = self._tunnels.get(data.context.client.id)
        if tunnel is None or not data.conn.error:
            return
        decision = Decision(Action.DENY, Reason.UPSTREAM_TLS_ERROR, tunnel.host, tunnel.port,
                            detail=f"TLS to {tunnel.host}:{tunnel.port} failed: "
                                   f"{data.conn.error}")
        failures = self._upstream_failures.setdefault(data.context.client.id, {})
        failures[data.conn.error] = blocked_response(decision)
        self.audit.emit("tls.failed", client=client_text(data.context.client), side="origin",
                        host=tunnel.host, port=tunnel.port, detail=data.conn.error)

    def upstream_failure(self, client: connection.Client, message: str) -> http.Response | None:
        """The response to send instead of mitmproxy's error page for this failure."""
        failures = self._upstream_failures.get(client.id)
        if not failures:
            return None
        return next((response for error, response in failures.items() if error in message),
                    None)

    def error(self, flow: http.HTTPFlow) -> None:
        if flow.error is None:
            return
        tunnel = self._tunnels.get(flow.client_conn.id)
        if tunnel is None or self.upstream_failure(flow.client_conn, flow.error.msg) is None:
            return
        decision = Decision(Action.DENY, Reason.UPSTREAM_TLS_ERROR, tunnel.host, tunnel.port,
                            detail=f"TLS to {tunnel.host}:{tunnel.port} failed: "
                                   f"{flow.error.msg}")
        self.audit.emit("request.failed", **request_fields(flow), **decision_fields(decision),
                        intercepted=True)

    def client_disconnected(self, client: connection.Client) -> None:
        self._tunnels.pop(client.id, None)
        self._upstream_failures.pop(client.id, None)


def _verify_name(conn: SSL.Connection, host: str) -> None:
    """Hostname (or IP address) verification of the origin's certificate, as mitmproxy's own
    TlsConfig sets it up: OpenSSL checks the name during the handshake."""
    param = SSL._lib.SSL_get0_param(conn._ssl)  # type: ignore[attr-defined]
    from mitmproxy.addons.tlsconfig import DEFAULT_HOSTFLAGS  # see tls_start_client

    SSL._lib.X509_VERIFY_PARAM_set_hostflags(param, DEFAULT_HOSTFLAGS)  # type: ignore[attr-defined]
    try:
        packed = ipaddress.ip_address(host).packed
    except ValueError:
        name = host.encode("ascii")
        conn.set_tlsext_host_name(name)
        ok = SSL._lib.X509_VERIFY_PARAM_set1_host(param, name, len(name))  # type: ignore[attr-defined]
    else:
        ok = SSL._lib.X509_VERIFY_PARAM_set1_ip(param, packed, len(packed))  # type: ignore[attr-defined]
    SSL._openssl_assert(ok == 1)  # type: ignore[attr-defined]


class ExplainedRefusals:
    """Answers each request in a tunnel kept open to explain its refusal (explain_https)
    with that refusal, before the enforcer would decide (or hold) the destination again."""

    def __init__(self, interception: Interception, audit: AuditLog,
                 discard_body: Callable[[http.Request], None]) -> None:
        self.interception = interception
        self.audit = audit
        self.discard_body = discard_body

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        tunnel = self.interception.intercepted(flow.client_conn)
        if tunnel is None or tunnel.refusal is None or flow.response is not None:
            return
        self.audit.emit("request.decided", **request_fields(flow),
                        **decision_fields(tunnel.refusal), intercepted=True, explained=True)
        flow.response = blocked_response(tunnel.refusal)
        flow.request.stream = False
        flow.request.headers.pop("expect", None)
        self.discard_body(flow.request)
