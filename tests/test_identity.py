"""Agent identity: proxy credentials and the [identity] address map."""

from __future__ import annotations

import base64
import ipaddress
import subprocess

from agent_egress.addons.identity import agent_from_credentials
from agent_egress.policy import parse_policy
from proxyproc import ProxyProcess


def basic(text: str) -> str:
    return "Basic " + base64.b64encode(text.encode()).decode()


def test_agent_from_credentials() -> None:
    assert agent_from_credentials(basic("codex-1:secret")) == "codex-1"
    assert agent_from_credentials(basic("aider")) == "aider"
    assert agent_from_credentials(basic(":only-password")) is None
    assert agent_from_credentials(basic("a b\x1b[2J:pw")) == "a b\x1b[2J"  # refused later
    assert agent_from_credentials("Bearer abc") is None
    assert agent_from_credentials("Basic !!!not-base64") is None


def test_identity_table_most_specific_network_wins() -> None:
    policy = parse_policy('version = 1\n[identity]\n"10.0.0.0/8" = "fleet"\n'
                          '"10.0.3.7" = "ci-bot"\n', "p.toml")
    assert policy.settings.agent_for(ipaddress.ip_address("10.0.3.7")) == "ci-bot"
    assert policy.settings.agent_for(ipaddress.ip_address("10.9.9.9")) == "fleet"
    assert policy.settings.agent_for(ipaddress.ip_address("::ffff:10.0.3.7")) == "ci-bot"
    assert policy.settings.agent_for(ipaddress.ip_address("192.0.2.1")) is None


def test_events_carry_the_agent(tmp_path, plain_origin, client_env) -> None:
    policy = (f'version = 1\n[network]\nallow = ["allowed.test"]\ndefault = "deny"\n'
              f'ports = [{plain_origin.port}]\nallowed_cidrs = ["127.0.0.0/8"]\n'
              '[resolve]\n"allowed.test" = "127.0.0.1"\n[identity]\n"127.0.0.1" = "local-agent"\n')
    process = ProxyProcess(tmp_path / "p", policy)
    try:
        url = f"http://allowed.test:{plain_origin.port}/hello"
        subprocess.run(["curl", "-sS", "-x", process.url, url], env=client_env,
                       capture_output=True, timeout=30)
        named = f"http://named-agent:pw@127.0.0.1:{process.port}"
        subprocess.run(["curl", "-sS", "-x", named, url], env=client_env, capture_output=True,
                       timeout=30)
    finally:
        process.stop()
    decided = process.events("request.decided")
    # The address the agent cannot choose names it; the name it gave itself is kept beside.
    assert [e.get("agent") for e in decided] == ["local-agent", "local-agent"]
    assert [e.get("agent_claimed") for e in decided] == [None, "named-agent"]
    assert b"pw@" not in process.audit_path.read_bytes()


def test_identity_names_follow_the_agent_name_rule() -> None:
    from agent_egress.policy import PolicyError

    try:
        parse_policy('version = 1\n[identity]\n"10.0.0.1" = "bad\\u001b[2Jname"\n', "p.toml")
    except PolicyError as exc:
        assert "letters, digits and . _ @ + - only" in str(exc)
        assert "p.toml:3: identity" in str(exc)
    else:
        raise AssertionError("an identity name with control characters was accepted")
