"""Helpers for tests of held requests: a policy that asks, a curl that waits, and waiting for
a pending approval to show."""

from __future__ import annotations

import json
import subprocess
import time

from conftest import TLS_NAMES
from proxyproc import ProxyProcess


def ask_policy(*ports: int, timeout: float = 30, extra_allow: str = "") -> str:
    resolve = "\n".join(f'"{name}" = "127.0.0.1"' for name in TLS_NAMES)
    return f"""version = 1
[network]
default = "ask"
# Hosts agents may always reach
allow = [
    "allowed.test",{extra_allow}
]
deny = ["denied.evil.test"]
ports = [80, 443, {", ".join(str(p) for p in ports)}]
allowed_cidrs = ["127.0.0.0/8"]

[approvals]
timeout = {timeout}

[resolve]
{resolve}
"""


def start_curl(env, proxy, url: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(["curl", "-sS", "-i", "-x", proxy.url, "--max-time", "60", *args,
                             url], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def wait_pending(proxy: ProxyProcess, predicate=lambda p: True, timeout: float = 10) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = proxy.cli("pending", "--json")
        assert result.returncode == 0, result.stderr
        for item in json.loads(result.stdout):
            if predicate(item):
                return item
        time.sleep(0.1)
    raise AssertionError("no such pending approval")
