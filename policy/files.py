"""Who can change a policy file: the managed file must be root's alone."""

from __future__ import annotations

import stat
from pathlib import Path


def unprotected_reasons(path: Path) -> list[str]:
    """Why a non-root user could change ``path`` (the file or its directory); [] if none."""
    reasons = []
    for target, what in ((path, "file"), (path.parent, "directory")):
        try:
            info = target.stat()
        except OSError:
            continue
        if info.st_uid != 0:
            reasons.append(f"the {what} {target} is owned by uid {info.st_uid}, not root")
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            writable = "group and others" if info.st_mode & stat.S_IWOTH and (
                info.st_mode & stat.S_IWGRP) else ("others" if info.st_mode & stat.S_IWOTH
                                                   else "its group")
            reasons.append(f"the {what} {target} is writable by {writable} "
                           f"(mode {stat.S_IMODE(info.st_mode):04o})")
    return reasons


DEFAULT_MANAGED_PATH = Path("/etc/agent-egress/managed.toml")
