"""`agent-egress env`, `run` and `health`, end to end with curl."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from proxyproc import ProxyProcess


def isolated(tmp_path: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """An environment with HOME and XDG dirs of its own (the runtime dir holds the sockets)."""
    env = dict(base if base is not None else os.environ)
    for name in ("HOME", "XDG_CONFIG_HOME", "XDG_STATE_HOME", "XDG_RUNTIME_DIR"):
        (tmp_path / name.lower()).mkdir(exist_ok=True)
        env[name] = str(tmp_path / name.lower())
    os.chmod(tmp_path / "xdg_runtime_dir", 0o700)
    return env


def cli(*args: str, env=None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent_egress.proxy", *args],
                          capture_output=True, text=True, timeout=timeout, env=env,
                          stdin=subprocess.DEVNULL)


def policy(port: int, extra: str = "") -> str:
    return (f'version = 1\n[network]\nallow = ["allowed.test"]\ndefault = "deny"\n'
            f'ports = [{port}]\nallowed_cidrs = ["127.0.0.0/8"]\n{extra}'
            '[resolve]\n"allowed.test" = "127.0.0.1"\n"other.test" = "127.0.0.1"\n')


def test_env_formats(tmp_path) -> None:
    env = isolated(tmp_path)
    bash = cli("env", "--no-check", env=env).stdout.splitlines()
    assert "export HTTPS_PROXY=http://127.0.0.1:8080" in bash
    assert "export http_proxy=http://127.0.0.1:8080" in bash
    assert "export all_proxy=http://127.0.0.1:8080" in bash
    assert "export NO_PROXY=''" in bash and "export no_proxy=''" in bash and len(bash) == 8
    fish = cli("env", "--shell", "fish", "--proxy", "http://p:3128", "--agent-id", "bot 1",
               "--no-check", env=env).stdout
    assert "set -gx HTTP_PROXY http://bot%201@p:3128" in fish
    powershell = cli("env", "--shell", "powershell", "--ca-file", "/ca's.pem", "--no-check",
                     env=env).stdout
    assert "$env:SSL_CERT_FILE = '/ca''s.pem'" in powershell
    assert "$env:NODE_EXTRA_CA_CERTS = '/ca''s.pem'" in powershell
    dotenv = cli("env", "--shell", "dotenv", "--no-check", env=env).stdout
    assert "NO_PROXY=\n" in dotenv


def test_env_says_when_no_proxy_answers(tmp_path) -> None:
    result = cli("env", "--proxy", "http://127.0.0.1:9", env=isolated(tmp_path))
    assert result.returncode == 1
    assert "no agent-egress proxy answers at http://127.0.0.1:9" in result.stderr
    assert "export http_proxy=http://127.0.0.1:9" in result.stdout


def test_env_and_join_use_the_running_proxy(tmp_path, plain_origin, client_env) -> None:
    process = ProxyProcess(tmp_path / "p", policy(plain_origin.port))
    env = isolated(tmp_path, client_env)
    try:
        socket = str(process.socket_path)
        lines = cli("env", "--approval-socket", socket, "--agent-id", "env-bot", env=env).stdout
        assert f"export HTTP_PROXY=http://env-bot@127.0.0.1:{process.port}" in lines
        # Sourcing what `env` prints points curl at the proxy (lower-case http_proxy included).
        script = f"{lines}\ncurl -sS http://allowed.test:{plain_origin.port}/hello"
        sourced = subprocess.run(["bash", "-c", script], env=env, capture_output=True,
                                 text=True, timeout=30)
        assert sourced.stdout.startswith("hello from plain-origin")
        run = cli("run", "--join", "--config", str(process.policy_path), "--approval-socket",
                  socket, "--agent-id", "run-bot", "--", "curl", "-sS", "-i",
                  f"http://other.test:{plain_origin.port}/", env=env)
        assert run.returncode == 0 and run.stdout.startswith("HTTP/1.1 403"), run.stderr
        assert "joining the proxy at" in run.stderr
        health = cli("health", "--approval-socket", socket, env=env)
        assert health.returncode == 0 and health.stdout.startswith(
            f"ok: listening on 127.0.0.1:{process.port}")  # a joined proxy is left running
        with urllib.request.urlopen(f"{process.url}/healthz", timeout=10) as response:
            assert response.status == 200 and response.read() == b'{"status": "ok"}'
    finally:
        process.stop()
    agents = {e["host"]: e.get("agent") for e in process.events("request.decided")}
    assert agents == {"allowed.test": "env-bot", "other.test": "run-bot"}
    assert cli("health", "--approval-socket", socket, env=env).returncode == 1


def test_join_refuses_a_proxy_with_another_policy(tmp_path, plain_origin, client_env) -> None:
    process = ProxyProcess(tmp_path / "p", policy(plain_origin.port))
    strict = tmp_path / "strict.toml"
    strict.write_text(policy(plain_origin.port))
    try:
        run = cli("run", "--join", "--config", str(strict), "--approval-socket",
                  str(process.socket_path), "--", "true", env=isolated(tmp_path, client_env))
        assert run.returncode == 2
        assert "--join: the running proxy enforces policy" in run.stderr
        assert "drop --join" in run.stderr
    finally:
        process.stop()


def test_run_uses_its_own_policy_even_when_a_proxy_runs(tmp_path, plain_origin,
                                                        client_env) -> None:
    open_policy = policy(plain_origin.port).replace('default = "deny"', 'default = "allow"')
    running = ProxyProcess(tmp_path / "p", open_policy)  # would let other.test through
    env = isolated(tmp_path, client_env)
    strict = tmp_path / "strict.toml"
    strict.write_text(policy(plain_origin.port))
    try:
        run = cli("run", "--config", str(strict), "--", "curl", "-sS", "-i",
                  f"http://other.test:{plain_origin.port}/hello", env=env)
        assert run.returncode == 0 and run.stdout.startswith("HTTP/1.1 403"), run.stdout
        assert cli("health", "--approval-socket", str(running.socket_path),
                   env=env).returncode == 0  # untouched
    finally:
        running.stop()


def test_run_starts_and_stops_its_own_proxy(tmp_path, plain_origin, client_env) -> None:
    env = isolated(tmp_path, client_env)
    policy_path = tmp_path / "policy.toml"
    policy_path.write_text(policy(plain_origin.port))
    audit = tmp_path / "audit.jsonl"
    run = cli("run", "--config", str(policy_path), "--audit-log", str(audit),
              "--agent-id", "solo", "--",
              "sh", "-c", f"curl -sS http://allowed.test:{plain_origin.port}/hello; exit 7",
              env=env)
    assert run.returncode == 7  # the command's own status
    assert run.stdout.startswith("hello from plain-origin")
    assert "[agent-egress] agent-egress" in run.stderr
    text = audit.read_text()
    assert '"agent": "solo"' in text and '"event": "proxy.stopped"' in text
    sockets = Path(env["XDG_RUNTIME_DIR"]) / "agent-egress"
    assert list(sockets.glob("*.sock")) == []  # stopped, socket removed
    missing = cli("run", "--config", str(policy_path), "--", "no-such-command-xyz", env=env)
    assert missing.returncode == 127


def test_concurrent_runs_do_not_stop_each_other(tmp_path, plain_origin, client_env) -> None:
    env = isolated(tmp_path, client_env)
    policy_path = tmp_path / "policy.toml"
    policy_path.write_text(policy(plain_origin.port))
    url = f"http://allowed.test:{plain_origin.port}/hello"
    slow = subprocess.Popen(
        [sys.executable, "-m", "agent_egress.proxy", "run", "--config", str(policy_path), "--",
         "sh", "-c", f"sleep 4; curl -sS {url}"], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    quick = cli("run", "--config", str(policy_path), "--", "curl", "-sS", url, env=env)
    assert quick.stdout.startswith("hello from plain-origin"), quick.stderr
    out, err = slow.communicate(timeout=60)
    assert slow.returncode == 0 and out.startswith("hello from plain-origin"), err


def test_pending_and_watch_find_the_proxy_run_started(tmp_path, plain_origin,
                                                      client_env) -> None:
    env = isolated(tmp_path, client_env)
    policy_path = tmp_path / "policy.toml"
    policy_path.write_text(policy(plain_origin.port).replace('default = "deny"',
                                                             'default = "ask"'))
    held = subprocess.Popen(
        [sys.executable, "-m", "agent_egress.proxy", "run", "--config", str(policy_path), "--",
         "curl", "-sS", "-i", f"http://ask.test:{plain_origin.port}/hello"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            listing = cli("pending", "--json", env=env)  # no --approval-socket: found
            if listing.returncode == 0 and json.loads(listing.stdout):
                break
            assert time.monotonic() < deadline, (listing.stdout, listing.stderr)
            time.sleep(0.2)
        (item,) = json.loads(listing.stdout)
        assert item["host"] == "ask.test"
        assert cli("deny", item["id"], env=env).returncode == 0
        out, _ = held.communicate(timeout=30)
        assert out.startswith("HTTP/1.1 403")
    finally:
        held.kill()


@pytest.mark.skipif(os.geteuid() != 0, reason="--agent-user needs root")
def test_agent_user_runs_the_command_as_another_uid_that_cannot_approve(
        tmp_path, plain_origin, client_env) -> None:
    env = isolated(tmp_path, client_env)
    os.chmod(tmp_path, 0o755)
    policy_path = tmp_path / "policy.toml"
    policy_path.write_text(policy(plain_origin.port))
    script = (f"id -u; curl -sS http://allowed.test:{plain_origin.port}/hello; "
              f"{sys.executable} -m agent_egress.proxy pending; echo pending=$?")
    run = cli("run", "--agent-user", "nobody", "--config", str(policy_path), "--",
              "sh", "-c", script, env=env)
    lines = run.stdout.splitlines()
    assert lines[0] == "65534"
    assert lines[1].startswith("hello from plain-origin")
    assert lines[-1] != "pending=0"  # the agent cannot even reach the approval socket
    assert "approvals: separated: the agent runs as uid 65534" in run.stderr


def test_agent_user_needs_root_and_a_real_user(tmp_path) -> None:
    env = isolated(tmp_path)
    run = cli("run", "--agent-user", "no-such-user-xyz", "--", "true", env=env)
    assert run.returncode == 2
    expected = "needs root" if os.geteuid() != 0 else "no such user"
    assert expected in run.stderr
