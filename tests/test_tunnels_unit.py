"""The tunnel addon's layer choice, driven directly with mitmproxy's own objects."""

from __future__ import annotations

import collections
import contextlib
import ssl

from agent_egress.addons.pinning import UpstreamPinning
from agent_egress.addons.tunnels import CloseClient, CountingPassthrough, Tunnel, Tunnels
from mitmproxy import options
from mitmproxy.proxy import commands, events, layer, layers
from mitmproxy.proxy.context import Context
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


def next_layer_after_mitmproxy(hello: bytes) -> layer.NextLayer:
    """The state mitmproxy's own NextLayer addon leaves: TLS layers for a ClientHello."""
    context = Context(tflow.tclient_conn(), options.Options())
    context.server.address = ("allowed.test", 443)
    nextlayer = layer.NextLayer(context)
    nextlayer.events.append(events.DataReceived(context.client, hello))
    server_tls = layers.ServerTLSLayer(context)
    server_tls.child_layer = layers.ClientTLSLayer(context)
    nextlayer.layer = server_tls
    return nextlayer


def tunnels_with(nextlayer: layer.NextLayer) -> tuple[Tunnels, Recorder]:
    audit = Recorder()
    tunnels = Tunnels(audit, UpstreamPinning())  # type: ignore[arg-type]
    tunnels._tunnels[nextlayer.context.client.id] = Tunnel(("127.0.0.1", 1), "allowed.test", 443)
    return tunnels, audit


def test_matching_sni_passes_through_and_drops_the_tls_layers() -> None:
    nextlayer = next_layer_after_mitmproxy(client_hello("Allowed.Test."))
    discarded = [nextlayer.layer, nextlayer.layer.child_layer]
    tunnels, audit = tunnels_with(nextlayer)
    tunnels.next_layer(nextlayer)
    assert isinstance(nextlayer.layer, CountingPassthrough)
    assert not any(d in nextlayer.context.layers for d in discarded)
    assert nextlayer.context.layers[-1] is nextlayer.layer
    assert audit.events == []


def test_mismatching_sni_closes_and_is_recorded() -> None:
    nextlayer = next_layer_after_mitmproxy(client_hello("evil.test"))
    tunnels, audit = tunnels_with(nextlayer)
    tunnels.next_layer(nextlayer)
    assert isinstance(nextlayer.layer, CloseClient)
    ((name, fields),) = audit.events
    assert name == "request.decided" and fields["reason"] == "sni_mismatch"
    assert fields["sni"] == "evil.test" and fields["host"] == "allowed.test"


def test_partial_client_hello_waits_for_more() -> None:
    hello = client_hello("allowed.test")
    nextlayer = next_layer_after_mitmproxy(hello[:20])
    tunnels, _ = tunnels_with(nextlayer)
    tunnels.next_layer(nextlayer)
    assert nextlayer.layer is None
    assert [type(x) for x in nextlayer.context.layers] == []


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
