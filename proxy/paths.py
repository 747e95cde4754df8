"""Default locations, following the XDG base directory conventions."""

from __future__ import annotations

import os
from pathlib import Path


def state_dir() -> Path:
    return Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / \
        "agent-egress"


def default_socket_path() -> Path:
    """The approval socket: the runtime dir when there is one (per login, tmpfs)."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) / "agent-egress" if runtime else state_dir()
    return base / "approvals.sock"
