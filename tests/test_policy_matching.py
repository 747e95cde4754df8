"""Table-driven tests of host normalisation, pattern matching and decisions (pure policy)."""

from __future__ import annotations

import pytest
from agent_egress.policy import (
    Action,
    InvalidHost,
    Reason,
    normalize_host,
    parse_policy,
    split_host_port,
)


def make_policy(allow: list[str], deny: list[str] = (), *, default: str = "deny",
                ports: tuple[int, ...] = (80, 443), ip_literals: bool = False):
    def toml_list(items) -> str:
        return "[" + ", ".join(f'"{item}"' for item in items) + "]"

    text = (f'version = 1\n[network]\ndefault = "{default}"\nallow = {toml_list(allow)}\n'
            f"deny = {toml_list(deny)}\nports = {list(ports)}\n"
            f"allow_ip_literals = {'true' if ip_literals else 'false'}\n")
    return parse_policy(text, "test.toml")


# --- normalisation -------------------------------------------------------------------------

@pytest.mark.parametrize("raw, expected", [
    ("example.com", "example.com"),
    ("EXAMPLE.COM", "example.com"),
    ("Example.Com.", "example.com"),
    ("  example.com ", "example.com"),
    ("münchen.de", "xn--mnchen-3ya.de"),
    ("MÜNCHEN.DE", "xn--mnchen-3ya.de"),
    ("xn--mnchen-3ya.de", "xn--mnchen-3ya.de"),
    ("XN--MNCHEN-3YA.DE", "xn--mnchen-3ya.de"),
    ("ｅｘａｍｐｌｅ。com", "example.com"),  # full-width letters, ideographic full stop
    ("аpple.com", "xn--pple-43d.com"),  # Cyrillic 'а': a homograph, not apple.com
    ("_acme-challenge.example.com", "_acme-challenge.example.com"),
    ("a-b.example.com", "a-b.example.com"),
])
def test_normalize_names(raw: str, expected: str) -> None:
    host = normalize_host(raw)
    assert host.name == expected
    assert not host.is_ip


@pytest.mark.parametrize("raw, expected", [
    ("127.0.0.1", "127.0.0.1"),
    ("127.1", "127.0.0.1"),
    ("127.0.1", "127.0.0.1"),
    ("2130706433", "127.0.0.1"),
    ("0x7f000001", "127.0.0.1"),
    ("0x7f.0.0.1", "127.0.0.1"),
    ("0X7F.1", "127.0.0.1"),
    ("0177.0.0.1", "127.0.0.1"),
    ("017700000001", "127.0.0.1"),
    ("127.0.0.1.", "127.0.0.1"),
    ("１２７.０.０.１", "127.0.0.1"),  # full-width digits
    ("169.254.169.254", "169.254.169.254"),
    ("0xa9.0xfe.0xa9.0xfe", "169.254.169.254"),
    ("2852039166", "169.254.169.254"),
    ("10.1", "10.0.0.1"),
    ("0", "0.0.0.0"),
    ("0x", "0.0.0.0"),
    ("[::1]", "::1"),
    ("::1", "::1"),
    ("[::ffff:127.0.0.1]", "::ffff:7f00:1"),
    ("[0:0:0:0:0:ffff:7f00:1]", "::ffff:7f00:1"),
    ("[fe80::1%eth0]", "fe80::1"),
    ("[64:ff9b::a9fe:a9fe]", "64:ff9b::a9fe:a9fe"),
])
def test_normalize_ip_spellings(raw: str, expected: str) -> None:
    host = normalize_host(raw)
    assert host.is_ip
    assert host.name == expected


@pytest.mark.parametrize("raw", [
    "", ".", "..", "a..b", "exa mple.com", "example.com..", "ex%61mple.com", "example.com/",
    "1.2.3.4.5", "256.1.1.1", "1.2.3.0x100", "08.1.1.1", "[::1", "[not-ip]",
    "a" * 64 + ".com", "user@example.com", "-", "xn--zz.com",
])
def test_invalid_hosts_are_rejected(raw: str) -> None:
    with pytest.raises(InvalidHost):
        normalize_host(raw)


# --- matching -------------------------------------------------------------------------------

MATCH_CASES = [
    # pattern, host, port, matches
    ("example.com", "example.com", 443, True),
    ("example.com", "EXAMPLE.com.", 443, True),
    ("example.com", "www.example.com", 443, False),
    ("example.com", "example.com.evil.com", 443, False),
    ("example.com", "evilexample.com", 443, False),
    ("example.com", "example.co", 443, False),
    ("example.com", "example.comm", 443, False),
    ("*.example.com", "a.example.com", 443, True),
    ("*.example.com", "a.b.c.example.com", 443, True),
    ("*.example.com", "example.com", 443, False),
    ("*.example.com", "evilexample.com", 443, False),
    ("*.example.com", "a.example.com.evil.com", 443, False),
    ("**.example.com", "example.com", 443, True),
    ("**.example.com", "x.example.com", 443, True),
    ("**.example.com", "x.y.example.com", 443, True),
    ("**.example.com", "xexample.com", 443, False),
    ("region*.example.com", "region1.example.com", 443, True),
    ("region*.example.com", "region.example.com", 443, True),
    ("region*.example.com", "regional-east.example.com", 443, True),
    ("region*.example.com", "a.region1.example.com", 443, False),
    ("region*.example.com", "xregion1.example.com", 443, False),
    ("region*.example.com", "region1.x.example.com", 443, False),
    ("*-api.example.com", "eu-api.example.com", 443, True),
    ("*-api.example.com", "eu-api2.example.com", 443, False),
    ("api.*.example.com", "api.eu.example.com", 443, True),
    ("api.*.example.com", "api.eu.x.example.com", 443, False),
    ("*.region*.example.com", "a.region2.example.com", 443, True),
    ("*.region*.example.com", "region2.example.com", 443, False),
    ("*", "anything.test", 443, True),
    ("*", "localhost", 443, True),
    ("example.com:8443", "example.com", 8443, True),
    ("example.com:8443", "example.com", 443, False),
    ("*.example.com:8443", "a.example.com", 8443, True),
    ("*.example.com:8443", "a.example.com", 443, False),
    ("münchen.de", "xn--mnchen-3ya.de", 443, True),
    ("xn--mnchen-3ya.de", "münchen.de", 443, True),
    ("*.münchen.de", "www.MÜNCHEN.de", 443, True),
    ("apple.com", "аpple.com", 443, False),  # Cyrillic homograph
    ("apple.com", "xn--pple-43d.com", 443, False),
    ("Example.COM.", "example.com", 443, True),
    ("localhost", "localhost", 80, True),
    ("localhost", "localhost.", 80, True),
]


@pytest.mark.parametrize("pattern, host, port, matches", MATCH_CASES)
def test_pattern_matching(pattern: str, host: str, port: int, matches: bool) -> None:
    policy = make_policy([pattern], ports=(80, 443, 8443))
    decision = policy.decide(host, port)
    assert (decision.action is Action.ALLOW) is matches, decision
    if matches:
        assert decision.rule is not None and decision.rule.text == pattern


CIDR_CASES = [
    ("203.0.113.0/24", "203.0.113.7", True),
    ("203.0.113.0/24", "203.0.114.7", False),
    ("203.0.113.0/24", "0xcb.0.0x71.7", True),
    ("203.0.113.0/24", "3405803783", True),
    ("203.0.113.0/24", "[::ffff:203.0.113.7]", True),
    ("203.0.113.7", "203.0.113.7", True),
    ("203.0.113.7", "203.0.113.8", False),
    ("2001:db8::/32", "[2001:db8::1]", True),
    ("2001:db8::/32", "[2001:db9::1]", False),
    ("0.0.0.0/0", "198.51.100.1", True),
]


@pytest.mark.parametrize("pattern, host, matches", CIDR_CASES)
def test_cidr_rules_match_ip_literals(pattern: str, host: str, matches: bool) -> None:
    policy = make_policy([pattern], ip_literals=True)
    assert (policy.decide(host, 443).action is Action.ALLOW) is matches


def test_cidr_rules_never_match_names_and_names_never_match_ips() -> None:
    policy = make_policy(["127.0.0.0/8", "*", "localhost"], ip_literals=False)
    assert policy.decide("localhost", 443).action is Action.ALLOW
    decision = policy.decide("127.0.0.1", 443)
    assert decision.action is Action.DENY and decision.reason is Reason.IP_LITERAL
    with_literals = make_policy(["*"], ip_literals=True)
    assert with_literals.decide("127.0.0.1", 443).reason is Reason.IP_LITERAL


# --- decisions ------------------------------------------------------------------------------

DECISION_CASES = [
    # allow, deny, default, host, port, action, reason
    (["**.example.com"], ["secret.example.com"], "deny", "secret.example.com", 443,
     "deny", "denylist"),
    (["**.example.com"], ["*.internal.example.com"], "deny", "a.internal.example.com", 443,
     "deny", "denylist"),
    (["**.example.com"], ["*.internal.example.com"], "deny", "internal.example.com", 443,
     "allow", "allowlist"),
    (["*"], ["*.pastebin.com"], "deny", "x.pastebin.com", 443, "deny", "denylist"),
    (["*"], ["evil.com:8443"], "deny", "evil.com", 443, "allow", "allowlist"),
    (["example.com"], [], "deny", "other.com", 443, "deny", "not_allowlisted"),
    (["example.com"], [], "ask", "other.com", 443, "ask", "needs_approval"),
    (["example.com"], [], "allow", "other.com", 443, "allow", "default"),
    (["example.com"], [], "allow", "other.com", 22, "deny", "port_not_allowed"),
    (["example.com"], [], "deny", "example.com", 8080, "deny", "port_not_allowed"),
    (["example.com:8080"], [], "deny", "example.com", 8080, "allow", "allowlist"),
    (["example.com"], ["example.com"], "allow", "example.com", 443, "deny", "denylist"),
    (["example.com"], [], "allow", "exa mple.com", 443, "deny", "invalid_host"),
    (["example.com"], [], "allow", "127.0.0.1", 443, "deny", "ip_literal"),
    (["example.com"], [], "allow", "169.254.169.254", 80, "deny", "ip_literal"),
    (["example.com"], [], "allow", "[::ffff:169.254.169.254]", 80, "deny", "ip_literal"),
    (["example.com"], [], "allow", "[64:ff9b::a9fe:a9fe]", 80, "deny", "ip_literal"),
    (["example.com"], [], "allow", "[::a9fe:a9fe]", 80, "deny", "ip_literal"),
    (["example.com"], [], "allow", "0251.0376.0251.0376", 80, "deny", "ip_literal"),
]


@pytest.mark.parametrize("allow, deny, default, host, port, action, reason", DECISION_CASES)
def test_decisions(allow, deny, default, host, port, action, reason) -> None:
    policy = make_policy(allow, deny, default=default)
    decision = policy.decide(host, port)
    assert (decision.action.value, decision.reason.value) == (action, reason)


def test_most_specific_rule_is_reported() -> None:
    policy = make_policy(["*", "**.example.com", "*.api.example.com", "v1.api.example.com"])
    assert policy.decide("v1.api.example.com", 443).rule.text == "v1.api.example.com"
    assert policy.decide("v2.api.example.com", 443).rule.text == "*.api.example.com"
    assert policy.decide("www.example.com", 443).rule.text == "**.example.com"
    assert policy.decide("other.org", 443).rule.text == "*"


def test_decisions_are_cached_but_correct_per_port() -> None:
    policy = make_policy(["example.com:8443"], ports=(443,))
    assert policy.decide("example.com", 8443).action is Action.ALLOW
    assert policy.decide("example.com", 443).action is Action.DENY
    assert policy.decide("example.com", 8443).action is Action.ALLOW


@pytest.mark.parametrize("target", ["a.test:²", "a.test:٤٤٣", "a.test:４４３", "a.test:+443",
                                    "a.test:0", "a.test:65536", "a.test:", "[::1]:²"])
def test_ports_are_ascii_digits_in_range(target: str) -> None:
    with pytest.raises(InvalidHost):
        split_host_port(target)


@pytest.mark.parametrize(("allow", "deny", "host", "port", "rule"), [
    (["github.com:22"], [], "github.com", 22, "github.com:22"),  # the rule names the port
    (["github.com:22"], [], "GitHub.com.", 22, "github.com:22"),  # any spelling of the name
    (["github.com"], [], "github.com", 22, None),  # a name alone allows TLS and HTTP only
    (["*.corp.test:5432"], [], "db.corp.test", 5432, "*.corp.test:5432"),
    (["github.com:22", "github.com"], [], "github.com", 443, None),  # another port
    (["github.com:22"], ["github.com"], "github.com", 22, None),  # denied: nothing at all
    (["10.0.0.0/8"], [], "10.1.2.3", 5432, None),  # CIDR rules name no port: raw_tcp only
])
def test_raw_tcp_needs_an_allow_rule_that_names_the_port(allow, deny, host, port, rule) -> None:
    policy = make_policy(allow, deny, ports=(22, 443, 5432), ip_literals=True)
    found = policy.raw_tcp_rule(host, port)
    assert (found.text if found is not None else None) == rule
