"""The tunnel addon's layer choice, driven directly with mitmproxy's own objects."""

from __future__ import annotations

import collections
import contextlib
import ssl
import struct

from agent_egress.addons.intercept import Interception
from agent_egress.addons.pinning import UpstreamPinning
from agent_egress.addons.relay import CloseClient, CountingPassthrough, Tunnel
from agent_egress.addons.tunnels import Tunnels
from agent_egress.policy import parse_policy
from mitmproxy import options
from mitmproxy.proxy import commands, events, layer, layers
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers import modes
from mitmproxy.proxy.layers.http import HTTPMode, HttpStream
from mitmproxy.test import tflow


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict]] = []

    def emit(self, event: str, **fields) -> None:
        self.events.append((event, fields))


def client_hello(server_name: str) -> bytes:
    """A real ClientHello, as Python's ssl module sends it."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname=server_name)
    with contextlib.suppress(ssl.SSLWantReadError):  # it waits for the server's answer
        tls.do_handshake()
    return outgoing.read()


def tunnel_next_layer(*chunks: bytes) -> layer.NextLayer:
    """A tunnel's NextLayer as mitmproxy builds it after a CONNECT, with bytes received."""
    context = Context(tflow.tclient_conn(), options.Options())
    context.server.address = ("127.0.0.1", 443)
    modes.HttpProxy(context)
    layers.HttpLayer(context, HTTPMode.regular)
    HttpStream(context, 1)
    nextlayer = layer.NextLayer(context)
    nextlayer.events.extend(events.DataReceived(context.client, chunk) for chunk in chunks)
    return nextlayer


def tunnels_with(nextlayer: layer.NextLayer, policy_text: str = "version = 1\n"
                 ) -> tuple[Tunnels, Recorder]:
    audit = Recorder()
    policy = parse_policy(policy_text, "p.toml")
    pinning = UpstreamPinning()
    interception = Interception(audit, pinning, lambda: policy,  # type: ignore[arg-type]
                                lambda: None)  # type: ignore[arg-type,return-value]
    tunnels = Tunnels(audit, pinning, lambda: policy,  # type: ignore[arg-type]
                      lambda context: layers.HttpLayer(context, HTTPMode.transparent),
                      interception)
    tunnels._tunnels[nextlayer.context.client.id] = Tunnel(("127.0.0.1", 1), "allowed.test", 443)
    return tunnels, audit


def test_matching_sni_passes_through() -> None:
    nextlayer = tunnel_next_layer(client_hello("Allowed.Test."))
    tunnels, audit = tunnels_with(nextlayer)
    tunnels.next_layer(nextlayer)
    assert isinstance(nextlayer.layer, CountingPassthrough)
    assert nextlayer.context.layers[-1] is nextlayer.layer
    assert audit.events == []


def test_mismatching_sni_closes_and_is_recorded() -> None:
    nextlayer = tunnel_next_layer(client_hello("evil.test"))
    tunnels, audit = tunnels_with(nextlayer)
    tunnels.next_layer(nextlayer)
    assert isinstance(nextlayer.layer, CloseClient)
    ((name, fields),) = audit.events
    assert name == "request.decided" and fields["reason"] == "sni_mismatch"
    assert fields["sni"] == "evil.test" and fields["host"] == "allowed.test"


def test_partial_client_hello_waits_for_more() -> None:
    hello = client_hello("allowed.test")
    for cut in (1, 2, 3, 5, 20, len(hello) - 1):
        nextlayer = tunnel_next_layer(hello[:cut])
        tunnels, audit = tunnels_with(nextlayer)
        tunnels.next_layer(nextlayer)
        assert nextlayer.layer is None, cut
        assert audit.events == []


def test_plain_http_goes_to_the_http_layer_raw_tcp_only_where_listed() -> None:
    nextlayer = tunnel_next_layer(b"GET / HTTP/1.1\r\n")
    tunnels, _ = tunnels_with(nextlayer)
    tunnels.next_layer(nextlayer)
    assert isinstance(nextlayer.layer, layers.HttpLayer)
    nextlayer = tunnel_next_layer(b"SSH-2.0-OpenSSH_9.2\r\n")
    tunnels, audit = tunnels_with(nextlayer)
    tunnels.next_layer(nextlayer)
    assert isinstance(nextlayer.layer, CloseClient)
    assert audit.events[0][1]["reason"] == "tunnel_protocol"
    nextlayer = tunnel_next_layer(b"SSH-2.0-OpenSSH_9.2\r\n")
    tunnels, audit = tunnels_with(
        nextlayer, 'version = 1\n[network]\nraw_tcp = ["allowed.test:443"]\n')
    tunnels.next_layer(nextlayer)
    assert isinstance(nextlayer.layer, CountingPassthrough) and audit.events == []


def test_bytes_in_a_tunnel_nobody_decided_are_never_relayed() -> None:
    nextlayer = tunnel_next_layer(client_hello("allowed.test"))
    tunnels, audit = tunnels_with(nextlayer)
    tunnels._tunnels.clear()
    tunnels.next_layer(nextlayer)
    assert isinstance(nextlayer.layer, CloseClient)
    assert audit.events[0][1]["reason"] == "internal_error"


def test_relay_replays_what_arrived_while_its_upstream_opened() -> None:
    context = Context(tflow.tclient_conn(), options.Options())
    context.server.address = ("192.0.2.10", 443)
    tunnel = Tunnel(("127.0.0.1", 1), "allowed.test", 443)
    relay = CountingPassthrough(context, tunnel)
    assert not isinstance(relay._paused_event_queue, collections.deque)  # the small queue
    (opening,) = relay.handle_event(events.Start())
    assert isinstance(opening, commands.OpenConnection)
    assert list(relay.handle_event(events.DataReceived(context.client, b"first"))) == []
    assert list(relay.handle_event(events.DataReceived(context.client, b"second"))) == []
    sent = list(relay.handle_event(events.OpenConnectionCompleted(opening, None)))
    assert [(type(c), c.connection, c.data) for c in sent] == [
        (commands.SendData, context.server, b"first"),
        (commands.SendData, context.server, b"second")]
    (answer,) = relay.handle_event(events.DataReceived(context.server, b"answer"))
    assert (type(answer), answer.connection, answer.data) == (
        commands.SendData, context.client, b"answer")
    assert (tunnel.bytes_up, tunnel.bytes_down) == (11, 6)


def _hello_with_ech() -> bytes:
    from rawclient import handmade_client_hello, record, server_name_extension

    ech = struct.pack("!HH", 0xFE0D, 8) + b"\x00" * 8
    return record(0x16, handmade_client_hello(server_name_extension(b"allowed.test"), ech))


def test_encrypted_client_hello_is_refused_unless_the_policy_allows_it() -> None:
    nextlayer = tunnel_next_layer(_hello_with_ech())
    tunnels, audit = tunnels_with(nextlayer)
    tunnels.next_layer(nextlayer)
    assert isinstance(nextlayer.layer, CloseClient)
    assert "encrypted ClientHello (ECH)" in audit.events[0][1]["detail"]
    nextlayer = tunnel_next_layer(_hello_with_ech())
    tunnels, audit = tunnels_with(nextlayer, "version = 1\n[network]\nallow_ech = true\n")
    tunnels.next_layer(nextlayer)
    assert isinstance(nextlayer.layer, CountingPassthrough) and audit.events == []
    tunnels.client_disconnected(nextlayer.context.client)
    assert audit.events[0][1]["ech"] is True  # on the record even when allowed
