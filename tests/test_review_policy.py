"""[approvals.auto_review]: validation with file:line, and what a managed policy lets a user
file set (requirements.auto_review, auto_review_max_risk, the managed keys)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from agent_egress.policy import PolicyError
from agent_egress.policy.layering import compile_layers
from agent_egress.policy.loader import parse_policy_text


def layered(managed: str | None, user: str):
    managed_file = parse_policy_text("version = 1\n" + managed, "managed.toml") if (
        managed is not None) else None
    return compile_layers(parse_policy_text("version = 1\n" + user, "user.toml"),
                          managed_file, {})


def table(**keys) -> str:
    body = "\n".join(f"{k} = {v!r}".replace("'", '"').replace("True", "true")
                     .replace("False", "false") for k, v in keys.items())
    return f"[approvals.auto_review]\n{body}\n"


def test_defaults_off_and_user_file_alone_decides() -> None:
    assert not layered(None, "").settings.auto_review.enabled
    review = layered(None, table(enabled=True, max_risk="medium", scope="once",
                                 max_denials=5)).settings.auto_review
    assert (review.enabled, review.max_risk, review.scope, review.max_denials) == (
        True, "medium", "once", 5)


@pytest.mark.parametrize(("keys", "message"), [
    ({"scope": "always"}, "scope"),
    ({"max_risk": "high"}, "max_risk"),
    ({"api_key": "sk-inline-secret"}, "never the key itself"),
    ({"model_url": "ftp://x/v1", "model": "m"}, "chat-completions base URL"),
    ({"model_url": "http://127.0.0.1:8080/v1"}, "model is empty"),
    ({"timeout": 0}, "timeout"),
    ({"max_denials": 0}, "max_denials"),
    ({"mystery": 1}, "mystery"),
])
def test_bad_values_are_reported_with_file_and_line(keys, message) -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policy_text("version = 1\n\n" + table(**keys), "user.toml")
    text = str(caught.value)
    assert message in text and "user.toml:" in text, text
    assert "sk-inline-secret" not in text  # a key written inline is not echoed


def test_forbidden_turns_it_off_and_says_so() -> None:
    policy = layered("[requirements]\nauto_review = \"forbidden\"\n", table(enabled=True))
    assert not policy.settings.auto_review.enabled
    assert any("auto-review is forbidden" in p and "requirement auto_review" in p
               for p in policy.problems)


def test_required_turns_it_on_and_a_user_cannot_turn_it_off() -> None:
    policy = layered("[requirements]\nauto_review = \"required\"\n", table(enabled=False))
    assert policy.settings.auto_review.enabled
    assert any("cannot be turned off" in p for p in policy.problems)
    assert layered("[requirements]\nauto_review = \"required\"\n", "").settings.auto_review.enabled


def test_max_risk_ceiling_and_managed_values_bind() -> None:
    policy = layered("[requirements]\nauto_review_max_risk = \"low\"\n",
                     table(enabled=True, max_risk="medium"))
    assert policy.settings.auto_review.max_risk == "low"
    assert any("requirement auto_review_max_risk" in p for p in policy.problems)
    managed = table(enabled=True, max_risk="low", scope="once", max_denials=2,
                    model_url="http://127.0.0.1:9/v1", model="corp-model")
    user = table(max_risk="medium", scope="session", max_denials=10,
                 model_url="http://127.0.0.1:8/v1", model="my-model")
    review = layered(managed, user).settings.auto_review
    assert (review.enabled, review.max_risk, review.scope, review.max_denials) == (
        True, "low", "once", 2)
    assert (review.model_url, review.model) == ("http://127.0.0.1:9/v1", "corp-model")
    problems = layered(managed, user).problems
    assert any("the managed policy sets model_url" in p for p in problems)
    assert any("max_risk 'medium' is above the managed 'low'" in p for p in problems)


def test_a_user_may_narrow() -> None:
    managed = table(enabled=True, max_risk="medium", max_denials=5)
    review = layered(managed, table(max_risk="low", scope="once", max_denials=1)
                     ).settings.auto_review
    assert (review.enabled, review.max_risk, review.scope, review.max_denials) == (
        True, "low", "once", 1)
    assert not layered(managed, table(enabled=False)).settings.auto_review.enabled


def test_session_scope_needs_session_approvals_allowed() -> None:
    policy = layered("[requirements]\nallowed_approval_scopes = [\"once\"]\n",
                     table(enabled=True, scope="session"))
    assert policy.settings.auto_review.scope == "once"
    assert any("allowed_approval_scopes" in p for p in policy.problems)


def test_policy_show_prints_the_effective_auto_review(tmp_path) -> None:
    user, managed = tmp_path / "user.toml", tmp_path / "managed.toml"
    user.write_text("version = 1\n" + table(enabled=True, max_risk="medium"))
    managed.write_text("version = 1\n[requirements]\nauto_review_max_risk = \"low\"\n")
    env = {**os.environ, "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "c"),
           "XDG_STATE_HOME": str(tmp_path / "s"), "XDG_RUNTIME_DIR": str(tmp_path / "r")}
    result = subprocess.run([sys.executable, "-m", "agent_egress.proxy", "policy", "show",
                             "--config", str(user), "--managed", str(managed), "--json"],
                            capture_output=True, text=True, env=env,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["settings"]["auto_review"]["enabled"] is True
    assert data["settings"]["auto_review"]["max_risk"] == "low"
    assert any("auto_review_max_risk" in p for p in data["not_applied"])
