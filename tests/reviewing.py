"""Helpers for auto-review tests: a plain-HTTP origin on port 80 of a loopback address (web
ports are part of what the reviewer scores), a policy that maps names to it, and curl."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from origins import CountingServer
from proxyproc import ProxyProcess

# Port 80 of a loopback address of this test run's own: two runs side by side do not collide.
ORIGIN_ADDRESS = f"127.42.{os.getpid() % 250 + 1}.{os.getpid() // 250 % 250 + 1}"


def start_web80(root: Path) -> CountingServer:
    return CountingServer("web80", root, None, (ORIGIN_ADDRESS, 80)).start()


def review_policy(names: Iterable[str], extra: str = "", auto_review: str = "") -> str:
    resolve = "\n".join(f'"{name}" = "{ORIGIN_ADDRESS}"' for name in names)
    return f"""version = 1
[network]
default = "ask"
allow = ["pypi.org"]
allowed_cidrs = ["127.0.0.0/8"]
{extra}
[approvals]
timeout = 30

[approvals.auto_review]
enabled = true
{auto_review}

[resolve]
{resolve}
"""


def curl(env, proxy: ProxyProcess, url: str, *args: str, agent: str = "") -> subprocess.Popen:
    proxy_url = proxy.url.replace("http://", f"http://{agent}@") if agent else proxy.url
    return subprocess.Popen(["curl", "-sS", "-i", "-x", proxy_url, "--max-time", "60", *args,
                             url], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def fetch(env, proxy: ProxyProcess, url: str, agent: str = "") -> str:
    out, _ = curl(env, proxy, url, agent=agent).communicate(timeout=60)
    return out


class WatchTerminal:
    """`agent-egress watch` on a real pseudo-terminal."""

    def __init__(self, proxy: ProxyProcess) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child
            os.execve(sys.executable, [sys.executable, "-m", "agent_egress.proxy", "watch",
                                       "--approval-socket", str(proxy.socket_path)],
                      proxy.env())
        self.output = bytearray()

    def read_until(self, marker: bytes, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while marker not in self.output:
            remaining = deadline - time.monotonic()
            assert remaining > 0, bytes(self.output)
            if select.select([self.fd], [], [], remaining)[0]:
                self.output.extend(os.read(self.fd, 4096))

    def press(self, key: bytes) -> None:
        os.write(self.fd, key)

    def close(self) -> None:
        try:
            os.kill(self.pid, 9)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(self.fd)
