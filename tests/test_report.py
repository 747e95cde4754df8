"""`agent-egress report` on generated audit logs with known content, every format checked."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from agent_egress.proxy.report import registrable_domain
from reporting import decided, report, write_log


@pytest.fixture
def logs(tmp_path: Path) -> list[Path]:
    first = write_log(tmp_path / "audit.jsonl.1.gz", [
        decided("2026-11-20T10:00:00Z", "evil.test", "deny", "not_allowlisted", agent="a1",
                path="/x"),
        decided("2026-11-20T10:30:00Z", "evil.test", "deny", "not_allowlisted", agent="a2",
                path="/y"),
        decided("2026-11-20T11:00:00Z", "pypi.org", "allow", "allowlist", agent="a1",
                rule="pypi.org", layer="user"),
    ], gz=True)
    second = write_log(tmp_path / "audit.jsonl", [
        decided("2026-11-21T09:00:00Z", "evil.test", "deny", "not_allowlisted", agent="a2",
                path="/x"),
        decided("2026-11-21T09:05:00Z", "sub.evil.test", "deny", "not_allowlisted", agent="a3"),
        "this is not json",
        decided("2026-11-21T09:10:00Z", "x.pastebin.com", "deny", "denylist", agent="a1",
                rule="**.pastebin.com", layer="managed"),
        decided("2026-11-21T09:11:00Z", "x.pastebin.com", "deny", "denylist", agent="a1",
                rule="**.pastebin.com", layer="managed"),
        decided("2026-11-21T09:20:00Z", "ask.example.com", "held", "needs_approval", agent="a2"),
        {"time": "2026-11-21T09:20:00Z", "event": "approval.requested", "schema": 1,
         "approval_id": "abcd1234", "host": "ask.example.com", "port": 443},
        {"time": "2026-11-21T09:21:00Z", "event": "approval.decided", "schema": 1,
         "approval_id": "abcd1234", "host": "ask.example.com", "port": 443, "decision": "deny",
         "scope": "once", "actor": "uid:0", "released": 1},
        decided("2026-11-21T09:21:00Z", "ask.example.com", "deny", "denied_by_approver",
                agent="a2"),
        '{"truncated": ',
    ])
    return [first, second]





def test_registrable_domains() -> None:
    assert registrable_domain("a.b.example.co.uk") == "example.co.uk"
    assert registrable_domain("files.pythonhosted.org") == "pythonhosted.org"
    assert registrable_domain("sub.evil.test") == "evil.test"
    assert registrable_domain("203.0.113.7") == "203.0.113.7"


def test_json_report_is_exact(logs) -> None:
    result = report(*map(str, logs), "--format", "json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    totals = data["totals"]
    assert {k: totals[k] for k in ("events", "requests", "hosts", "domains", "agents",
                                   "malformed_lines")} == {
        "events": 11, "requests": 7, "hosts": 4, "domains": 3, "agents": 3,
        "malformed_lines": 2}
    assert totals["malformed_at"] == [f"{logs[1]}:3", f"{logs[1]}:10"]
    hosts = data["hosts"]
    assert [(h["host"], h["count"]) for h in hosts] == [
        ("evil.test", 3), ("x.pastebin.com", 2), ("sub.evil.test", 1), ("ask.example.com", 1)]
    evil = hosts[0]
    assert evil == {
        "domain": "evil.test", "host": "evil.test", "count": 3,
        "first_seen": "2026-11-20T10:00:00Z", "last_seen": "2026-11-21T09:00:00Z",
        "agents": ["a1", "a2"], "ports": [443], "example_paths": ["/x", "/y"],
        "reasons": {"not_allowlisted": 3}, "rules": {}, "decisions": {"deny": 3},
        "approvals": {"asked": 0, "decided": {}, "timeouts": 0, "auto_review": {}}}
    assert hosts[1]["rules"] == {"**.pastebin.com": 2}
    assert hosts[3]["approvals"] == {"asked": 1, "decided": {"deny by uid:0 (once)": 1},
                                     "timeouts": 0, "auto_review": {}}
    assert data["timeline"] == {"2026-11-20T10": 2, "2026-11-21T09": 5}


def test_filters(logs) -> None:
    def hosts(*args: str) -> list[tuple[str, int]]:
        data = json.loads(report(*map(str, logs), "--format", "json", *args).stdout)
        return [(h["host"], h["count"]) for h in data["hosts"]]

    assert hosts("--since", "2026-11-21") == [("x.pastebin.com", 2), ("evil.test", 1),
                                               ("sub.evil.test", 1), ("ask.example.com", 1)]
    assert hosts("--until", "2026-11-21") == [("evil.test", 2)]
    assert hosts("--agent", "a1") == [("x.pastebin.com", 2), ("evil.test", 1)]
    assert hosts("--decision", "allow") == [("pypi.org", 1)]
    assert hosts("--decision", "held") == [("ask.example.com", 1)]
    assert sum(n for _, n in hosts("--decision", "all")) == 9
    bad = report(str(logs[0]), "--since", "yesterday")
    assert bad.returncode == 2 and "neither a duration like 24h/7d nor a date" in bad.stderr


def test_csv_report_is_exact(logs) -> None:
    rows = list(csv.reader(io.StringIO(report(*map(str, logs), "--format", "csv").stdout)))
    assert rows[0] == ["count", "domain", "host", "ports", "agents", "first_seen", "last_seen",
                       "why", "example_paths", "approvals"]
    assert rows[1] == ["3", "evil.test", "evil.test", "443", "a1,a2", "2026-11-20T10:00:00Z",
                       "2026-11-21T09:00:00Z", "not_allowlisted", "/x /y", ""]
    assert rows[2][7] == "denylist (**.pastebin.com)"
    assert rows[4][9] == "asked 1; deny by uid:0 (once) x1"
    assert len(rows) == 5


def test_markdown_and_table(logs) -> None:
    markdown = report(*map(str, logs), "--format", "markdown").stdout.splitlines()
    assert markdown[0] == "# agent-egress report"
    assert markdown[2].startswith("7 blocked requests to 4 hosts in 3 domains by 3 agents "
                                  "(11 events in 2 files); 2 malformed lines skipped:")
    assert markdown[4] == ("| count | domain | host | ports | agents | first_seen | last_seen "
                           "| why | example_paths | approvals |")
    assert markdown[6].startswith("| 3 | evil.test | evil.test | 443 | a1,a2 |")
    table = report(*map(str, logs)).stdout.splitlines()
    assert table[0] == markdown[2].replace("\\_", "_")  # markdown escapes its own syntax
    assert table[2].split() == ["count", "domain", "host", "ports", "agents", "last_seen", "why",
                                "approvals"]
    assert table[4].split()[:5] == ["3", "evil.test", "evil.test", "443", "a1,a2"]


def test_html_is_self_contained(logs, tmp_path) -> None:
    out = tmp_path / "report.html"
    result = report(*map(str, logs), "--format", "html", "-o", str(out))
    assert result.returncode == 0 and "wrote" in result.stderr
    page = out.read_text()
    assert page.count('<rect class="bar"') == 2
    assert page.count("<tr>") == 5
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert "@media print" in page


@pytest.mark.skipif(shutil.which("chromium") is None and not os.environ.get("CI"),
                    reason="Debian's chromium is not installed (.ci/run installs it)")
def test_html_renders_in_a_real_browser(logs, tmp_path) -> None:
    out = tmp_path / "report.html"
    report(*map(str, logs), "--format", "html", "-o", str(out))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1000,900"]
    shot = tmp_path / "shot.png"
    subprocess.run(["chromium", *flags, f"--screenshot={shot}", out.as_uri()],
                   capture_output=True, timeout=120, check=True)
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 10_000  # a rendered page, not blank
    dom = subprocess.run(["chromium", *flags, "--dump-dom", out.as_uri()], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    assert '<svg id="timeline"' in dom and dom.count('class="bar"') == 2
    assert "evil.test" in dom


def test_missing_log_is_a_clear_error(tmp_path) -> None:
    result = report(str(tmp_path / "nope.jsonl"))
    assert result.returncode == 2 and "no such audit log" in result.stderr


def test_report_on_a_real_proxy_log(tmp_path, plain_origin, client_env) -> None:
    from proxyproc import ProxyProcess

    process = ProxyProcess(tmp_path / "p", f'version = 1\n[network]\ndefault = "deny"\n'
                                           f"ports = [{plain_origin.port}]\n")
    try:
        for host in ("one.test", "two.test", "one.test"):
            subprocess.run(["curl", "-sS", "-x", f"http://bot@127.0.0.1:{process.port}",
                            f"http://{host}:{plain_origin.port}/p?secret=1"], env=client_env,
                           capture_output=True, timeout=30)
    finally:
        process.stop()
    data = json.loads(report(str(process.audit_path), "--format", "json").stdout)
    assert [(h["host"], h["count"], h["agents"], h["example_paths"]) for h in data["hosts"]] == [
        ("one.test", 2, ["bot"], ["/p"]), ("two.test", 1, ["bot"], ["/p"])]


def test_progress_bar_only_on_a_terminal(tmp_path) -> None:
    import pty

    log = write_log(tmp_path / "big.jsonl", [
        decided("2026-11-20T10:00:00Z", f"h{i % 10}.test", "deny", "not_allowlisted")
        for i in range(60_000)])
    piped = report(str(log), "--format", "json")
    assert piped.returncode == 0 and piped.stderr == ""
    leader, follower = pty.openpty()
    with subprocess.Popen([sys.executable, "-m", "agent_egress.proxy", "report", str(log),
                           "--format", "json"], stdout=subprocess.DEVNULL, stderr=follower) as p:
        os.close(follower)
        seen = b""
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
        assert p.wait(timeout=60) == 0
    os.close(leader)
    assert b"reading audit logs [" in seen
