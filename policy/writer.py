"""Adding rules to a policy file the way a person would: comments and layout kept, atomically.

Used by `always` approvals. The new file is validated before it replaces the old one, so a
write never leaves a policy that does not load.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import tomlkit
from tomlkit.items import Array

from .engine import Action
from .errors import PolicyError, Problem
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


def add_rule_to_file(path: Path, action: Action, pattern: str) -> None:
    """Append a rule to a policy file atomically; a missing file starts from the built-in one."""
    try:
        text = path.read_text(encoding="utf-8")
        mode = path.stat().st_mode & 0o7777
    except FileNotFoundError:
        text, mode = builtin_policy_text(), 0o644
    new_text = add_rule_to_text(text, action, pattern)
    parse_policy(new_text, str(path))  # never write a file that would not load
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(new_text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except OSError as exc:
        Path(temporary).unlink(missing_ok=True)
        raise PolicyError(str(path), [Problem(f"cannot write the policy file: {exc}")]) from exc
