"""What a new user trips over (issue 14), each with the real CLI and a real proxy."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import policy_text
from proxyproc import ProxyProcess
from rawclient import connect, read_all


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60
        ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent_egress.proxy", *args],
                          capture_output=True, text=True, timeout=timeout, env=env,
                          stdin=subprocess.DEVNULL)


def home(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    for name in ("HOME", "XDG_CONFIG_HOME", "XDG_STATE_HOME", "XDG_RUNTIME_DIR"):
        (tmp_path / name.lower()).mkdir(exist_ok=True, mode=0o700)
        env[name] = str(tmp_path / name.lower())
    return env


# 1. Both cases of the proxy variables ------------------------------------------------------

def test_banner_gives_both_cases_and_no_proxy(proxy) -> None:
    banner = "".join(proxy.output)
    for line in ("NO_PROXY=", "no_proxy=", f"HTTPS_PROXY={proxy.url}", f"http_proxy={proxy.url}",
                 f"https_proxy={proxy.url}", f"HTTP_PROXY={proxy.url}"):
        assert f"  {line}\n" in banner, line


# 3. explain checks the policy serve enforces, with DNS -------------------------------------

def test_explain_picks_the_user_file_like_serve(tmp_path) -> None:
    env = home(tmp_path)
    user = Path(env["XDG_CONFIG_HOME"]) / "agent-egress" / "policy.toml"
    user.parent.mkdir()
    user.write_text('version = 1\n[network]\nallow = ["mine.test"]\n'
                    '[resolve]\n"mine.test" = "151.101.0.223"\n')
    result = cli("policy", "explain", "mine.test", env=env)
    assert result.returncode == 0, result.stdout
    assert "ALLOW" in result.stdout and f"policy: {user}" in result.stdout


def test_explain_resolves_like_the_proxy(tmp_path) -> None:
    env = home(tmp_path)
    policy = tmp_path / "p.toml"
    policy.write_text('version = 1\n[network]\nallow = ["localhost"]\n')
    resolved = cli("policy", "explain", "localhost", "--config", str(policy), "--json",
                   env=env)
    data = json.loads(resolved.stdout)
    assert resolved.returncode == 1
    assert (data["decision"], data["reason"]) == ("deny", "private_address")
    assert "127.0.0.1" in data["addresses"]
    assert "which is loopback" in data["explanation"]
    skipped = cli("policy", "explain", "localhost", "--config", str(policy), "--no-resolve",
                  env=env)
    assert skipped.returncode == 0 and "ALLOW" in skipped.stdout


def test_explain_running_asks_the_proxy_with_its_session_approvals(tmp_path,
                                                                   plain_origin) -> None:
    process = ProxyProcess(tmp_path / "p", policy_text(plain_origin.port, default="ask"))
    try:
        before = process.cli("policy", "explain", f"ask3.test:{plain_origin.port}", "--running")
        assert before.returncode == 1 and "ASK" in before.stdout
        assert process.cli("approve", f"ask3.test:{plain_origin.port}", "--scope",
                           "session").returncode == 0
        after = process.cli("policy", "explain", f"ask3.test:{plain_origin.port}", "--running",
                            "--json")
        data = json.loads(after.stdout)
        assert after.returncode == 0 and data["decision"] == "allow" and data["running"]
        assert "approved by uid:" in data["explanation"] and "for the session" in (
            data["explanation"])
        assert data["address"] == "127.0.0.1"
    finally:
        process.stop()


# 6. Address refusals say what helps ---------------------------------------------------------

def test_private_address_refusal_gives_advice_that_helps(tmp_path, plain_origin) -> None:
    text = policy_text(plain_origin.port).replace(
        'allowed_cidrs = ["127.0.0.0/8", "::1/128"]', "allowed_cidrs = []")
    process = ProxyProcess(tmp_path / "p", text)
    try:
        sock = connect(process.port)
        sock.sendall(f"GET http://allowed.test:{plain_origin.port}/ HTTP/1.1\r\n"
                     f"Host: allowed.test:{plain_origin.port}\r\n\r\n".encode())
        answer = read_all(sock, timeout=5).decode()
    finally:
        process.stop()
    assert "allowed.test resolves to 127.0.0.1, which is loopback" in answer
    assert "network.allowed_cidrs" in answer
    assert "ask the person running the agent to allow it" not in answer


# 7. A busy port is said in our words ---------------------------------------------------------

def test_busy_port_names_the_listen_option(tmp_path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = cli("serve", "--listen", f"127.0.0.1:{port}", "--approval-socket",
                     str(tmp_path / "a.sock"), env=home(tmp_path))
    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "--listen HOST:PORT" in result.stderr and "--mode" not in result.stderr
    assert result.stderr.count("Errno") == 0


# 8. policy check reports everything at once -------------------------------------------------

def test_policy_check_reports_schema_and_pattern_errors_together(tmp_path) -> None:
    policy = tmp_path / "p.toml"
    policy.write_text('version = 1\n[network]\ndefualt = "ask"\nports = ["x"]\n'
                      'deny = ["*", "1.2.3.4.5"]\n')
    result = cli("policy", "check", str(policy))
    assert result.returncode == 2
    assert "(4 problems)" in result.stderr
    assert "network.deny[0]: a bare '*' is allowed in allow lists only" in result.stderr
    assert "network.deny[1]: '1.2.3.4.5'" in result.stderr
    assert "unknown key 'defualt'" in result.stderr


def test_policy_check_warns_about_a_host_both_allowed_and_denied(tmp_path) -> None:
    policy = tmp_path / "p.toml"
    policy.write_text('version = 1\n[network]\nallow = ["a.test", "**.b.test"]\n'
                      'deny = ["*.test"]\n')
    result = cli("policy", "check", str(policy))
    assert result.returncode == 0
    assert "allow rule 'a.test' is also denied by a deny rule, and deny wins" in result.stdout


# 9. An `always` with no user file says whose file it wrote ----------------------------------

def test_always_without_a_user_file_writes_a_file_that_says_so(tmp_path) -> None:
    process = ProxyProcess(tmp_path / "p", None)  # the built-in policy
    try:
        result = process.cli("approve", "new.test", "--scope", "always")
        assert result.returncode == 0, result.stderr
        written = tmp_path / "p" / "config" / "agent-egress" / "policy.toml"
        assert f"rule written to {written}" in result.stdout
        text = written.read_text()
        assert text.startswith("# agent-egress user policy: created ")
        assert "built-in default policy (used when no --config" not in text
        assert '"new.test"' in text
    finally:
        process.stop()


# 10. Unknown ids and a missing proxy are said plainly ---------------------------------------

def test_deny_with_an_unknown_id_says_so_and_lists_what_waits(tmp_path) -> None:
    process = ProxyProcess(tmp_path / "p", "version = 1\n")
    try:
        result = process.cli("deny", "0badc0de")
        assert result.returncode == 1
        assert "no pending request with id 0badc0de" in result.stderr
        assert "no requests are waiting" in result.stderr
    finally:
        process.stop()


# 11. Help and usage -----------------------------------------------------------------------

def test_unknown_arguments_print_the_subcommands_usage(tmp_path) -> None:
    result = cli("pending", "--bogus", env=home(tmp_path))
    assert result.returncode == 2
    assert result.stderr.startswith("usage: agent-egress pending")
    assert "unrecognized arguments: --bogus" in result.stderr
    nested = cli("policy", "check", "x.toml", "--bogus", env=home(tmp_path))
    assert nested.stderr.startswith("usage: agent-egress policy check")


@pytest.mark.parametrize("command, words", [("watch", "one key"), ("pending", "holds"),
                                            ("health", "exit 0")])
def test_every_command_has_a_description(command: str, words: str) -> None:
    result = cli(command, "--help")
    assert result.returncode == 0 and words in result.stdout.replace("\n", " ")


# 12. The audit log is private ---------------------------------------------------------------

def test_audit_log_is_private_by_default(tmp_path) -> None:
    env = home(tmp_path)
    state = Path(env["XDG_STATE_HOME"])
    result = subprocess.Popen(
        [sys.executable, "-m", "agent_egress.proxy", "serve", "--listen", "127.0.0.1:0",
         "--approval-socket", str(tmp_path / "a.sock")], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    try:
        for line in result.stdout:
            if line.startswith("  http_proxy="):
                break
    finally:
        result.terminate()
        result.wait(10)
    log = state / "agent-egress" / "audit.jsonl"
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    assert stat.S_IMODE(log.parent.stat().st_mode) == 0o700


def test_an_audit_log_the_admin_made_keeps_its_mode(tmp_path) -> None:
    log = tmp_path / "shared.jsonl"
    log.touch(mode=0o640)
    os.chmod(log, 0o640)
    ProxyProcess(tmp_path / "p", "version = 1\n", "--audit-log", str(log)).stop()
    assert stat.S_IMODE(log.stat().st_mode) == 0o640
    assert '"event": "proxy.started"' in log.read_text()


# 13. One edit, one reload -------------------------------------------------------------------

def test_one_edit_gives_one_policy_loaded_event(tmp_path) -> None:
    process = ProxyProcess(tmp_path / "p", "version = 1\n")
    try:
        mark = process.mark()
        process.policy_path.write_text('version = 1\n[network]\nallow = ["x.test"]\n')
        process.wait_for_event(lambda e: e["event"] == "policy.loaded", after=mark, timeout=10)
        assert process.cli("approve", "y.test", "--scope", "always").returncode == 0
        time.sleep(3)  # several reload polls
        loaded = [e for e in process.events()[mark:] if e["event"] == "policy.loaded"]
        assert len(loaded) == 2  # the edit, and the `always` write: one each
    finally:
        process.stop()
