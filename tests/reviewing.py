"""Helpers for auto-review tests: a plain-HTTP origin on port 80 of a loopback address (web
ports are part of what the reviewer scores), a policy that maps names to it, and curl."""

from __future__ import annotations

import subprocess
from collections.abc import Iterable
from pathlib import Path

from origins import CountingServer
from proxyproc import ProxyProcess

ORIGIN_ADDRESS = "127.0.0.42"


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
