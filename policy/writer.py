"""Adding rules to a policy file the way a person would: comments and layout kept, atomically.

Used by `always` approvals. The new file is validated before it replaces the old one, so a
write never leaves a policy that does not load, and it is written without following a link an
agent could have planted in its place.
"""

from __future__ import annotations

from datetime import date
from pathlib import Path

import tomlkit
from tomlkit.items import Array

from .engine import Action
from .errors import PolicyError, Problem
from .files import UnsafePath, read_own_file, replace_file
from .loader import builtin_policy_text, parse_policy


def add_rule_to_text(text: str, action: Action, pattern: str) -> str:
    """The policy text with ``pattern`` appended to the allow or deny list (once)."""
    if action not in (Action.ALLOW, Action.DENY):
        raise ValueError(f"only allow and deny rules can be written, not {action}")
    document = tomlkit.parse(text)
    network = document.get("network")
    if network is None:
        network = tomlkit.table()
        document["network"] = network
    rules = network.get(action.value)
    if rules is None:
        rules = tomlkit.array()
        rules.multiline(True)
        network[action.value] = rules
    assert isinstance(rules, Array)
    if pattern not in rules:
        rules.append(pattern)
    return tomlkit.dumps(document)


def created_policy_text() -> str:
    """The built-in policy as a new user policy file: its header says whose file it is now."""
    body = builtin_policy_text()
    body = body[body.index("version = 1"):]
    return (f"# agent-egress user policy: created {date.today().isoformat()} by an `always` "
            "approval, from the built-in\n# default policy. The proxy now reads this file "
            "instead of the built-in one; edit it freely\n# (see docs/policy.md). `always` "
            "approvals add their rules here.\n" + body)


def rule_pattern(host: str, port: int | None) -> str:
    """The pattern for exactly this destination: an IPv6 address with a port in brackets, or
    `2001:db8::1:8443` would name another address on no port at all."""
    if port is None:
        return host
    shown = f"[{host}]" if ":" in host else host
    return f"{shown}:{port}"


def add_rule_to_file(path: Path, action: Action, pattern: str, *,
                     may_create: bool = False) -> None:
    """Append a rule to the user policy file, atomically, without following links.

    A file that is missing is refused unless ``may_create`` (the proxy runs the built-in
    policy, so there was none): a user file that vanished while the proxy used it is never
    replaced by the built-in one. A file that does not load is refused too; either way the
    policy in force stays.
    """
    try:
        text, mode = read_own_file(path, "the user policy file")
    except FileNotFoundError:
        if not may_create:
            raise PolicyError(str(path), [Problem(
                "the user policy file is gone; nothing was written and the policy loaded "
                "before stays in force; restore the file (or restart the proxy), then decide "
                "again")]) from None
        text, mode = created_policy_text(), 0o644
    except UnsafePath as exc:
        raise PolicyError(str(path), [Problem(f"{exc}; nothing was written")]) from None
    parse_policy(text, str(path))  # the file as it is must load, or nothing is added to it
    new_text = add_rule_to_text(text, action, pattern)
    parse_policy(new_text, str(path))  # never write a file that would not load
    try:
        replace_file(path, new_text, mode, "the user policy file")
    except (OSError, UnsafePath) as exc:
        raise PolicyError(str(path), [Problem(f"cannot write the policy file: {exc}")]) from exc
