"""The common event fields, shaped in one place (addons/events.py)."""

from __future__ import annotations

from agent_egress.addons.events import address_text
from agent_egress.addons.telemetry import otel_attributes


def test_addresses_are_bracketed_for_ipv6() -> None:
    assert address_text(("127.0.0.1", 5000)) == "127.0.0.1:5000"
    assert address_text(("::1", 5000, 0, 0)) == "[::1]:5000"
    assert address_text(None) is None


def test_telemetry_reads_the_client_back_apart() -> None:
    for text, address in (("[2001:db8::1]:5000", "2001:db8::1"), ("10.0.0.1:5000", "10.0.0.1")):
        attributes = otel_attributes({"client": text})
        assert attributes["client.address"] == address and attributes["client.port"] == 5000
