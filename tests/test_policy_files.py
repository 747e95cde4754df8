"""Loading policy files: the built-in default, and errors a user can act on."""

from __future__ import annotations

from pathlib import Path

import pytest
from agent_egress.policy import Action, PolicyError, load_policy, parse_policy


def problems(text: str) -> list[str]:
    with pytest.raises(PolicyError) as info:
        parse_policy(text, "p.toml")
    return [problem.render("p.toml") for problem in info.value.problems]


def test_builtin_default_policy_allows_registries_and_asks_otherwise() -> None:
    policy = load_policy(None)
    assert policy.settings.default is Action.ASK
    for host in ("pypi.org", "files.pythonhosted.org", "registry.npmjs.org", "github.com",
                 "api.github.com", "objects.githubusercontent.com", "crates.io",
                 "proxy.golang.org", "docs.python.org"):
        assert policy.decide(host, 443).action is Action.ALLOW, host
    assert policy.decide("pastebin.com", 443).action is Action.DENY
    assert policy.decide("unknown.example", 443).action is Action.ASK
    assert policy.decide("github.com", 22).action is Action.DENY


def test_example_from_the_docs_loads(tmp_path: Path) -> None:
    readme = (Path(__file__).parents[1] / "docs" / "policy.md").read_text()
    example = readme.split("```toml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "policy.toml"
    path.write_text(example)
    policy = load_policy(path)
    assert policy.decide("pypi.org", 443).action is Action.ALLOW
    assert policy.decide("x.pastebin.com", 443).action is Action.DENY


def test_toml_syntax_error_names_the_line() -> None:
    assert problems('version = 1\n[network]\nallow = ["a.com"\n') == [
        "p.toml: not valid TOML: Unclosed array (at end of document)"]
    (message,) = problems('version = 1\n[network]\ndefault = ask\n')
    assert message.startswith("p.toml:3: not valid TOML")


def test_missing_version() -> None:
    (message,) = problems("[network]\n")
    assert message == "p.toml: version: required key is missing; start the file with: version = 1"


def test_unknown_version() -> None:
    (message,) = problems("version = 2\n")
    assert message.startswith("p.toml:1: version:") and "version = 1" in message


def test_unknown_key_suggests_the_right_one() -> None:
    (message,) = problems('version = 1\n[network]\ndefualt = "deny"\n')
    assert message.startswith("p.toml:3: network.defualt: unknown key 'defualt'")
    assert "did you mean 'default'?" in message


def test_bad_pattern_names_the_list_item_line_and_valid_forms() -> None:
    text = 'version = 1\n[network]\nallow = [\n  "ok.com",\n  "bad host.com",\n]\n'
    (message,) = problems(text)
    assert message.startswith("p.toml:5: network.allow[1]: 'bad host.com'")
    assert "valid forms:" in message


def test_bare_star_is_refused_in_deny_lists() -> None:
    (message,) = problems('version = 1\n[network]\ndeny = ["*"]\n')
    assert "allow lists only" in message


def test_cidr_with_host_bits_suggests_the_network() -> None:
    (message,) = problems('version = 1\n[network]\ndeny = ["203.0.113.5/24"]\n')
    assert "did you mean 203.0.113.0/24?" in message


def test_every_problem_is_reported_at_once() -> None:
    text = ('version = 1\n[network]\ndefault = "maybe"\nports = [0, 70000]\n'
            'allowed_cidrs = ["nope"]\n[resolve]\n"a.test" = "not-an-ip"\n')
    found = problems(text)
    assert len(found) == 5
    assert any(m.startswith("p.toml:3: network.default:") for m in found)
    assert any(m.startswith("p.toml:4: network.ports[0]:") for m in found)
    assert any(m.startswith("p.toml:4: network.ports[1]:") for m in found)
    assert any(m.startswith("p.toml:5: network.allowed_cidrs[0]:") for m in found)
    assert any(m.startswith("p.toml:7: resolve.a.test:") for m in found)


def test_missing_file() -> None:
    with pytest.raises(PolicyError, match="file not found"):
        load_policy("/nonexistent/policy.toml")


def test_bad_resolve_override() -> None:
    with pytest.raises(PolicyError, match="expected HOST=ADDR"):
        load_policy(None, resolve=["pypi.org"])
