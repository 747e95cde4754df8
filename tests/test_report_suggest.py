"""`agent-egress report --suggest`: three groups of candidates, each with its evidence.

allow: what a person approved or audit mode would have refused for want of a rule; deny: what a
person denied or a rule refused and nobody approved; and hosts refused only for their address
or DNS, which no rule would change: comments, never rules.
"""

from __future__ import annotations

import json
import subprocess
import tomllib
from pathlib import Path

import pytest
from reporting import decided, report, write_log

PRIVATE_DETAIL = "db.corp.test resolves to 10.1.2.3, a non-public address"
DNS_DETAIL = "DNS lookup for nxdomain.test failed: Name or service not known"


def approval(time: str, host: str, decision: str | None, actor: str, scope: str, *,
             approval_id: str | None = "id1", port: int = 443) -> dict:
    event = {"time": time, "event": "approval.decided", "schema": 1, "host": host,
             "port": port, "scope": scope, "actor": actor, "released": 1}
    if decision is not None:
        event["decision"] = decision
    if approval_id is not None:
        event["approval_id"] = approval_id
    return event


def audit(time: str, host: str, decision: str, reason: str, agent: str) -> dict:
    return {**decided(time, host, decision, reason, agent=agent), "mode": "audit",
            "enforced": False}


def with_fields(event: dict, **fields) -> dict:
    return {**event, **fields}


@pytest.fixture
def log(tmp_path: Path) -> Path:
    return write_log(tmp_path / "audit.jsonl", [
        # A person approved it for the session; a second agent's request rode on that.
        decided("2026-11-20T10:00:00Z", "approved.test", "held", "needs_approval", agent="a1"),
        approval("2026-11-20T10:00:05Z", "approved.test", "allow", "uid:1000", "session"),
        with_fields(decided("2026-11-20T10:00:05Z", "approved.test", "allow", "approved",
                            agent="a1"), approval_actor="uid:1000", approval_scope="session"),
        with_fields(decided("2026-11-20T10:20:00Z", "approved.test", "allow", "approved",
                            agent="a2"), approval_actor="uid:1000", approval_scope="session"),
        # Approved ahead of any request, for good.
        approval("2026-11-20T10:01:00Z", "ahead.test", "allow", "uid:1000", "always",
                 approval_id=None),
        # Audit mode: traffic flowed, but enforcing would have refused or held it.
        audit("2026-11-20T10:02:00Z", "audit.test", "deny", "not_allowlisted", "a1"),
        audit("2026-11-20T10:03:00Z", "audit.test", "deny", "not_allowlisted", "a2"),
        audit("2026-11-20T10:04:00Z", "audit.test", "held", "needs_approval", "a1"),
        # A person denied it.
        decided("2026-11-20T10:05:00Z", "denied.test", "held", "needs_approval", agent="a1"),
        approval("2026-11-20T10:05:09Z", "denied.test", "deny", "uid:1000", "once"),
        with_fields(decided("2026-11-20T10:05:09Z", "denied.test", "deny", "denied_by_approver",
                            agent="a1"), approval_actor="uid:1000", approval_scope="once"),
        # A person denied, then changed their mind: the latest decision counts.
        approval("2026-11-20T10:06:00Z", "changed.test", "deny", "uid:1000", "once"),
        approval("2026-11-20T10:07:00Z", "changed.test", "allow", "uid:1000", "session"),
        # Refused by rule, never approved.
        decided("2026-11-20T10:08:00Z", "rule.test", "deny", "denylist", agent="a1",
                rule="rule.test", layer="user"),
        decided("2026-11-20T10:09:00Z", "rule.test", "deny", "denylist", agent="a3",
                rule="rule.test", layer="user"),
        decided("2026-11-20T10:10:00Z", "unlisted.test", "deny", "not_allowlisted", agent="a2"),
        decided("2026-11-20T10:11:00Z", "fronted.test", "deny", "sni_mismatch", agent="a2"),
        # Nobody answered in time.
        decided("2026-11-20T10:12:00Z", "timeout.test", "held", "needs_approval", agent="a1"),
        approval("2026-11-20T10:14:00Z", "timeout.test", "deny", "timeout", "timeout"),
        decided("2026-11-20T10:14:00Z", "timeout.test", "deny", "approval_timeout", agent="a1"),
        # Refused only for its address or DNS: the network, not the policy.
        with_fields(decided("2026-11-20T10:15:00Z", "db.corp.test", "deny", "private_address",
                            agent="a1"), detail=PRIVATE_DETAIL),
        with_fields(decided("2026-11-20T10:16:00Z", "db.corp.test", "deny", "private_address",
                            agent="a2"), detail=PRIVATE_DETAIL),
        with_fields(decided("2026-11-20T10:17:00Z", "nxdomain.test", "deny", "dns_error",
                            agent="a1"), detail=DNS_DETAIL),
        decided("2026-11-20T10:18:00Z", "flaky.test", "allow", "allowlist", agent="a1",
                rule="flaky.test", layer="user"),
        with_fields(decided("2026-11-20T10:19:00Z", "flaky.test", "deny", "dns_error",
                            agent="a1", rule="flaky.test", layer="user"),
                    detail="DNS lookup for flaky.test timed out"),
        # An allowed host that was also the target of a fronting attempt: no deny rule for it.
        decided("2026-11-20T10:21:00Z", "mixed.test", "allow", "allowlist", agent="a1",
                rule="mixed.test", layer="user"),
        decided("2026-11-20T10:22:00Z", "mixed.test", "deny", "sni_mismatch", agent="a2"),
        # The administrator's deny rule: never suggested, in any group.
        decided("2026-11-20T10:23:00Z", "x.pastebin.com", "deny", "denylist", agent="a1",
                rule="**.pastebin.com", layer="managed"),
        decided("2026-11-20T10:24:00Z", "x.pastebin.com", "deny", "dns_error", agent="a1"),
        # Refused for its port: a host rule would be the wrong answer.
        decided("2026-11-20T10:25:00Z", "port.test", "deny", "port_not_allowed", agent="a1",
                port=8443),
    ])


def _comment_lines(text: str, heading: str) -> list[str]:
    """The comment lines of the section that starts with `heading`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if heading in line)
    section = []
    for line in lines[start + 1:]:
        if not line.startswith("#   "):
            break
        section.append(line)
    return section


def test_suggestions_come_in_three_groups(log) -> None:
    result = report(str(log), "--suggest")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    network = tomllib.loads(text)["network"]
    assert sorted(network) == ["allow", "deny"]
    assert sorted(network["allow"]) == ["ahead.test", "approved.test", "audit.test",
                                        "changed.test"]
    assert sorted(network["deny"]) == ["denied.test", "fronted.test", "rule.test",
                                       "timeout.test", "unlisted.test"]
    # Refused for its address or DNS: a comment saying so, never a rule.
    check = _comment_lines(text, "Check the network, not the policy")
    assert [line.split()[1].rstrip(":") for line in check] == ["db.corp.test", "flaky.test",
                                                   "nxdomain.test"]
    db = next(line for line in check if "db.corp.test" in line)
    assert "private_address x2" in db and "10.1.2.3" in db
    assert "2 requests by 2 agents (a1, a2)" in db
    assert "first 2026-11-20T10:15:00Z, last 2026-11-20T10:16:00Z" in db
    assert "DNS lookup for nxdomain.test failed" in next(c for c in check if "nxdomain" in c)
    assert "pastebin" not in text
    assert "port.test" not in network["allow"] + network["deny"]
    assert "mixed.test" not in network["allow"] + network["deny"]
    out = log.parent / "candidates.toml"
    written = report(str(log), "--suggest", "-o", str(out))
    assert out.read_text() == text
    assert written.stderr == (f"wrote {out}: 4 allow candidates, 5 deny candidates, "
                              "3 hosts to check the network\n")


def test_each_suggestion_carries_its_evidence(log) -> None:
    lines = report(str(log), "--suggest").stdout.splitlines()

    def line(host: str) -> str:
        return next(text for text in lines if text.startswith(f'    "{host}"'))

    approved = line("approved.test")
    assert "a person allowed it 1x (allow by uid:1000 (session) x1)" in approved
    assert "2 requests by 2 agents (a1, a2)" in approved
    assert "first 2026-11-20T10:00:00Z, last 2026-11-20T10:20:00Z" in approved
    assert "allow by uid:1000 (always)" in line("ahead.test")
    assert "0 requests" in line("ahead.test")
    audited = line("audit.test")
    assert "audit mode would have refused it 3x (not_allowlisted x2, needs_approval x1)" \
        in audited and "3 requests by 2 agents (a1, a2)" in audited
    changed = line("changed.test")
    assert "a person allowed it 1x" in changed and "also denied it 1x" in changed
    denied = line("denied.test")
    assert "a person denied it 1x (deny by uid:1000 (once) x1)" in denied
    assert "1 request by 1 agent (a1)" in denied  # singular
    rule = line("rule.test")
    assert "refused 2x: denylist (rule.test) x2; never approved" in rule
    assert "2 requests by 2 agents (a1, a3)" in rule
    assert "refused 1x: approval_timeout x1" in line("timeout.test")
    text = "\n".join(lines)
    assert "mixed.test" in text and "port.test" in text  # said why they are not suggested
    mixed = next(text for text in lines if "mixed.test" in text)
    assert mixed.startswith("# not suggested") and "allowed 1x" in mixed


def test_suggestions_as_json_carry_the_same_groups(log) -> None:
    toml = tomllib.loads(report(str(log), "--suggest").stdout)["network"]
    result = report(str(log), "--suggest", "--format", "json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert [c["pattern"] for c in data["allow"]] == toml["allow"]
    assert [c["pattern"] for c in data["deny"]] == toml["deny"]
    assert [c["host"] for c in data["check_network"]] == ["db.corp.test", "flaky.test",
                                                          "nxdomain.test"]
    approved = next(c for c in data["allow"] if c["pattern"] == "approved.test")
    assert {k: approved[k] for k in ("basis", "requests", "agents", "first_seen", "last_seen",
                                     "ports")} == {
        "basis": "approved", "requests": 2, "agents": ["a1", "a2"],
        "first_seen": "2026-11-20T10:00:00Z", "last_seen": "2026-11-20T10:20:00Z",
        "ports": [443]}
    assert approved["approvals"] == {"allow by uid:1000 (session)": 1}
    db = data["check_network"][0]
    assert db["reasons"] == {"private_address": 2} and db["details"] == {
        "private_address": PRIVATE_DETAIL}
    assert {s["host"] for s in data["not_suggested"]} == {"mixed.test", "port.test"}
    assert "evidence" in approved and "pastebin" not in result.stdout
    for bad in ("csv", "markdown", "html"):
        refused = report(str(log), "--suggest", "--format", bad)
        assert refused.returncode == 2 and "--suggest" in refused.stderr


def test_suggest_respects_the_managed_policy(log, tmp_path) -> None:
    managed = tmp_path / "managed.toml"
    managed.write_text('version = 1\n[network]\ndeny = ["approved.test", "**.rule.test"]\n')
    text = report(str(log), "--suggest", "--managed", str(managed)).stdout
    network = tomllib.loads(text)["network"]
    assert "approved.test" not in network["allow"] and "rule.test" not in network["deny"]
    assert "audit.test" in network["allow"]


def test_suggest_reads_every_decision(log) -> None:
    """--decision filters the report; suggestions need allowed and refused requests alike."""
    refused = report(str(log), "--suggest", "--decision", "deny")
    assert refused.returncode == 2 and "--decision" in refused.stderr


def test_suggest_on_a_real_proxy_log(tmp_path, plain_origin, client_env) -> None:
    from proxyproc import ProxyProcess

    port = plain_origin.port
    process = ProxyProcess(tmp_path / "p", f"""version = 1
[network]
default = "ask"
allow = ["db.test"]
ports = [{port}]
allowed_cidrs = ["127.0.0.0/8"]
[approvals]
timeout = 1
[resolve]
"ask.test" = "127.0.0.1"
"ask2.test" = "127.0.0.1"
"ask3.test" = "127.0.0.1"
"db.test" = "10.0.0.1"
""")
    try:
        for decision, host in (("approve", "ask.test"), ("deny", "ask2.test")):
            done = process.cli(decision, f"{host}:{port}", "--scope", "session")
            assert done.returncode == 0, done.stderr
        for host in ("ask.test", "ask.test", "ask2.test", "ask3.test", "db.test"):
            subprocess.run(["curl", "-sS", "-x", f"http://bot@127.0.0.1:{process.port}",
                            f"http://{host}:{port}/p"], env=client_env, capture_output=True,
                           timeout=30)
    finally:
        process.stop()
    text = report(str(process.audit_path), "--suggest").stdout
    network = tomllib.loads(text)["network"]
    assert network == {"allow": ["ask.test"], "deny": ["ask2.test", "ask3.test"]}, text
    check = _comment_lines(text, "Check the network, not the policy")
    assert len(check) == 1 and "db.test" in check[0] and "private_address x1" in check[0]
    assert "10.0.0.1" in check[0]
