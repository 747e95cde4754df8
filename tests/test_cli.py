"""The agent-egress command line, run as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from proxyproc import ProxyProcess


def run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent_egress.proxy", *args],
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


POLICY = """version = 1
[network]
default = "deny"
allow = ["*.example.com", "example.com:8443"]
deny = ["bad.example.com"]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(text)
    return path


def test_policy_check_ok(tmp_path: Path) -> None:
    path = write(tmp_path, POLICY)
    result = run("policy", "check", str(path))
    assert result.returncode == 0
    assert result.stdout == f"{path}: OK (2 allow, 1 deny rules, default deny)\n"


def test_policy_check_invalid_exits_2_with_file_line_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, 'version = 1\n[network]\nports = [80, "https"]\n')
    result = run("policy", "check", str(path))
    assert result.returncode == 2
    assert f"{path}:3: network.ports[1]:" in result.stderr
    assert "valid integer" in result.stderr


def test_explain_allowed_and_denied(tmp_path: Path) -> None:
    path = write(tmp_path, POLICY)
    allowed = run("policy", "explain", "--no-resolve", "api.example.com", "--config", str(path))
    assert allowed.returncode == 0
    assert allowed.stdout.splitlines()[0] == "api.example.com:443  ALLOW"
    assert "matches the allow rule '*.example.com'" in allowed.stdout
    denied = run("policy", "explain",
                 "--no-resolve", "bad.example.com:443", "--config", str(path), "--json")
    assert denied.returncode == 1
    result = json.loads(denied.stdout)
    assert result["decision"] == "deny"
    assert result["reason"] == "denylist"
    assert result["rule"] == "bad.example.com"
    assert result["rule_origin"] == f"{path} (user): network.deny[0]"


def test_explain_port_rules(tmp_path: Path) -> None:
    path = write(tmp_path, POLICY)
    assert run("policy", "explain",
               "--no-resolve", "example.com:8443", "--config", str(path)).returncode == 0
    result = json.loads(run("policy", "explain",
                            "--no-resolve", "example.com:22", "--config", str(path),
                            "--json").stdout)
    assert result["reason"] == "port_not_allowed"


def test_explain_metadata_and_private_addresses() -> None:
    # Never connected to: only classified.
    for target, fragment in [
        ("169.254.169.254:80", "cloud metadata"),
        ("[::ffff:169.254.169.254]:80", "IPv4-mapped form of a link-local"),
        ("[64:ff9b::a9fe:a9fe]:80", "NAT64 form of a link-local"),
        ("[::7f00:1]:80", "IPv4-compatible form of a loopback"),
        ("10.0.0.1:443", "private"),
    ]:
        result = json.loads(run("policy", "explain", "--no-resolve", target, "--json").stdout)
        assert result["decision"] == "deny", target
        assert result["reason"] == "ip_literal"
        assert fragment in result["address_class"], (target, result)


def test_explain_name_resolving_to_metadata_address(tmp_path: Path) -> None:
    path = write(tmp_path, POLICY)
    result = run("policy", "explain", "--no-resolve", "api.example.com", "--config", str(path),
                 "--resolve", "api.example.com=169.254.169.254", "--json")
    assert result.returncode == 1
    data = json.loads(result.stdout)
    assert data["decision"] == "deny" and data["reason"] == "private_address"
    assert "169.254.169.254, which is link-local (cloud metadata service)" in (
        data["explanation"])


def test_explain_rejects_bad_target() -> None:
    result = run("policy", "explain", "--no-resolve", "example.com:99999")
    assert result.returncode == 2
    assert "port must be a number from 1 to 65535" in result.stderr


def test_serve_with_invalid_policy_exits_2_and_starts_nothing(tmp_path: Path) -> None:
    path = write(tmp_path, 'version = 1\n[network]\nallow = ["*.*"]\ndeny = ["*"]\n')
    result = run("serve", "--config", str(path), "--listen", "127.0.0.1:0")
    assert result.returncode == 2
    assert f"{path}:4: network.deny[0]:" in result.stderr
    assert "listening" not in result.stdout


def test_serve_builtin_policy_prints_agent_environment(tmp_path: Path, tls_origin,
                                                       client_env) -> None:
    process = ProxyProcess(tmp_path / "proxy", None)
    try:
        text = "".join(process.output)
        assert f"HTTPS_PROXY=http://127.0.0.1:{process.port}" in text
        assert f"HTTP_PROXY=http://127.0.0.1:{process.port}" in text
        assert "policy: built-in default policy" in text
        assert f"approval socket: {process.socket_path}" in text
        # The built-in deny list refuses paste sites (decided before any DNS lookup).
        result = subprocess.run(["curl", "-sS", "-i", "-x", process.url,
                                 "http://pastebin.com/raw/x"],
                                env=client_env, capture_output=True, text=True, timeout=30)
        assert "403" in result.stdout.splitlines()[0]
        assert "matches the deny rule '**.pastebin.com' (<built-in default policy>" in (
            result.stdout)
        event = process.wait_for_event(lambda e: e.get("host") == "pastebin.com")
        assert event["reason"] == "denylist"
    finally:
        assert process.stop() == 0
    started = process.events("proxy.started")
    assert started and started[0]["policy"] == "built-in default policy"
    assert started[0]["listen"] == [f"127.0.0.1:{process.port}"]
    assert process.events("proxy.stopped")
