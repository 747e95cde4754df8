"""`run --isolate`: inside, the proxy is the one way out.

The command runs in a network namespace with only loopback (bwrap, or unshare as root). The
test origin listens on 127.0.0.1 *outside* it: reached through the proxy variables, never
directly, and no name resolves inside. Every check runs in the namespace itself, as the agent
would; the origin's connection counter shows what reached it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import policy_text

# What the agent tries, inside the namespace; one line of outcome per attempt.
PROBE = r"""
curl -sS --max-time 5 --noproxy '*' --resolve "allowed.test:$PORT:127.0.0.1" \
    "http://allowed.test:$PORT/hello" >/dev/null 2>&1; echo "direct-curl=$?"
getent hosts allowed.test >/dev/null; echo "getent-allowed=$?"
getent hosts pypi.org >/dev/null; echo "getent-pypi=$?"
"$PYTHON" -c "
import socket, sys
try:
    socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=5)
    print('python-connect=0')
except OSError:
    print('python-connect=1')
" "$PORT"
curl -sS --max-time 10 "http://allowed.test:$PORT/hello" >/dev/null 2>&1; echo "via-http-proxy=$?"
curl -sS --max-time 10 -x "$ALL_PROXY" "http://allowed.test:$PORT/hello" >/dev/null 2>&1
echo "via-socks=$?"
nsenter --net="/proc/$OUTSIDE/ns/net" true 2>/dev/null; echo "nsenter=$?"  # walk back out?
"""


def _environment(tmp_path: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items()
           if key.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
           and not key.startswith("XDG_")}
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env.update(HOME=str(home), XDG_CONFIG_HOME=str(tmp_path / "config"),
               XDG_STATE_HOME=str(tmp_path / "state"), XDG_DATA_HOME=str(tmp_path / "data"),
               XDG_CACHE_HOME=str(tmp_path / "cache"), XDG_RUNTIME_DIR=str(tmp_path))
    return env


def _run(tmp_path: Path, *run_args: str, command: list[str],
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "agent_egress.proxy", "run", "--no-explain-https",
         "--approval-socket", str(tmp_path / "approvals.sock"), *run_args, "--", *command],
        env=env or _environment(tmp_path), capture_output=True, text=True, timeout=120,
        stdin=subprocess.DEVNULL)


def _tools() -> list[str]:
    tools = []
    if shutil.which("bwrap"):
        tools.append("bwrap")
    if os.geteuid() == 0 and shutil.which("unshare"):
        tools.append("unshare")
    return tools


@pytest.mark.parametrize("tool", _tools() or [pytest.param("none", marks=pytest.mark.skip(
    reason="needs bubblewrap or root (.ci/run installs bubblewrap)"))])
def test_inside_the_proxy_is_the_only_way_out(tmp_path, plain_origin, tool) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(policy_text(plain_origin.port))
    env = {**_environment(tmp_path), "PORT": str(plain_origin.port), "PYTHON": sys.executable,
           "OUTSIDE": str(os.getpid())}  # a process in the namespace outside
    before = plain_origin.connections
    result = _run(tmp_path, "--isolate", tool, "--config", str(policy),
                  "--audit-log", str(tmp_path / "audit.jsonl"),
                  command=["sh", "-c", PROBE], env=env)
    assert result.returncode == 0, result.stderr
    outcome = dict(line.split("=", 1) for line in result.stdout.split() if "=" in line)
    assert outcome["direct-curl"] == "7", outcome  # no route: connection refused
    assert outcome["getent-allowed"] == "2" and outcome["getent-pypi"] == "2"  # no resolver
    assert outcome["python-connect"] == "1"
    assert outcome["via-http-proxy"] == "0" and outcome["via-socks"] == "0"
    assert outcome["nsenter"] != "0"  # even as root: the command has no capabilities
    assert plain_origin.connections == before + 2  # the two proxied requests, nothing else
    audit = (tmp_path / "audit.jsonl").read_text()
    assert '"scheme": "http"' in audit and '"scheme": "socks5"' in audit


def test_without_a_way_to_isolate_the_command_is_not_run(tmp_path) -> None:
    marker = tmp_path / "ran"
    env = {**_environment(tmp_path), "PATH": str(tmp_path / "empty")}
    result = _run(tmp_path, "--isolate", "bwrap",
                  command=["/bin/sh", "-c", f"touch {marker}"], env=env)
    assert result.returncode == 2
    assert "bubblewrap is not installed" in result.stderr
    assert not marker.exists()


@pytest.mark.skipif(os.geteuid() != 0 or not _tools(), reason="needs root and bwrap or unshare")
def test_isolate_with_agent_user_runs_the_command_as_that_user(tmp_path, plain_origin) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(policy_text(plain_origin.port))
    tmp_path.chmod(0o755)  # the agent user reads nothing of it but must reach its cwd
    script = (f"id -u; curl -sS --max-time 10 -o /dev/null -w '%{{http_code}}\\n' "
              f"http://allowed.test:{plain_origin.port}/hello")
    result = _run(tmp_path, "--isolate", "--agent-user", "nobody", "--config", str(policy),
                  command=["sh", "-c", script])
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["65534", "200"]
