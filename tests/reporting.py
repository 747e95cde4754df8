"""Helpers for report tests: audit-log events with known content, written to disk, and the
real `agent-egress report` command run on them."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path


def decided(time: str, host: str, decision: str, reason: str, *, agent: str | None = None,
            port: int = 443, path: str | None = None, rule: str | None = None,
            layer: str | None = None) -> dict:
    event = {"time": time, "event": "request.decided", "schema": 1,
             "client": "127.0.0.1:5000", "scheme": "http" if path else "connect",
             "host": host, "port": port, "decision": decision, "reason": reason}
    for key, value in (("agent", agent), ("path", path), ("rule", rule), ("layer", layer)):
        if value is not None:
            event[key] = value
    return event


def write_log(path: Path, events: list, *, gz: bool = False) -> Path:
    text = "".join((e if isinstance(e, str) else json.dumps(e)) + "\n" for e in events)
    if gz:
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


def report(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent_egress.proxy", "report", *args],
                          capture_output=True, text=True, timeout=timeout)
