"""Address classification after DNS: never a real connection, only the pure functions."""

from __future__ import annotations

import ipaddress

import pytest
from agent_egress.policy import embedded_ipv4, non_public_reason, parse_policy

BLOCKED = [
    ("127.0.0.1", "loopback"),
    ("127.255.255.254", "loopback"),
    ("10.0.0.1", "private"),
    ("172.16.5.4", "private"),
    ("172.31.255.255", "private"),
    ("192.168.1.1", "private"),
    ("100.64.0.1", "shared"),
    ("100.127.255.254", "shared"),
    ("169.254.169.254", "metadata"),
    ("169.254.1.1", "link-local"),
    ("224.0.0.251", "multicast"),
    ("239.255.255.250", "multicast"),
    ("0.0.0.0", "unspecified"),
    ("255.255.255.255", "broadcast"),
    ("240.0.0.1", "reserved"),
    ("::1", "loopback"),
    ("::", "unspecified"),
    ("fd00::1", "ULA"),
    ("fc00::1", "ULA"),
    ("fe80::1", "link-local"),
    ("ff02::1", "multicast"),
    ("::ffff:127.0.0.1", "IPv4-mapped form of a loopback"),
    ("::ffff:169.254.169.254", "IPv4-mapped form of a link-local (cloud metadata"),
    ("::ffff:10.0.0.1", "IPv4-mapped form of a private"),
    ("64:ff9b::7f00:1", "NAT64 form of a loopback"),
    ("64:ff9b::a9fe:a9fe", "NAT64 form of a link-local (cloud metadata"),
    ("64:ff9b::a00:1", "NAT64 form of a private"),
    ("64:ff9b:1::1", "local-use NAT64"),
    ("::127.0.0.1", "IPv4-compatible form of a loopback"),
    ("::a9fe:a9fe", "IPv4-compatible form of a link-local"),
    ("2002:7f00:1::1", "6to4 form of a loopback"),
    ("2002:a9fe:a9fe::1", "6to4 form of a link-local"),
    # SIIT's IPv4-translated form (::ffff:0:0:0/96) and the local-use NAT64 prefix
    # (64:ff9b:1::/48, RFC 8215) reach the IPv4 address they carry.
    ("::ffff:0:7f00:1", "IPv4-translated form of a loopback"),
    ("::ffff:0:a9fe:a9fe", "IPv4-translated form of a link-local (cloud metadata"),
    ("::ffff:0:a00:1", "IPv4-translated form of a private"),
    ("64:ff9b:1::7f00:1", "local-use NAT64 form of a loopback"),
    ("64:ff9b:1::a9fe:a9fe", "local-use NAT64 form of a link-local (cloud metadata"),
]


@pytest.mark.parametrize("address, fragment", BLOCKED)
def test_non_public_addresses_are_named(address: str, fragment: str) -> None:
    reason = non_public_reason(ipaddress.ip_address(address))
    assert reason is not None
    assert fragment.lower() in reason.lower()


@pytest.mark.parametrize("address", [
    "8.8.8.8", "1.1.1.1", "151.101.0.223", "140.82.112.3",
    "2606:4700::1111", "2a00:1450:4001::200e", "::ffff:8.8.8.8", "64:ff9b::808:808",
    "2002:808:808::1",
])
def test_public_addresses_pass(address: str) -> None:
    assert non_public_reason(ipaddress.ip_address(address)) is None


def test_local_use_nat64_is_never_public() -> None:
    # An operator's own translator: whatever it carries, it is not a public upstream.
    assert non_public_reason(ipaddress.ip_address("64:ff9b:1::808:808")) == "local-use NAT64"


def test_siit_form_of_a_public_address_is_public() -> None:
    assert non_public_reason(ipaddress.ip_address("::ffff:0:808:808")) is None


@pytest.mark.parametrize("literal", [
    "203.0.113.7", "[::ffff:203.0.113.7]", "[::ffff:0:cb00:7107]", "[64:ff9b::cb00:7107]",
    "[64:ff9b:1::cb00:7107]", "[::cb00:7107]", "[2002:cb00:7107::1]",
])
def test_deny_cidr_rules_see_through_every_embedded_form(literal: str) -> None:
    policy = parse_policy('version = 1\n[network]\nallow_ip_literals = true\n'
                          'allow = ["0.0.0.0/0", "::/0"]\ndeny = ["203.0.113.0/24"]\n', "t.toml")
    decision = policy.decide(literal, 443)
    assert decision.action.value == "deny" and decision.reason.value == "denylist", literal


def test_embedded_ipv4_forms() -> None:
    assert embedded_ipv4(ipaddress.IPv6Address("::ffff:1.2.3.4")) == (
        "IPv4-mapped", ipaddress.IPv4Address("1.2.3.4"))
    assert embedded_ipv4(ipaddress.IPv6Address("64:ff9b::102:304"))[1] == ipaddress.IPv4Address(
        "1.2.3.4")
    assert embedded_ipv4(ipaddress.IPv6Address("::ffff:0:102:304")) == (
        "IPv4-translated", ipaddress.IPv4Address("1.2.3.4"))
    assert embedded_ipv4(ipaddress.IPv6Address("64:ff9b:1::102:304")) == (
        "local-use NAT64", ipaddress.IPv4Address("1.2.3.4"))
    assert embedded_ipv4(ipaddress.IPv6Address("2606:4700::1111")) is None


def _policy(block_private: bool = True, allowed_cidrs: str = "[]"):
    return parse_policy(f"version = 1\n[network]\nblock_private = "
                        f"{'true' if block_private else 'false'}\n"
                        f"allowed_cidrs = {allowed_cidrs}\n", "t.toml")


def test_any_blocked_address_refuses_the_upstream() -> None:
    policy = _policy()
    public, private = ipaddress.ip_address("8.8.8.8"), ipaddress.ip_address("10.1.2.3")
    assert policy.address_refusal([public]) is None
    refusal = policy.address_refusal([public, private])
    assert refusal is not None and "10.1.2.3" in refusal and "private" in refusal


def test_allowed_cidrs_are_exceptions_also_through_mapped_forms() -> None:
    policy = _policy(allowed_cidrs='["127.0.0.0/8"]')
    assert policy.address_refusal([ipaddress.ip_address("127.0.0.1")]) is None
    assert policy.address_refusal([ipaddress.ip_address("::ffff:127.0.0.1")]) is None
    assert policy.address_refusal([ipaddress.ip_address("169.254.169.254")]) is not None
    # NAT64 is another route to the address, not the same one: the exception does not carry.
    assert policy.address_refusal([ipaddress.ip_address("64:ff9b::7f00:1")]) is not None


def test_block_private_off_allows_everything() -> None:
    assert _policy(block_private=False).address_refusal(
        [ipaddress.ip_address("169.254.169.254")]) is None
