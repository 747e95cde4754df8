"""Managed policy in the running proxy: precedence, modes, scopes, live reload, permissions."""

from __future__ import annotations

import json
import signal
import socket
import ssl
import subprocess
import sys
from pathlib import Path

from conftest import TLS_NAMES
from holding import start_curl, wait_pending
from proxyproc import ProxyProcess, owner_args

RESOLVE = [arg for name in TLS_NAMES for arg in ("--resolve", f"{name}=127.0.0.1")]


def write_policies(directory: Path, managed: str, user: str) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    managed_path, user_path = directory / "managed.toml", directory / "user.toml"
    managed_path.write_text("version = 1\n" + managed)
    user_path.write_text("version = 1\n" + user)
    return managed_path, user_path


def managed_network(*ports: int, extra: str = "") -> str:
    return (f'[network]\ndeny = ["denied.evil.test", "*.evil.test"]\n'
            f"ports = [80, 443, {', '.join(map(str, ports))}]\n"
            f'allowed_cidrs = ["127.0.0.0/8"]\n{extra}')


def start(tmp_path: Path, managed: str, user: str, *extra: str) -> ProxyProcess:
    managed_path, user_path = write_policies(tmp_path / "policies", managed, user)
    return ProxyProcess(tmp_path / "proxy", None, "--config", str(user_path), "--managed",
                        str(managed_path), *owner_args(), *RESOLVE, *extra)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent_egress.proxy", *args],
                          capture_output=True, text=True, timeout=30)


def test_user_allow_cannot_override_managed_deny(tmp_path, tls_origin, plain_origin,
                                                 client_env) -> None:
    user = '[network]\nallow = ["allowed.test", "x.evil.test"]\ndefault = "deny"\n'
    process = start(tmp_path, managed_network(tls_origin.port, plain_origin.port), user)
    try:
        result = subprocess.run(["curl", "-sS", "-i", "-x", process.url,
                                 f"http://x.evil.test:{plain_origin.port}/"], env=client_env,
                                capture_output=True, text=True, timeout=30)
        assert result.stdout.startswith("HTTP/1.1 403")
        assert "managed.toml (managed): network.deny[1]" in result.stdout
        event = process.wait_for_event(lambda e: e.get("host") == "x.evil.test")
        assert event["layer"] == "managed" and event["reason"] == "denylist"
        allowed = subprocess.run(["curl", "-sS", "-x", process.url,
                                  f"http://allowed.test:{plain_origin.port}/hello"],
                                 env=client_env, capture_output=True, text=True, timeout=30)
        assert allowed.stdout.startswith("hello from plain-origin")
    finally:
        process.stop()
    policies = tmp_path / "policies"
    explained = run_cli("policy", "explain",
                        "--no-resolve", f"x.evil.test:{plain_origin.port}", "--config",
                        str(policies / "user.toml"), "--managed", str(policies / "managed.toml"),
                        *owner_args())
    assert explained.returncode == 1
    assert "the user allow rule 'x.evil.test' cannot override it" in explained.stdout
    assert "decided by: managed" in explained.stdout
    assert "managed  deny '*.evil.test'" in explained.stdout
    assert "user     allow 'x.evil.test'" in explained.stdout


def test_forbidden_audit_mode_is_reported_and_enforcement_stays(tmp_path, plain_origin,
                                                               client_env) -> None:
    managed = managed_network(plain_origin.port) + '[requirements]\nallowed_modes = ["enforce"]\n'
    process = start(tmp_path, managed, 'mode = "audit"\n[network]\ndefault = "deny"\n')
    try:
        output = "".join(process.output)
        assert "mode: mode 'audit' is not allowed (requirement allowed_modes in" in output
        result = subprocess.run(["curl", "-sS", "-i", "-x", process.url,
                                 f"http://other.test:{plain_origin.port}/"], env=client_env,
                                capture_output=True, text=True, timeout=30)
        assert result.stdout.startswith("HTTP/1.1 403")
    finally:
        process.stop()


def test_audit_mode_logs_refusals_but_lets_traffic_flow(tmp_path, plain_origin,
                                                        client_env) -> None:
    managed = (managed_network(plain_origin.port)
               + '[requirements]\nallowed_modes = ["enforce", "audit"]\n')
    process = start(tmp_path, managed, 'mode = "audit"\n[network]\ndefault = "deny"\n')
    try:
        result = subprocess.run(["curl", "-sS", "-x", process.url,
                                 f"http://other.test:{plain_origin.port}/hello"],
                                env=client_env, capture_output=True, text=True, timeout=30)
        assert result.stdout.startswith("hello from plain-origin")
        event = process.wait_for_event(lambda e: e.get("host") == "other.test")
        assert (event["decision"], event["reason"]) == ("deny", "not_allowlisted")
        assert event["mode"] == "audit" and event["enforced"] is False
    finally:
        process.stop()


def test_forbidden_approval_scope_is_refused(tmp_path, plain_origin, client_env) -> None:
    managed = (managed_network(plain_origin.port)
               + '[requirements]\nallowed_approval_scopes = ["once", "session"]\n')
    process = start(tmp_path, managed, "")
    try:
        curl = start_curl(client_env, process, f"http://ask.test:{plain_origin.port}/hello")
        pending = wait_pending(process)
        refused = process.cli("approve", pending["id"], "--scope", "always")
        assert refused.returncode == 1
        assert "does not allow 'always' decisions" in refused.stderr
        assert process.cli("approve", pending["id"]).returncode == 0
        assert curl.communicate(timeout=30)[0].endswith(
            f"hello from plain-origin: /hello host=ask.test:{plain_origin.port}\n")
    finally:
        process.stop()


def _open_tunnel(process: ProxyProcess, port: int, ca_file: Path) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", process.port), timeout=10)
    raw.sendall(f"CONNECT allowed.test:{port} HTTP/1.1\r\nHost: allowed.test:{port}\r\n\r\n"
                .encode())
    assert raw.recv(4096).startswith(b"HTTP/1.1 200")
    context = ssl.create_default_context(cafile=str(ca_file))
    return context.wrap_socket(raw, server_hostname="allowed.test")


def _get(tunnel: ssl.SSLSocket, port: int) -> bytes:
    tunnel.sendall(f"GET /hello HTTP/1.1\r\nHost: allowed.test:{port}\r\n\r\n".encode())
    data = b""
    while b"\n" not in data.split(b"\r\n\r\n", 1)[-1] or b"\r\n\r\n" not in data:
        data += tunnel.recv(4096)
    return data


def test_reload_with_held_approval_and_open_tunnel(tmp_path, tls_origin, plain_origin,
                                                   client_env, ca_file) -> None:
    user = '[network]\nallow = ["allowed.test"]\n'
    process = start(tmp_path, managed_network(tls_origin.port, plain_origin.port), user)
    try:
        tunnel = _open_tunnel(process, tls_origin.port, ca_file)
        assert b"hello from tls-origin" in _get(tunnel, tls_origin.port)
        curl = start_curl(client_env, process, f"http://ask.test:{plain_origin.port}/hello")
        wait_pending(process)
        user_path = tmp_path / "policies" / "user.toml"
        user_path.write_text('version = 1\n[network]\nallow = ["allowed.test", "ask.test"]\n')
        out, err = curl.communicate(timeout=30)
        assert out.endswith(f"host=ask.test:{plain_origin.port}\n"), err
        event = process.wait_for_event(lambda e: e.get("host") == "ask.test"
                                       and e.get("decision") == "allow")
        assert event["reason"] == "allowlist"  # decided by the reloaded policy's rule
        assert b"hello from tls-origin" in _get(tunnel, tls_origin.port)  # tunnel survived
        tunnel.close()
        assert len(process.events("policy.loaded")) == 2
        # SIGHUP reloads too.
        process.process.send_signal(signal.SIGHUP)
        process.wait_for_event(lambda e: len(process.events("policy.loaded")) == 3)
    finally:
        process.stop()


def test_broken_file_during_reload_keeps_last_good_policy(tmp_path, plain_origin,
                                                          client_env) -> None:
    user = '[network]\nallow = ["allowed.test"]\ndefault = "deny"\n'
    process = start(tmp_path, managed_network(plain_origin.port), user)
    try:
        user_path = tmp_path / "policies" / "user.toml"
        user_path.write_text('version = 1\n[network]\nallow = ["allowed.test"\n')
        event = process.wait_for_event(lambda e: e["event"] == "policy.rejected")
        assert "not valid TOML" in event["error"]
        ok = subprocess.run(["curl", "-sS", "-x", process.url,
                             f"http://allowed.test:{plain_origin.port}/hello"],
                            env=client_env, capture_output=True, text=True, timeout=30)
        assert ok.stdout.startswith("hello from plain-origin")
        denied = subprocess.run(["curl", "-sS", "-i", "-x", process.url,
                                 f"http://other.test:{plain_origin.port}/"],
                                env=client_env, capture_output=True, text=True, timeout=30)
        assert denied.stdout.startswith("HTTP/1.1 403")
        shown = process.cli("policy", "show", "--managed",
                            str(tmp_path / "policies" / "managed.toml"),
                            "--config", str(user_path))
        assert shown.returncode == 2  # the file on disk is broken...
        assert "not valid TOML" in shown.stderr
        assert "LAST RELOAD FAILED" in shown.stdout  # ...and the proxy kept the last good one
        assert "not valid TOML" in shown.stdout
        user_path.write_text(f"version = 1\n{user}")
        process.wait_for_event(lambda e: len(process.events("policy.loaded")) == 2)
        status = json.loads(process.cli("policy", "show", "--json", "--config",
                                        str(user_path)).stdout)["running"]
        assert status["last_reload_failure"] is None
    finally:
        process.stop()


def test_policy_show_lists_rules_with_origins(tmp_path) -> None:
    managed_path, user_path = write_policies(
        tmp_path, '[network]\ndeny = ["*.evil.test"]\ndefault = "allow"\n'
                  '[requirements]\ndefault_floor = "ask"\n',
        'presets = ["github"]\n[network]\nallow = ["mine.test"]\ndefault = "allow"\n')
    result = run_cli("policy", "show", "--config", str(user_path), "--managed",
                     str(managed_path), "--approval-socket", str(tmp_path / "none.sock"))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"managed  {managed_path}" in out and f"user     {user_path}" in out
    assert "deny  *.evil.test" in out and f"{managed_path} (managed): network.deny[0]" in out
    assert f"preset 'github' via {user_path} (user)" in out
    assert 'default = "ask"' in out
    assert "requirement default_floor" in out
    presets = run_cli("policy", "presets")
    assert presets.stdout.startswith("package-registries")
