"""UpstreamPinning's bookkeeping, driven with mitmproxy's own connection objects."""

from __future__ import annotations

from agent_egress.addons.pinning import UpstreamPinning
from mitmproxy import connection
from mitmproxy.proxy import server_hooks
from mitmproxy.test import tflow


def connect_hook(client: connection.Client, host: str, port: int
                 ) -> server_hooks.ServerConnectionHookData:
    server = connection.Server(address=(host, port))
    return server_hooks.ServerConnectionHookData(server=server, client=client)


def test_pins_are_per_client_and_per_host_and_port() -> None:
    pinning, client, other = UpstreamPinning(), tflow.tclient_conn(), tflow.tclient_conn()
    pinning.pin(client, "Example.COM.", 443, "192.0.2.10")
    pinning.pin(client, "example.com", 80, "192.0.2.11")
    pinning.pin(client, "api.example.com", 443, "2001:db8::1")
    assert pinning.pinned(client, "example.com", 443) == "192.0.2.10"
    assert pinning.pinned(client, "EXAMPLE.com.", 80) == "192.0.2.11"
    assert pinning.pinned(client, "api.example.com", 443) == "2001:db8::1"
    assert pinning.pinned(client, "example.com", 8443) is None
    assert pinning.pinned(other, "example.com", 443) is None
    assert pinning.name_for(client, "192.0.2.10", 443) == "example.com"
    assert pinning.name_for(client, "2001:db8::1", 443) == "api.example.com"
    assert pinning.name_for(client, "192.0.2.10", 80) is None
    assert pinning.name_for(other, "192.0.2.10", 443) is None


def test_the_newest_pin_for_a_destination_is_the_one_used() -> None:
    pinning, client = UpstreamPinning(), tflow.tclient_conn()
    pinning.pin(client, "example.com", 443, "192.0.2.10")
    pinning.pin(client, "example.com", 443, "192.0.2.20")
    assert pinning.pinned(client, "example.com", 443) == "192.0.2.20"
    assert [pin.address for pin in pinning._pins[client.id].chain()] == [
        "192.0.2.20", "192.0.2.10"]


def test_only_pinned_upstreams_may_connect_and_pins_end_with_the_client() -> None:
    pinning, client = UpstreamPinning(), tflow.tclient_conn()
    pinning.pin(client, "example.com", 443, "192.0.2.10")
    allowed = connect_hook(client, "192.0.2.10", 443)
    pinning.server_connect(allowed)
    assert allowed.server.error is None
    for host, port in (("192.0.2.99", 443), ("192.0.2.10", 8443), ("example.com", 443)):
        refused = connect_hook(client, host, port)
        pinning.server_connect(refused)
        assert refused.server.error == "agent-egress: no policy decision pinned this upstream"
    pinning.client_disconnected(client)
    assert pinning.pinned(client, "example.com", 443) is None
    again = connect_hook(client, "192.0.2.10", 443)
    pinning.server_connect(again)
    assert again.server.error is not None
