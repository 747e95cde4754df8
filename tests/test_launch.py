"""`agent-egress env`, `run` and `health`, end to end with curl."""

from __future__ import annotations

import subprocess
import sys
import urllib.request

from proxyproc import ProxyProcess


def cli(*args: str, env=None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent_egress.proxy", *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


def policy(port: int) -> str:
    return (f'version = 1\n[network]\nallow = ["allowed.test"]\ndefault = "deny"\n'
            f'ports = [{port}]\nallowed_cidrs = ["127.0.0.0/8"]\n'
            '[resolve]\n"allowed.test" = "127.0.0.1"\n')


def test_env_formats(tmp_path) -> None:
    socket = str(tmp_path / "none.sock")
    bash = cli("env", "--approval-socket", socket).stdout.splitlines()
    assert "export HTTPS_PROXY=http://127.0.0.1:8080" in bash
    assert "export all_proxy=http://127.0.0.1:8080" in bash
    assert "export NO_PROXY=''" in bash and len(bash) == 8
    fish = cli("env", "--shell", "fish", "--proxy", "http://p:3128", "--agent-id", "bot 1",
               "--approval-socket", socket).stdout
    assert "set -gx HTTP_PROXY http://bot%201@p:3128" in fish
    powershell = cli("env", "--shell", "powershell", "--ca-file", "/ca's.pem",
                     "--approval-socket", socket).stdout
    assert "$env:SSL_CERT_FILE = '/ca''s.pem'" in powershell
    assert "$env:NODE_EXTRA_CA_CERTS = '/ca''s.pem'" in powershell
    dotenv = cli("env", "--shell", "dotenv", "--approval-socket", socket).stdout
    assert "NO_PROXY=\n" in dotenv


def test_env_and_run_use_the_running_proxy(tmp_path, plain_origin, client_env) -> None:
    process = ProxyProcess(tmp_path / "p", policy(plain_origin.port))
    try:
        socket = str(process.socket_path)
        lines = cli("env", "--approval-socket", socket, "--agent-id", "env-bot").stdout
        assert f"export HTTP_PROXY=http://env-bot@127.0.0.1:{process.port}" in lines
        # Sourcing what `env` prints points curl at the proxy.
        script = f"{lines}\ncurl -sS http://allowed.test:{plain_origin.port}/hello"
        sourced = subprocess.run(["bash", "-c", script], env=client_env, capture_output=True,
                                 text=True, timeout=30)
        assert sourced.stdout.startswith("hello from plain-origin")
        run = cli("run", "--approval-socket", socket, "--agent-id", "run-bot", "--", "curl",
                  "-sS", "-i", f"http://other.test:{plain_origin.port}/", env=client_env)
        assert run.returncode == 0 and run.stdout.startswith("HTTP/1.1 403")
        assert "using the proxy already running" in run.stderr
        health = cli("health", "--approval-socket", socket)
        assert health.returncode == 0 and health.stdout.startswith(
            f"ok: listening on 127.0.0.1:{process.port}")
        with urllib.request.urlopen(f"{process.url}/healthz", timeout=10) as response:
            assert response.status == 200 and response.read() == b'{"status": "ok"}'
    finally:
        process.stop()
    agents = {e["host"]: e.get("agent") for e in process.events("request.decided")}
    assert agents == {"allowed.test": "env-bot", "other.test": "run-bot"}
    assert cli("health", "--approval-socket", socket).returncode == 1


def test_run_starts_and_stops_its_own_proxy(tmp_path, plain_origin, client_env) -> None:
    policy_path = tmp_path / "policy.toml"
    policy_path.write_text(policy(plain_origin.port))
    audit = tmp_path / "audit.jsonl"
    run = cli("run", "--config", str(policy_path), "--audit-log", str(audit),
              "--approval-socket", str(tmp_path / "s.sock"), "--agent-id", "solo", "--",
              "sh", "-c", f"curl -sS http://allowed.test:{plain_origin.port}/hello; exit 7",
              env=client_env)
    assert run.returncode == 7  # the command's own status
    assert run.stdout.startswith("hello from plain-origin")
    assert "[agent-egress] agent-egress" in run.stderr
    text = audit.read_text()
    assert '"agent": "solo"' in text and '"event": "proxy.stopped"' in text
    assert not (tmp_path / "s.sock").exists()  # stopped, socket removed
    missing = cli("run", "--approval-socket", str(tmp_path / "s2.sock"), "--config",
                  str(policy_path), "--", "no-such-command-xyz", env=client_env)
    assert missing.returncode == 127
