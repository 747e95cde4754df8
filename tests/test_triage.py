"""`agent-egress triage` on logs with known stories (tests/triage_stories.py), on a real proxy's
log, and with a real chat-completions server for the narrative."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triage_stories as stories
from conftest import policy_text
from modelserver import ModelServer
from proxyproc import ProxyProcess


def triage(*args: str, home: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ}
    if home is not None:
        env.update(HOME=str(home), XDG_CONFIG_HOME=str(home / "config"),
                   XDG_STATE_HOME=str(home / "state"))
    return subprocess.run([sys.executable, "-m", "agent_egress.proxy", "triage", *args],
                          capture_output=True, text=True, timeout=120, env=env,
                          stdin=subprocess.DEVNULL)


def sessions_of(result: subprocess.CompletedProcess) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {}
    for session in json.loads(result.stdout)["sessions"]:
        found.setdefault(session["agent"], []).append(session)
    return found


@pytest.fixture
def story_log(tmp_path):
    told = {name: make() for name, make in stories.STORIES.items()}
    path = tmp_path / "audit.jsonl"
    lines = stories.write(path, list(told.values()))
    return path, told, lines


def cited(finding: dict) -> set[str]:
    return {e["where"] for e in finding["evidence"]}


def test_known_stories_get_their_verdicts_and_cite_their_events(story_log):
    path, told, lines = story_log
    result = triage(str(path), "--format", "json")
    assert result.returncode == 3, result.stderr  # something to escalate
    found = sessions_of(result)
    verdicts = {agent: [s["verdict"] for s in sessions] for agent, sessions in found.items()}
    assert verdicts == {"pip-clean": ["expected"], "dns-flaky": ["benign_error"],
                        "spelly": ["escalate"], "cred-leak": ["escalate"],
                        "uploader": ["escalate", "expected"]}  # 2 h apart: two sessions

    def line_of(story: str, mark: str) -> str:
        return f"audit.jsonl:{lines[id(told[story].marked[mark])]}"

    (spelled,) = found["spelly"][0]["findings"]
    assert spelled["kind"] == "respelled_host" and spelled["count"] == 3
    assert cited(spelled) == {line_of("three_spellings", m) for m in ("plain", "homograph", "port")}
    (leak,) = found["cred-leak"][0]["findings"]
    assert leak["kind"] == "credential_misdirected"
    assert cited(leak) == {line_of("misdirected_credential", "leak")}
    (upload,) = found["uploader"][0]["findings"]
    assert upload["kind"] == "upload_burst" and cited(upload) == {
        line_of("upload_burst", "upload")}
    assert "typical 2,048 bytes" in upload["summary"]
    flaky = found["dns-flaky"][0]
    assert "3 DNS failures" in flaky["rationale"] and "1 timeout" in flaky["rationale"]
    assert "docs.example.net" in flaky["rationale"] and flaky["findings"] == []
    clean = found["pip-clean"][0]
    mirror = next(d for d in clean["timeline"] if d["host"] == "mirror.example.org")
    assert mirror["approved_by"] == {"person": 1} and mirror["held"] == 1
    pypi = next(d for d in clean["timeline"] if d["host"] == "pypi.org")
    assert (pypi["tunnels"], pypi["bytes_up"]) == (3, 2700)


def test_exit_status_and_filters(story_log, tmp_path):
    path, _, _ = story_log
    assert triage(str(path), "--agent", "pip-clean").returncode == 0
    assert triage(str(path), "--agent", "dns-flaky").returncode == 0  # benign
    only = sessions_of(triage(str(path), "--host", "drop.example.org", "--format", "json"))
    assert list(only) == ["uploader"] and len(only["uploader"]) == 1
    later = sessions_of(triage(str(path), "--since", "2026-12-01T10:00", "--format", "json"))
    assert list(later) == ["uploader"]
    bad = triage(str(path), "--since", "yesterday-ish")
    assert bad.returncode == 2 and "neither a duration" in bad.stderr
    missing = triage(str(tmp_path / "nope.jsonl"))
    assert missing.returncode == 2 and "no such audit log" in missing.stderr


def test_rotated_and_gzipped_logs_read_as_one(story_log, tmp_path):
    path, _, _ = story_log
    lines = path.read_text().splitlines(keepends=True)
    directory = tmp_path / "logs"
    directory.mkdir()
    (directory / "audit.jsonl.1.gz").write_bytes(gzip.compress("".join(lines[:60]).encode()))
    (directory / "audit.jsonl").write_text("".join(lines[60:]) + "not json\n")
    result = triage(str(directory), "--format", "json")
    data = json.loads(result.stdout)
    assert data["malformed_lines"] == 1
    verdicts = {s["agent"]: s["verdict"] for s in data["sessions"]}
    assert verdicts["spelly"] == "escalate" and verdicts["pip-clean"] == "expected"


def test_dns_tunnel_names_bursts_bypasses_and_person_denials(tmp_path):
    story = stories.Story("tunneler")
    for n in range(4):
        story.decided(f"{'a8f3k2m9q7x1b5z' if n % 2 else 'q9z8x7w6v5u4t3s2'}{n}.exfil-data.com",
                      "held", "needs_approval")
    burst = stories.Story("burster")
    for n in range(25):
        burst.decided(f"site{n}.example.org", "deny", "not_allowlisted")
    bypass = stories.Story("bypasser")
    bypass.decided("allowed.example.com", "deny", "sni_mismatch", sni="evil.example")
    bypass.decided("203.0.113.9", "deny", "ip_literal")
    bypass.decided("allowed.example.com", "deny", "tunnel_protocol",
                   detail="no complete TLS ClientHello or HTTP request in the tunnel within "
                          "30 s (network.header_timeout)")  # slow, not evasive
    pushy = stories.Story("pushy")
    for n in range(3):
        pushy.event("approval.decided", host=f"x{n}.example.net", port=443, decision="deny",
                    scope="once", actor="uid:1000", released=1)
    path = tmp_path / "audit.jsonl"
    stories.write(path, [story, burst, bypass, pushy])
    found = sessions_of(triage(str(path), "--format", "json"))
    kinds = {agent: [f["kind"] for f in s[0]["findings"]] for agent, s in found.items()}
    assert kinds == {"tunneler": ["dns_tunnel_shape"], "burster": ["unknown_burst"],
                     "bypasser": ["bypass_attempt"], "pushy": ["approval_denials"]}
    bypasses = found["bypasser"][0]["findings"][0]
    assert bypasses["count"] == 2 and "sni_mismatch x1" in bypasses["summary"]


def test_agent_text_is_escaped_in_markdown_and_html(tmp_path):
    story = stories.Story("\x1b[2Jevil|<b>*x*")
    story.decided("credit.example.com", "deny", "credential_misdirected",
                  detail="</td><script>alert(1)</script>")
    path = tmp_path / "audit.jsonl"
    stories.write(path, [story])
    markdown = triage(str(path)).stdout
    assert "\x1b" not in markdown and "\\x1b\\[2Jevil\\|\\<b\\>\\*x\\*" in markdown
    assert "<script>" not in markdown
    page = triage(str(path), "--format", "html").stdout
    assert "<script>" not in page and "&lt;script&gt;" in page and "\x1b" not in page


def test_a_real_proxy_log(tmp_path, plain_origin, client_env):
    proxy = ProxyProcess(tmp_path / "proxy", policy_text(plain_origin.port))
    try:
        url = f"http://allowed.test:{plain_origin.port}/hello"
        for args in ([], ["-H", "Host: evil.test"]):
            subprocess.run(["curl", "-sS", "-x", proxy.url.replace("://", "://bot7@"), *args,
                            url], env=client_env, capture_output=True, timeout=30)
    finally:
        proxy.stop()
    result = triage(str(proxy.audit_path), "--format", "json")
    assert result.returncode == 3, result.stderr
    (session,) = sessions_of(result)["bot7"]
    (finding,) = session["findings"]
    assert finding["kind"] == "bypass_attempt" and "host_mismatch" in finding["summary"]


def test_model_narrative_for_sessions_to_escalate(story_log, tmp_path):
    path, _, _ = story_log
    model = ModelServer()
    try:
        policy = tmp_path / "policy.toml"
        policy.write_text(f'version = 1\n[approvals.auto_review]\nmodel_url = '
                          f'"{model.base_url}"\nmodel = "m"\n')
        model.script = [("answer", {"narrative": "The agent tried a paste site three ways."})]
        result = triage(str(path), "--model", "--config", str(policy), "--format", "json",
                        home=tmp_path)
        assert result.returncode == 3, result.stderr
        found = sessions_of(result)
        assert found["spelly"][0]["narrative"] == "The agent tried a paste site three ways."
        assert found["pip-clean"][0]["narrative"] is None  # only sessions to escalate
        assert len(model.received) == 3  # cred-leak, spelly, uploader (its first session)
        system, user = (m["content"] for m in model.received[0]["messages"])
        assert "spelly" not in system and "pastebin" not in system
        block = user.partition("<untrusted-data>\n")[2].partition("\n</untrusted-data>")[0]
        assert json.loads(block)["verdict"] == "escalate"
        model.script = [("status", 500)]
        failed = sessions_of(triage(str(path), "--model", "--config", str(policy),
                                    "--format", "json", home=tmp_path))
        assert failed["spelly"][0]["narrative"].startswith("(no narrative")
        assert failed["spelly"][0]["verdict"] == "escalate"  # the rules verdict stands
    finally:
        model.stop()
    unconfigured = tmp_path / "plain.toml"
    unconfigured.write_text("version = 1\n")
    result = triage(str(path), "--model", "--config", str(unconfigured), home=tmp_path)
    assert result.returncode == 2 and "model_url" in result.stderr
