"""Triage against an agent that wants its session to look harmless, or triage to fail (an
independent review's findings, kept as regressions)."""

from __future__ import annotations

import gzip
import json

import triage_stories as stories
from agent_egress.proxy.triage import Triage
from test_triage import sessions_of, triage


def verdicts(path) -> dict[str, list[str]]:
    return {agent: [s["verdict"] for s in sessions]
            for agent, sessions in sessions_of(triage(str(path), "--format", "json")).items()}


def test_an_upload_split_into_chunks_or_under_a_fresh_name_is_still_one_upload(tmp_path):
    chunks = stories.Story("chunker")
    for _ in range(30):
        chunks.fetch("pypi.org", up=2_000)
    for _ in range(30):
        chunks.tunnel("a.drop.example.net", 900_000)  # each under 1 MiB
        chunks.tunnel("b.drop.example.net", 900_000)  # and over two names
    fresh = stories.Story("fresh-name")
    fresh.tunnel("drop.example.org", 500_000_000)  # its only tunnel: no norm to hide in
    raiser = stories.Story("raiser")
    for _ in range(30):
        raiser.tunnel("pypi.org", 4_000_000)  # raising its own "typical" upload
    raiser.at(7200)
    for _ in range(30):
        raiser.tunnel("pypi.org", 4_000_000)
    raiser.at(7200)
    for _ in range(30):
        raiser.tunnel("pypi.org", 4_000_000)
    raiser.at(7200).tunnel("drop.example.com", 30_000_000)
    path = tmp_path / "audit.jsonl"
    stories.write(path, [chunks, fresh, raiser])
    found = sessions_of(triage(str(path), "--format", "json"))
    (chunked,) = found["chunker"][0]["findings"]
    assert chunked["kind"] == "upload_burst" and "to example.net in 60 tunnels" in (
        chunked["evidence"][0]["text"])
    assert found["fresh-name"][0]["verdict"] == "escalate"
    assert [s["verdict"] for s in found["raiser"]][-1] == "escalate"


def test_a_host_name_cannot_make_a_bypass_look_like_a_slow_tunnel(tmp_path):
    story = stories.Story("sly")
    story.decided("within.wild.test", "deny", "tunnel_protocol",
                  detail="raw TCP to within.wild.test, which network.raw_tcp does not list")
    path = tmp_path / "audit.jsonl"
    stories.write(path, [story])
    assert verdicts(path) == {"sly": ["escalate"]}


def test_names_checked_whatever_the_decision(tmp_path):
    dns = stories.Story("dns-tunnel")
    for n in range(6):  # under an allowed wildcard: resolved, and failing
        dns.decided(f"q9z8x7w6v5u4t3s{n}a8f3.exfil-data.com", "deny", "dns_error")
    queue = stories.Story("queue-flood")
    for n in range(30):
        queue.decided(f"host{n}.example.org", "deny", "approval_queue_full")
    path = tmp_path / "audit.jsonl"
    stories.write(path, [dns, queue])
    found = sessions_of(triage(str(path), "--format", "json"))
    assert [f["kind"] for f in found["dns-tunnel"][0]["findings"]] == ["dns_tunnel_shape"]
    assert [f["kind"] for f in found["queue-flood"][0]["findings"]] == ["unknown_burst"]


def test_a_session_of_held_requests_is_not_expected(tmp_path):
    story = stories.Story("waiting")
    story.decided("unknown.example.org", "held", "needs_approval")
    path = tmp_path / "audit.jsonl"
    stories.write(path, [story])
    (session,) = sessions_of(triage(str(path), "--format", "json"))["waiting"]
    assert session["verdict"] == "benign_error" and "nobody decided" in session["rationale"]


def test_rotated_logs_are_read_oldest_first(tmp_path):
    story = stories.Story("spread")
    story.decided("pastebin.com", "deny", "denylist")
    story.at(600).decided("pastebin.net", "deny", "not_allowlisted")
    directory = tmp_path / "logs"
    directory.mkdir()
    first, second = (json.dumps(e) + "\n" for e in story.events)
    (directory / "audit.jsonl").write_text(second)  # the current log: the later event
    (directory / "audit.jsonl.1.gz").write_bytes(gzip.compress(first.encode()))
    assert verdicts(directory) == {"spread": ["escalate"]}


def test_a_new_agent_name_per_request_is_grouped_past_a_bound(tmp_path):
    story = stories.Story("a0")
    for n in range(10):
        story.agent = f"name{n}"
        story.decided("x.example.org", "deny", "not_allowlisted")
    path = tmp_path / "audit.jsonl"
    stories.write(path, [story])
    result = Triage(max_agents=3)
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        result.add_line(str(path), number, line)
    sessions = result.finish()
    assert sorted(s.agent for s in sessions) == [
        "client 127.0.0.1", "name0", "name1", "name2"]
    assert result.names_grouped == 7


def test_malformed_lines_are_counted_not_fatal(tmp_path):
    story = stories.Story("ok")
    story.fetch("pypi.org")
    path = tmp_path / "audit.jsonl"
    stories.write(path, [story])
    with path.open("a") as out:
        out.write('{"event": ' * 5000 + "1" + "}" * 5000 + "\n")  # nested past the limit
        out.write('{"event": [], "time": "2026-12-01T09:00:01Z"}\n')
        out.write('{"event": "request.decided", "time": "2026-12-01T09:00:02", "agent": "ok",'
                  ' "host": "pypi.org", "port": 443, "decision": "allow", "reason": "x"}\n')
    result = triage(str(path), "--since", "2026-12-01T08:00", "--format", "json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["malformed_lines"] == 1 and data["sessions"][0]["events"] == 3
