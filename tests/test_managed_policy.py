"""Layering: managed policy over user policy, requirements, presets (pure policy functions)."""

from __future__ import annotations

import pytest
from agent_egress.policy import Action, PolicyError
from agent_egress.policy.layering import compile_layers
from agent_egress.policy.loader import parse_policy_text


def layered(managed: str | None, user: str):
    managed_file = parse_policy_text("version = 1\n" + managed, "managed.toml") if (
        managed is not None) else None
    return compile_layers(parse_policy_text("version = 1\n" + user, "user.toml"),
                          managed_file, {})


def net(allow=(), deny=(), extra: str = "") -> str:
    def toml_list(items) -> str:
        return "[" + ", ".join(f'"{i}"' for i in items) + "]"

    return f"[network]\nallow = {toml_list(allow)}\ndeny = {toml_list(deny)}\n{extra}\n"


PRECEDENCE = [
    # managed allow, managed deny, user allow, user deny, host, action, layer, reason
    ((), ["evil.com"], ["evil.com"], (), "evil.com", "deny", "managed", "denylist"),
    ((), ["**.evil.com"], ["*"], (), "x.evil.com", "deny", "managed", "denylist"),
    (["ok.com"], (), (), ["ok.com"], "ok.com", "deny", "user", "denylist"),
    (["**.corp.com"], (), (), ["secret.corp.com"], "secret.corp.com", "deny", "user",
     "denylist"),
    (["**.corp.com"], (), (), ["secret.corp.com"], "www.corp.com", "allow", "managed",
     "allowlist"),
    (["ok.com"], (), ["ok.com"], (), "ok.com", "allow", "managed", "allowlist"),
    ((), (), ["mine.com"], (), "mine.com", "allow", "user", "allowlist"),
    ((), (), (), (), "other.com", "ask", "", "needs_approval"),
    ((), ["*.evil.com"], (), ["other.com"], "a.evil.com", "deny", "managed", "denylist"),
]


@pytest.mark.parametrize("m_allow, m_deny, u_allow, u_deny, host, action, layer, reason",
                         PRECEDENCE)
def test_precedence(m_allow, m_deny, u_allow, u_deny, host, action, layer, reason) -> None:
    policy = layered(net(m_allow, m_deny), net(u_allow, u_deny))
    decision = policy.decide(host, 443)
    assert (decision.action.value, decision.layer, decision.reason.value) == (
        action, layer, reason)


def test_without_managed_layer_user_rules_decide() -> None:
    policy = layered(None, net(["a.com"], ["b.com"]))
    assert [layer.name for layer in policy.layers] == ["user"]
    assert policy.decide("a.com", 443).layer == "user"


def test_allowlist_expansion_false_drops_uncovered_user_allows() -> None:
    managed = net(["**.corp.com", "pypi.org"]) + "[requirements]\nallowlist_expansion = false\n"
    policy = layered(managed, net(["api.corp.com", "*.eu.corp.com", "pypi.org", "evil.com",
                                   "*.com", "*"]))
    assert policy.decide("api.corp.com", 443).action is Action.ALLOW
    assert policy.decide("evil.com", 443).action is Action.ASK
    assert policy.decide("anything.net", 443).action is Action.ASK
    messages = "\n".join(policy.problems)
    for dropped in ("'evil.com'", "'*.com'", "'*'"):
        assert f"allow rule {dropped} reaches beyond the managed allowlist" in messages
    assert "requirement allowlist_expansion = false in managed.toml" in messages
    assert "'api.corp.com'" not in messages and "'pypi.org'" not in messages


def test_managed_allowed_domains_only_denies_outright() -> None:
    managed = net(["pypi.org"]) + "[requirements]\nmanaged_allowed_domains_only = true\n"
    policy = layered(managed, net(["mine.com"], extra='default = "allow"'))
    assert policy.decide("pypi.org", 443).action is Action.ALLOW
    decision = policy.decide("mine.com", 443)
    assert decision.action is Action.DENY  # never asked about
    assert "managed_allowed_domains_only" in decision.detail


@pytest.mark.parametrize("user_default, floor, effective, violated", [
    ("allow", "ask", "ask", True),
    ("allow", "deny", "deny", True),
    ("ask", "ask", "ask", False),
    ("deny", "ask", "deny", False),  # stricter is fine
])
def test_default_floor(user_default, floor, effective, violated) -> None:
    policy = layered(f'[requirements]\ndefault_floor = "{floor}"\n',
                     f'[network]\ndefault = "{user_default}"\n')
    assert policy.settings.default.value == effective
    assert bool(policy.problems) is violated


def test_managed_default_cannot_be_loosened_but_can_be_tightened() -> None:
    assert layered('[network]\ndefault = "ask"\n', '[network]\ndefault = "allow"\n'
                   ).settings.default is Action.ASK
    assert layered('[network]\ndefault = "ask"\n', '[network]\ndefault = "deny"\n'
                   ).settings.default is Action.DENY
    assert layered('[network]\ndefault = "deny"\n', "").settings.default is Action.DENY


def test_allowed_ports() -> None:
    policy = layered("[requirements]\nallowed_ports = [443]\n",
                     net(["a.com:8443"], extra="ports = [80, 443, 22]"))
    assert policy.settings.ports == frozenset({443})
    assert policy.decide("a.com", 8443).action is not Action.ALLOW
    messages = "\n".join(policy.problems)
    assert "ports [22, 80] are not allowed (requirement allowed_ports" in messages
    assert "allow rule 'a.com:8443' names port 8443" in messages


@pytest.mark.parametrize("allowed, user_mode, effective, violated", [
    ('["enforce"]', "audit", "enforce", True),
    ('["enforce", "audit"]', "audit", "audit", False),
    ('["audit"]', "enforce", "audit", True),
])
def test_allowed_modes(allowed, user_mode, effective, violated) -> None:
    policy = layered(f"[requirements]\nallowed_modes = {allowed}\n", f'mode = "{user_mode}"\n')
    assert policy.settings.mode == effective
    assert bool(policy.problems) is violated
    if violated:
        assert "requirement allowed_modes in managed.toml" in policy.problems[0]


def test_managed_enforce_mode_cannot_be_switched_to_audit() -> None:
    policy = layered('mode = "enforce"\n', 'mode = "audit"\n')
    assert policy.settings.mode == "enforce"
    assert "audit mode is not allowed here" in policy.problems[0]


def test_approval_scopes_and_telemetry_requirements() -> None:
    policy = layered('[requirements]\nallowed_approval_scopes = ["once", "session"]\n'
                     "telemetry_required = true\n", "")
    assert policy.settings.approval_scopes == frozenset({"once", "session"})
    assert policy.settings.telemetry_required


def test_settings_only_tighten() -> None:
    managed = ("[network]\nallow_ip_literals = false\nblock_private = true\n"
               'allowed_cidrs = ["10.1.0.0/16"]\nports = [443]\n')
    user = ('[network]\nallow_ip_literals = true\nblock_private = false\n'
            'allowed_cidrs = ["10.1.2.0/24", "192.168.0.0/16"]\nports = [443, 8080]\n'
            '[resolve]\n"pypi.org" = "10.1.2.3"\n')
    policy = layered(managed, user)
    settings = policy.settings
    assert not settings.allow_ip_literals and settings.block_private
    assert [str(c) for c in settings.allowed_cidrs] == ["10.1.0.0/16", "10.1.2.0/24"]
    assert settings.ports == frozenset({443})
    assert settings.resolve == {}
    assert len(policy.problems) == 5


def test_managed_ports_bound_port_specific_user_rules() -> None:
    policy = layered("[network]\nports = [443]\n",
                     net(["evil.example:22", "ok.example:443", "ok.example"],
                         extra='raw_tcp = ["evil.example:22"]'))
    assert policy.decide("evil.example", 22).action is Action.DENY
    assert policy.decide("evil.example", 22).reason.value == "port_not_allowed"
    assert policy.raw_tcp_rule("evil.example", 22) is None
    assert policy.decide("ok.example", 443).action is Action.ALLOW
    messages = "\n".join(policy.problems)
    assert "allow rule 'evil.example:22' names port 22, which is not in the managed" in messages
    assert "raw_tcp rule 'evil.example:22' names port 22" in messages


def test_managed_port_rules_still_apply() -> None:
    policy = layered(net(["ssh.corp.example:22"], extra="ports = [443]"), "")
    assert policy.decide("ssh.corp.example", 22).action is Action.ALLOW


@pytest.mark.parametrize("managed", ["", "[network]\ndefault = \"deny\"\n"])
def test_managed_security_defaults_bind_when_not_written(managed: str) -> None:
    user = ('[network]\nallow_ip_literals = true\nblock_private = false\n'
            'allow = ["203.0.113.0/24"]\nallowed_cidrs = ["10.0.0.0/8"]\n')
    policy = layered(managed, user)
    assert not policy.settings.allow_ip_literals and policy.settings.block_private
    assert policy.settings.allowed_cidrs == ()
    assert policy.decide("203.0.113.5", 443).reason.value == "ip_literal"
    messages = "\n".join(policy.problems)
    assert "IP literals are not allowed" in messages
    assert "private upstreams stay blocked" in messages


def test_managed_file_may_loosen_its_own_security_defaults() -> None:
    policy = layered("[network]\nblock_private = false\nallow_ip_literals = true\n",
                     "[network]\nblock_private = false\nallow_ip_literals = true\n")
    assert policy.settings.allow_ip_literals and not policy.settings.block_private
    assert policy.problems == ()


def test_limits_are_managed_ceilings() -> None:
    policy = layered("[approvals]\nmax_pending = 10\n",
                     "[approvals]\nmax_pending = 500\nmax_pending_per_agent = 5\n"
                     "[network]\nheader_timeout = 5\nmax_connections_per_client = 60000\n")
    settings = policy.settings
    assert (settings.max_pending, settings.max_pending_per_agent) == (10, 5)
    assert (settings.header_timeout, settings.max_connections_per_client) == (5, 256)
    messages = "\n".join(policy.problems)
    assert "max_pending 500 is above the managed limit 10" in messages
    assert "max_connections_per_client 60000 is above the managed limit 256" in messages


def test_user_file_may_not_set_requirements() -> None:
    policy = layered("", "[requirements]\nallowlist_expansion = true\n")
    assert "only the managed policy may set [requirements]" in policy.problems[0]


def test_presets_from_either_layer() -> None:
    policy = layered('presets = ["github"]\n', 'presets = ["docs"]\n')
    github = policy.decide("api.github.com", 443)
    assert github.action is Action.ALLOW and github.layer == "managed"
    assert github.rule.origin == "preset 'github' via managed.toml (managed)"
    assert policy.decide("docs.python.org", 443).layer == "user"


def test_unknown_preset_is_an_error() -> None:
    with pytest.raises(PolicyError, match="unknown preset 'gihtub'; available: "):
        parse_policy_text('version = 1\npresets = ["gihtub"]\n', "p.toml")


def test_layer_verdicts_for_explain() -> None:
    policy = layered(net((), ["evil.com"]), net(["evil.com"]))
    verdicts = {layer.name: (deny and deny.text, allow and allow.text)
                for layer, deny, allow in policy.layer_verdicts("evil.com", 443)}
    assert verdicts == {"managed": ("evil.com", None), "user": (None, "evil.com")}


def test_telemetry_tables_are_layered_like_every_other_key() -> None:
    policy = layered('[telemetry]\nendpoint = "http://admin:4318"\nenabled = false\n'
                     '[telemetry.headers]\nx-org = "admin"\n',
                     '[telemetry]\nendpoint = "http://mine:4318"\nenabled = true\n'
                     'protocol = "grpc"\n[telemetry.headers]\nx-org = "me"\nx-user = "me"\n')
    telemetry = policy.settings.telemetry
    assert (telemetry.endpoint, telemetry.enabled, telemetry.protocol) == (
        "http://admin:4318", False, "grpc")  # managed keys first; the user fills the rest
    assert dict(telemetry.headers) == {"x-org": "admin", "x-user": "me"}
    alone = layered(None, '[telemetry]\nendpoint = "http://mine:4318"\n').settings.telemetry
    assert alone.endpoint == "http://mine:4318" and alone.enabled is None
