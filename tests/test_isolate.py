"""`run --isolate`: inside, the proxy is the one way out.

The command runs in a network namespace with only loopback (bwrap, or unshare as root). The
test origin listens on 127.0.0.1 *outside* it: reached through the proxy variables, never
directly, and no name resolves inside. Every check runs in the namespace itself, as the agent
would; the origin's connection counter shows what reached it.
"""

from __future__ import annotations

import fcntl
import os
import pty
import shutil
import subprocess
import sys
import termios
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
test -e "/proc/$OUTSIDE"; echo "sees-outside=$?"  # a process outside, to signal or trace
"$PYTHON" -c "
import fcntl, termios
try:
    fcntl.ioctl(0, termios.TIOCSTI, b'x')
    print('tiocsti=0')
except OSError:
    print('tiocsti=1')
"
"""
# Root runs the command as another user (run refuses --isolate as root without one).
AGENT = ("--agent-user", "nobody") if os.geteuid() == 0 else ()
PROBE_PYTHON = "/usr/bin/python3" if os.geteuid() == 0 else sys.executable


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
         env: dict[str, str] | None = None, **options) -> subprocess.CompletedProcess:
    options.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.run(
        [sys.executable, "-m", "agent_egress.proxy", "run", "--no-explain-https",
         "--approval-socket", str(tmp_path / "approvals.sock"), *run_args, "--", *command],
        env=env or _environment(tmp_path), capture_output=True, text=True, timeout=120,
        **options)


def _with_terminal() -> dict:
    """`run` in a session of its own whose controlling terminal is a new pty, as in a shell:
    stdin is that terminal (what TIOCSTI would type into)."""
    primary, secondary = pty.openpty()

    def controlling_terminal() -> None:
        os.setsid()
        fcntl.ioctl(secondary, termios.TIOCSCTTY, 0)

    return {"stdin": secondary, "preexec_fn": controlling_terminal, "_primary": primary}


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
    env = {**_environment(tmp_path), "PORT": str(plain_origin.port), "PYTHON": PROBE_PYTHON,
           "OUTSIDE": str(os.getpid())}  # a process in the namespace outside
    tmp_path.chmod(0o755)  # the agent user's working directory
    before = plain_origin.connections
    terminal = _with_terminal()
    primary = terminal.pop("_primary")
    try:
        result = _run(tmp_path, "--isolate", tool, *AGENT, "--config", str(policy),
                      "--audit-log", str(tmp_path / "audit.jsonl"),
                      command=["sh", "-c", PROBE], env=env, **terminal)
    finally:
        os.close(terminal["stdin"])
        os.close(primary)
    assert result.returncode == 0, result.stderr
    outcome = dict(line.split("=", 1) for line in result.stdout.split() if "=" in line)
    assert outcome["direct-curl"] == "7", outcome  # no route: connection refused
    assert outcome["getent-allowed"] == "2" and outcome["getent-pypi"] == "2"  # no resolver
    assert outcome["python-connect"] == "1"
    assert outcome["via-http-proxy"] == "0" and outcome["via-socks"] == "0"
    assert outcome["nsenter"] != "0"
    assert outcome["sees-outside"] == "1"  # a PID namespace of its own
    assert outcome["tiocsti"] == "1"  # not its controlling terminal: nothing typed into it
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


@pytest.mark.skipif(os.geteuid() != 0, reason="root only")
def test_isolate_as_root_without_an_agent_user_is_refused(tmp_path) -> None:
    marker = tmp_path / "ran"
    result = _run(tmp_path, "--isolate", command=["/bin/sh", "-c", f"touch {marker}"])
    assert result.returncode == 2
    assert "--isolate as root needs --agent-user" in result.stderr
    assert not marker.exists()


def test_a_package_planted_in_the_working_directory_is_never_imported(tmp_path) -> None:
    """The agent writes in its project; run's proxy (and the bridge) must not import it."""
    planted = tmp_path / "agent_egress" / "proxy"
    planted.mkdir(parents=True)
    marker = tmp_path / "planted-ran"
    for package in (tmp_path / "agent_egress", planted):
        (package / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    (planted / "__main__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    console_script = str(Path(sys.executable).with_name("agent-egress"))  # as a user runs it
    result = subprocess.run(
        [console_script, "run", "--no-explain-https", "--approval-socket",
         str(tmp_path / "approvals.sock"), *AGENT, *(("--isolate",) if _tools() else ()),
         "--", "true"], env=_environment(tmp_path), capture_output=True, text=True,
        timeout=120, stdin=subprocess.DEVNULL, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert not marker.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="root only (--agent-user)")
def test_another_users_command_cannot_type_into_the_terminal(tmp_path) -> None:
    """Without --isolate too: an agent run as another user must not push keystrokes into the
    terminal, where the invoking (root) shell would run them once run exits."""
    tmp_path.chmod(0o755)
    script = ("import fcntl, termios\ntry:\n    fcntl.ioctl(0, termios.TIOCSTI, b'x')\n"
              "    print('tiocsti=0')\nexcept OSError:\n    print('tiocsti=1')\n")
    terminal = _with_terminal()
    primary = terminal.pop("_primary")
    try:
        result = _run(tmp_path, "--agent-user", "nobody",
                      command=["/usr/bin/python3", "-c", script], **terminal)
    finally:
        os.close(terminal["stdin"])
        os.close(primary)
    assert result.returncode == 0, result.stderr
    assert "tiocsti=1" in result.stdout
