"""Default locations (XDG base directories), and which files and socket a command uses.

`serve`, `run`, `policy explain` and `policy show` pick the policy files the same way, so a
command never checks another policy than the proxy enforces.
"""

from __future__ import annotations

import os
from pathlib import Path

from agent_egress.policy import default_user_policy_path
from agent_egress.policy.files import DEFAULT_MANAGED_PATH


def state_dir() -> Path:
    return Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / \
        "agent-egress"


def default_socket_path() -> Path:
    """The approval socket: the runtime dir when there is one (per login, tmpfs)."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) / "agent-egress" if runtime else state_dir()
    return base / "approvals.sock"


def run_socket_path() -> Path:
    """The approval socket of a proxy `run` starts for itself: one per run, beside the default
    one, where `watch` and `pending` look for it."""
    return default_socket_path().with_name(f"run-{os.getpid()}.sock")


def user_policy_file(explicit: str | None) -> str | None:
    """The user policy a command uses: --config, else the user's file when it exists, else
    None (the built-in default policy)."""
    if explicit:
        return explicit
    path = default_user_policy_path()
    return str(path) if path.exists() else None


def managed_policy_file(explicit: str | None) -> str | None:
    """The managed policy: --managed, else the system-wide file when it exists."""
    if explicit:
        return explicit
    return str(DEFAULT_MANAGED_PATH) if DEFAULT_MANAGED_PATH.exists() else None
