"""Request rules (policy.requests): canonical paths, globs, the order of rules, layering under a
managed policy, `policy check` errors and `policy explain METHOD URL`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from agent_egress.policy import Action, PolicyError, load_policy, parse_policy
from agent_egress.policy.paths import InvalidPath, canonical_path, deny_forms, parse_path_glob
from agent_egress.proxy.cli import main

BASE = """version = 1
[network]
allow = ["github.com", "api.github.com", "registry.npmjs.org", "*.example.test", "10.1.2.3"]
allow_ip_literals = true
"""

RULES = BASE + """read_only = ["registry.npmjs.org"]

[[network.requests]]
host = "github.com"
methods = ["GET", "HEAD"]
paths = ["/myorg/**", "/myorg"]
action = "allow"

[[network.requests]]
host = "api.github.com"
methods = ["POST", "PUT", "PATCH", "DELETE"]
action = "ask"

[[network.requests]]
host = "api.github.com"
methods = ["GET"]
action = "allow"

[[network.requests]]
host = "*.github.com"
paths = ["/secret/**"]
action = "deny"

[[network.requests]]
host = "registry.npmjs.org"
action = "allow"
"""


DENY_EXACT = BASE + """
[[network.requests]]
host = "api.github.com"
action = "allow"

[[network.requests]]
host = "api.github.com"
paths = ["/secret", "/secret/**"]
action = "deny"
"""


def decide(policy_text: str, host: str, method: str, target: str) -> tuple[str, str]:
    decision = parse_policy(policy_text, "policy.toml").decide_request(host, 443, method, target)
    return decision.action.value, decision.reason.value


@pytest.mark.parametrize(("target", "canonical"), [
    ("/a/b?token=x", "/a/b"),
    ("/a//b", "/a/b"),
    ("/@types%2fnode", "/@types/node"),
    ("/pro%64/x", "/prod/x"),
    ("/a/b/", "/a/b/"),
    ("/a/b;v=1/c", "/a/b;v=1/c"),
    ("/", "/"),
    ("//", "/"),
])
def test_canonical_path(target: str, canonical: str) -> None:
    assert canonical_path(target) == canonical


@pytest.mark.parametrize("target", [
    "/a\\b", "/a%5cb", "/a%00b", "/a%0d%0ab", "/..;/admin", "/a/.;x/b", "/%252e%252e/x",
    "/%ff", "relative", "*", "http://other.test/",
    # The origin gets the target as written: what it could resolve elsewhere is refused.
    "/a/./b", "/a/b/..", "/myorg/../other", "/a/%2e%2e/b", "/myorg/..%2fother", "/a/%2E/b",
    "/public/x#/../../admin", "/a#frag", "/public/%u002e%u002e/admin", "/../../etc",
])
def test_paths_without_one_meaning_are_refused(target: str) -> None:
    with pytest.raises(InvalidPath):
        canonical_path(target)


@pytest.mark.parametrize(("path", "forms"), [
    ("/a/b", ("/a/b",)),
    ("/a/b/", ("/a/b/", "/a/b")),
    ("/public/secret;x/key", ("/public/secret;x/key", "/public/secret/key")),
    ("/p/secret;jsessionid=1", ("/p/secret;jsessionid=1", "/p/secret")),
    ("/", ("/",)),
])
def test_deny_rules_see_the_spellings_servers_treat_alike(path: str, forms: tuple) -> None:
    assert deny_forms(path) == forms


@pytest.mark.parametrize(("glob", "path", "matches"), [
    ("/myorg/**", "/myorg/repo", True),
    ("/myorg/**", "/myorg/repo/info/refs", True),
    ("/myorg/**", "/myorg/", True),
    ("/myorg/**", "/myorg", False),
    ("/myorg/**", "/myorgx/repo", False),
    ("/a/*/c", "/a/b/c", True),
    ("/a/*/c", "/a/b/x/c", False),
    ("/a/**/c", "/a/c", True),
    ("/a/**/c", "/a/x/y/c", True),
    ("/*.git/info/refs", "/r.git/info/refs", True),
    ("/", "/", True),
    ("/", "/x", False),
])
def test_path_globs(glob: str, path: str, matches: bool) -> None:
    assert parse_path_glob(glob).matches(path) is matches


def test_allow_rule_lets_its_methods_and_paths_through() -> None:
    assert decide(RULES, "github.com", "GET", "/myorg/repo?x=1") == ("allow", "request_rule")
    assert decide(RULES, "github.com", "HEAD", "/myorg") == ("allow", "request_rule")


def test_other_method_and_other_path_have_their_own_reasons() -> None:
    assert decide(RULES, "github.com", "POST", "/myorg/repo") == ("deny", "method_not_allowed")
    assert decide(RULES, "github.com", "GET", "/otherorg/repo") == ("deny", "path_not_allowed")


def test_other_spellings_of_a_path_do_not_escape_its_rules() -> None:
    for target in ("/myorg/../otherorg/repo", "/myorg/%2e%2e/otherorg", "/myorg/..%2Fotherorg",
                   "/myorg/..;/otherorg", "/myorg/x#/../../otherorg"):
        assert decide(RULES, "github.com", "GET", target) == ("deny", "invalid_request"), target
    # Deny rules also match without ';' parameters and without a trailing '/'.
    for target in ("/secret;x/key", "/secret;/key", "/secret;jsessionid=1", "/secret/",
                   "/secre%74/x"):
        assert decide(DENY_EXACT, "api.github.com", "GET", target) == (
            "deny", "request_denied"), target
    assert decide(DENY_EXACT, "api.github.com", "GET", "/secretive") == (
        "allow", "request_rule")


def test_deny_rule_beats_a_more_specific_allow_and_ignores_case() -> None:
    assert decide(RULES, "api.github.com", "GET", "/secret/x") == ("deny", "request_denied")
    assert decide(RULES, "api.github.com", "GET", "/SECRET/x") == ("deny", "request_denied")
    assert decide(RULES, "api.github.com", "GET", "/public") == ("allow", "request_rule")


def test_allow_rules_match_case_exactly() -> None:
    assert decide(RULES, "github.com", "GET", "/MyOrg/repo") == ("deny", "path_not_allowed")


def test_ask_rule_asks() -> None:
    assert decide(RULES, "api.github.com", "POST", "/repos") == ("ask", "needs_approval")


def test_read_only_refuses_writes_whatever_the_request_rules_say() -> None:
    assert decide(RULES, "registry.npmjs.org", "GET", "/pkg") == ("allow", "request_rule")
    assert decide(RULES, "registry.npmjs.org", "PUT", "/pkg") == ("deny", "read_only")


def test_read_only_everywhere() -> None:
    policy = BASE + 'read_only = ["*"]\n'
    assert decide(policy, "github.com", "OPTIONS", "/") == ("allow", "read_only")
    assert decide(policy, "a.example.test", "DELETE", "/x") == ("deny", "read_only")


def test_most_specific_rule_wins() -> None:
    policy = BASE + """
[[network.requests]]
host = "*.example.test"
action = "ask"

[[network.requests]]
host = "api.example.test"
paths = ["/v1/**"]
action = "allow"

[[network.requests]]
host = "api.example.test"
paths = ["/v1/admin/**"]
action = "ask"
"""
    assert decide(policy, "api.example.test", "GET", "/v1/x") == ("allow", "request_rule")
    assert decide(policy, "api.example.test", "GET", "/v1/admin/x") == ("ask", "needs_approval")
    assert decide(policy, "b.example.test", "GET", "/v1/x") == ("ask", "needs_approval")
    # An exact host's rules are preferred, but request_default still applies to the rest.
    assert decide(policy, "api.example.test", "GET", "/v2") == ("ask", "needs_approval")


@pytest.mark.parametrize(("default", "expected"), [
    ("deny", ("deny", "path_not_allowed")),
    ("ask", ("ask", "needs_approval")),
    ("allow", ("allow", "request_rule")),
])
def test_request_default(default: str, expected: tuple[str, str]) -> None:
    policy = RULES.replace("allow_ip_literals = true\n",
                           f'allow_ip_literals = true\nrequest_default = "{default}"\n')
    assert decide(policy, "github.com", "GET", "/elsewhere") == expected


def test_hosts_without_request_rules_are_not_intercepted() -> None:
    policy = parse_policy(RULES, "policy.toml")
    assert policy.intercepts("github.com", 443) and policy.intercepts("API.GitHub.com.", 443)
    assert not policy.intercepts("a.example.test", 443)
    decision = policy.decide_request("a.example.test", 443, "DELETE", "/x")
    assert (decision.action, decision.reason.value) == (Action.ALLOW, "unrestricted")
    assert policy.interception_configured
    assert not parse_policy(BASE, "p.toml").interception_configured


def test_ip_literal_hosts_and_ports_in_host_patterns() -> None:
    policy = BASE + """
[[network.requests]]
host = "10.1.2.3"
methods = ["GET"]
action = "allow"

[[network.requests]]
host = "a.example.test:8443"
methods = ["GET"]
action = "allow"
"""
    compiled = parse_policy(policy, "p.toml")
    assert compiled.intercepts("10.1.2.3", 443)
    assert decide(policy, "10.1.2.3", "POST", "/") == ("deny", "method_not_allowed")
    assert compiled.intercepts("a.example.test", 8443)
    assert not compiled.intercepts("a.example.test", 443)


def test_refusal_text_names_method_path_and_rule_without_paths_of_the_machine() -> None:
    policy = parse_policy(RULES, "/somewhere/private/policy.toml")
    decision = policy.decide_request("api.github.com", 443, "GET", "/secret/key?token=t")
    text = decision.explain(file_names_only=True)
    assert "GET /secret/key" in text and "token" not in text
    assert "network.requests[3]" in text and "policy.toml" in text
    assert "/somewhere" not in text


# -- policy check ------------------------------------------------------------------------


def test_policy_check_reports_bad_globs_methods_and_conflicts(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(BASE + """passthrough = ["pinned.example.test"]

[[network.requests]]
host = "github.com"
methods = ["get", "FETCH"]
paths = ["myorg/**", "/a?b=1", "/x**", "/a/../b"]
action = "allow"

[[network.requests]]
host = "api.github.com"
action = "maybe"
""")
    with pytest.raises(PolicyError) as raised:
        load_policy(path)
    text = str(raised.value)
    assert f"{path}:9: network.requests[0].methods[0]: unknown HTTP method 'get'; methods are " \
           "upper case: 'GET'" in text
    assert "unknown HTTP method 'FETCH'" in text
    assert f"{path}:10: network.requests[0].paths[0]: path glob 'myorg/**' must start with" \
           in text
    assert "never the query" in text and "'**' must be a whole segment" in text
    assert "'.' and '..' segments never match" in text
    assert f"{path}:15: network.requests[1].action" in text


def test_passthrough_and_request_rules_for_the_same_host_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(BASE + """passthrough = ["*.github.com"]
read_only = ["registry.npmjs.org"]

[[network.requests]]
host = "api.github.com"
action = "deny"
""")
    with pytest.raises(PolicyError) as raised:
        load_policy(path)
    assert (f"{path}:5: network.passthrough[0]: passthrough '*.github.com' and "
            "network.requests[0] ('api.github.com') name the same hosts") in str(raised.value)
    assert main(["policy", "check", str(path)]) == 2


def test_upstream_ca_file_must_exist(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(BASE + 'upstream_ca_file = "internal-ca.pem"\n')
    with pytest.raises(PolicyError, match="internal-ca.pem is not a readable file"):
        load_policy(path)
    (tmp_path / "internal-ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    assert load_policy(path).settings.upstream_ca_file == str(tmp_path / "internal-ca.pem")


# -- managed over user ------------------------------------------------------------------------


def layered(tmp_path: Path, managed: str, user: str):
    (tmp_path / "managed.toml").write_text(managed)
    (tmp_path / "user.toml").write_text(user)
    return load_policy(tmp_path / "user.toml", managed=tmp_path / "managed.toml")


MANAGED = BASE + """read_only = ["registry.npmjs.org"]
passthrough = ["pinned.example.test"]

[[network.requests]]
host = "github.com"
methods = ["GET"]
paths = ["/myorg/**"]
action = "allow"
"""


def test_user_request_rules_cannot_loosen_managed_ones(tmp_path: Path) -> None:
    policy = layered(tmp_path, MANAGED, BASE + """
[[network.requests]]
host = "github.com"
action = "allow"
""")
    decision = policy.decide_request("github.com", 443, "POST", "/myorg/repo")
    assert (decision.action.value, decision.reason.value, decision.layer) == (
        "deny", "method_not_allowed", "managed")
    assert policy.decide_request("github.com", 443, "GET", "/other").reason.value == (
        "path_not_allowed")
    assert policy.decide_request("github.com", 443, "GET", "/myorg/r").allowed


def test_user_may_add_stricter_request_rules(tmp_path: Path) -> None:
    policy = layered(tmp_path, MANAGED, BASE + """read_only = ["api.github.com"]

[[network.requests]]
host = "github.com"
paths = ["/myorg/secret/**"]
action = "deny"
""")
    denied = policy.decide_request("github.com", 443, "GET", "/myorg/secret/x")
    assert (denied.reason.value, denied.layer) == ("request_denied", "user")
    assert policy.decide_request("github.com", 443, "GET", "/myorg/open").allowed
    assert policy.decide_request("api.github.com", 443, "POST", "/x").reason.value == (
        "read_only")


def test_user_passthrough_cannot_exempt_a_managed_host(tmp_path: Path) -> None:
    policy = layered(tmp_path, MANAGED, BASE + 'passthrough = ["registry.npmjs.org"]\n')
    assert policy.intercepts("registry.npmjs.org", 443)
    assert policy.decide_request("registry.npmjs.org", 443, "PUT", "/x").reason.value == (
        "read_only")
    assert any("passthrough 'registry.npmjs.org' would exempt hosts" in p
               for p in policy.problems)


def test_managed_passthrough_keeps_user_rules_off_a_pinned_host(tmp_path: Path) -> None:
    policy = layered(tmp_path, MANAGED, BASE + """
[[network.requests]]
host = "pinned.example.test"
methods = ["GET"]
action = "allow"
""")
    assert not policy.intercepts("pinned.example.test", 443)
    assert any("covers hosts the managed passthrough keeps untouched" in p
               for p in policy.problems)


def test_request_default_binds_like_the_default(tmp_path: Path) -> None:
    policy = layered(tmp_path, MANAGED, BASE + 'request_default = "allow"\n')
    assert policy.settings.request_default is Action.DENY  # the managed default, unwritten
    assert any("request_default 'allow' is looser" in p for p in policy.problems)


def test_explain_https_either_file_and_upstream_ca_managed(tmp_path: Path) -> None:
    (tmp_path / "m.pem").write_text("x")
    (tmp_path / "u.pem").write_text("x")
    managed = MANAGED.replace("[network]\n", '[network]\nupstream_ca_file = "m.pem"\n')
    user = BASE.replace("[network]\n", '[network]\nexplain_https = true\n'
                                       'upstream_ca_file = "u.pem"\n')
    policy = layered(tmp_path, managed, user)
    assert policy.settings.explain_https
    assert policy.settings.upstream_ca_file == str(tmp_path / "m.pem")
    assert any("upstream_ca_file" in p for p in policy.problems)


# -- policy explain METHOD URL -----------------------------------------------------------


def test_policy_explain_a_request(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(RULES)
    code = main(["policy", "explain", "--config", str(path), "--no-resolve", "--json",
                 "POST", "https://github.com/myorg/repo.git/git-receive-pack?x=1"])
    result = json.loads(capsys.readouterr().out)
    assert code == 1
    assert (result["decision"], result["reason"]) == ("deny", "method_not_allowed")
    assert result["request"]["path"] == "/myorg/repo.git/git-receive-pack"
    assert result["intercepted"] is True
    assert main(["policy", "explain", "--config", str(path), "--no-resolve",
                 "GET", "https://github.com/myorg/repo"]) == 0
    text = capsys.readouterr().out
    assert "request: GET /myorg/repo  ALLOW (request_rule)" in text
    assert "tls:    intercepted" in text
    assert main(["policy", "explain", "--config", str(path), "--no-resolve",
                 "a.example.test"]) == 0
    assert "tls:    passed through untouched" in capsys.readouterr().out


def test_policy_explain_rejects_other_urls(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(RULES)
    for argv in (["GET", "ftp://github.com/x"], ["FETCH", "https://github.com/"],
                 ["GET", "https://user@github.com/"], ["GET", "https://github.com/", "x"]):
        assert main(["policy", "explain", "--config", str(path), "--no-resolve", *argv]) == 2
        assert "agent-egress" in capsys.readouterr().err
