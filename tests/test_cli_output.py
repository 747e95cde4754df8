"""`policy explain`, `policy show` and `health` print text from files and proxies escaped."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

from proxyproc import ProxyProcess

RAW_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e"
                          "\u2066-\u2069]")
HOSTILE_DIR = "dir\x1b[2J\u202e"  # a file name can hold anything; so can an error about it


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent_egress.proxy", *args],
                          capture_output=True, text=True, timeout=30, env=env,
                          stdin=subprocess.DEVNULL)


def assert_clean(result: subprocess.CompletedProcess) -> None:
    for name, text in (("stdout", result.stdout), ("stderr", result.stderr)):
        found = RAW_CONTROLS.findall(text)
        assert not found, f"raw control characters on {name}: {found!r}\n{text!r}"


def test_explain_shows_a_hostile_target_escaped_and_json_exact() -> None:
    target = "evil\x1b[2J\u202e.test"
    result = run("policy", "explain", "--no-resolve", target)
    assert result.returncode == 1
    assert_clean(result)
    assert result.stdout.startswith("evil\\x1b[2J\\u202e.test:443  DENY\n")
    data = json.loads(run("policy", "explain", "--no-resolve", target, "--json").stdout)
    assert data["host"] == target and data["target"] == target


def test_explain_shows_an_idn_beside_its_unicode_form() -> None:
    result = run("policy", "explain", "--no-resolve", "xn--80ak6aa92e.com")
    assert result.stdout.startswith("xn--80ak6aa92e.com:443 (аррӏе.com)  ASK\n")


def test_show_escapes_sources_origins_and_errors(tmp_path: Path) -> None:
    directory = tmp_path / HOSTILE_DIR
    directory.mkdir()
    policy = directory / "policy.toml"
    policy.write_text('version = 1\n[network]\nallow = ["a.test"]\n')
    result = run("policy", "show", "--config", str(policy), "--approval-socket",
                 str(tmp_path / "none.sock"))
    assert result.returncode == 0, result.stderr
    assert_clean(result)
    assert "dir\\x1b[2J\\u202e/policy.toml" in result.stdout
    assert re.search(r"  allow a\.test +\S*dir\\x1b\[2J\\u202e/policy\.toml", result.stdout)
    # A policy error quoting an agent-chosen key: stderr is a terminal too.
    policy.write_text('version = 1\n[network]\n"k\\u001b[2J\\u202e" = 1\n')
    broken = run("policy", "show", "--config", str(policy), "--approval-socket",
                 str(tmp_path / "none.sock"))
    assert broken.returncode == 2
    assert_clean(broken)
    assert "unknown key" in broken.stderr
    assert len(broken.stderr.splitlines()) == 2  # the error's own lines, no more


def test_show_and_health_report_a_failed_reload_escaped(tmp_path: Path) -> None:
    proxy = ProxyProcess(tmp_path / HOSTILE_DIR, 'version = 1\n[network]\ndefault = "deny"\n')
    try:
        proxy.policy_path.write_text('version = 1\n[network]\n"k\\u001b[2J\\u202e" = 1\n')
        deadline = time.monotonic() + 15
        while not proxy.events("policy.rejected"):
            assert time.monotonic() < deadline, "the proxy did not notice the edit"
            time.sleep(0.1)
        env = proxy.env()
        show = run("policy", "show", "--config", str(proxy.policy_path), "--approval-socket",
                   str(proxy.socket_path), env=env)
        assert_clean(show)
        assert "LAST RELOAD FAILED" in show.stdout
        assert "network.k\\x1b[2J\\u202e: unknown key" in show.stdout
        health = run("health", "--approval-socket", str(proxy.socket_path), env=env)
        assert health.returncode == 0, health.stderr
        assert_clean(health)
        assert f"{HOSTILE_DIR}/policy.toml".encode("unicode_escape").decode() in health.stdout
        assert "LAST RELOAD FAILED" in health.stdout
    finally:
        proxy.stop()
