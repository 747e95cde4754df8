"""Auto-review end to end: a real proxy, a real curl, a plain-HTTP origin on port 80 of a
loopback address (web ports are part of what the reviewer scores, so the origin listens on
one), names mapped to it by the policy's [resolve]."""

from __future__ import annotations

import json
import os
import ssl
import time

import pytest
from holding import wait_pending
from origins import CountingServer
from otlp import HttpReceiver
from proxyproc import ProxyProcess
from reviewing import ORIGIN_ADDRESS, WatchTerminal, curl, fetch, review_policy

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to listen on port 80")

NAMES = ["test.pypi.org", "docs.rs", "webhook.site", "transfer.sh", "pastebin.com",
         "a8f3k2m9q7x1b5z.example.com"]


@pytest.fixture(scope="module")
def web443(tmp_path_factory, ca):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert(*NAMES).configure_cert(context)
    server = CountingServer("web443", tmp_path_factory.mktemp("web443"), context,
                            (ORIGIN_ADDRESS, 443)).start()
    yield server
    server.stop()


@pytest.fixture
def review_proxy(tmp_path, web80):
    process = ProxyProcess(tmp_path / "proxy", review_policy(NAMES))
    yield process
    process.stop()


def test_low_risk_host_is_released_without_a_person(review_proxy, web443, client_env):
    out = fetch(client_env, review_proxy, "https://test.pypi.org/hello")
    assert out.startswith("HTTP/1.1 200") and "hello from web443" in out
    reviewed = review_proxy.wait_for_event(lambda e: e["event"] == "approval.reviewed")
    assert reviewed["reviewer"] == "rules" and reviewed["risk_level"] == "low"
    assert reviewed["outcome"] == "allow" and reviewed["signals"] == ["allowed_domain"]
    assert "pypi.org is already allowed" in reviewed["rationale"]
    assert reviewed["latency_ms"] < 1000 and reviewed.get("method") is None  # a CONNECT
    decided = review_proxy.wait_for_event(lambda e: e["event"] == "approval.decided")
    assert decided["actor"] == "auto-review:rules" and decided["scope"] == "session"
    allowed = review_proxy.wait_for_event(lambda e: e.get("reason") == "approved")
    assert allowed["approval_actor"] == "auto-review:rules"
    assert not review_proxy.events("approval.requested")  # nobody was asked
    # The session grant answers the next request: no second review.
    assert fetch(client_env, review_proxy, "https://test.pypi.org/hello").startswith(
        "HTTP/1.1 200")
    assert len(review_proxy.events("approval.reviewed")) == 1
    explained = review_proxy.cli("policy", "explain", "--running", "test.pypi.org")
    assert "approved by auto-review:rules for the session (auto-review's decision" in (
        explained.stdout), explained.stdout


def test_over_plain_http_an_approval_is_for_that_request_alone(review_proxy, web80,
                                                               client_env):
    for _ in range(2):
        out = fetch(client_env, review_proxy, "http://test.pypi.org/hello")
        assert out.startswith("HTTP/1.1 200") and "hello from web80" in out
    reviews = review_proxy.events("approval.reviewed")
    assert [e["method"] for e in reviews] == ["GET", "GET"]
    assert {e["scope"] for e in review_proxy.events("approval.decided")} == {"once"}


def test_critical_host_is_refused_with_the_rationale(review_proxy, web80, client_env):
    before = web80.connections
    out = fetch(client_env, review_proxy, "http://webhook.site/hello?token=s3cret")
    assert out.startswith("HTTP/1.1 403")
    assert "denied by auto-review:rules" in out
    assert "webhook.site is a webhook/request-capture service" in out
    assert web80.connections == before
    refused = review_proxy.wait_for_event(lambda e: e.get("reason") == "denied_by_approver")
    assert refused["approval_actor"] == "auto-review:rules"
    assert "s3cret" not in review_proxy.audit_path.read_text()


def test_high_risk_host_waits_for_a_person_with_the_rationale(review_proxy, web80,
                                                              client_env):
    held = curl(client_env, review_proxy, "http://a8f3k2m9q7x1b5z.example.com/hello")
    pending = wait_pending(review_proxy, lambda p: p["host"].startswith("a8f3"))
    assert pending["review"]["state"] == "escalated"
    assert pending["review"]["risk_level"] == "high"
    assert "looks random" in pending["review"]["rationale"]
    listing = review_proxy.cli("pending").stdout
    assert "auto-review: high risk" in listing and "looks random" in listing
    time.sleep(0.3)
    assert held.poll() is None  # still waiting for a person
    assert review_proxy.cli("approve", pending["id"]).returncode == 0
    out, _ = held.communicate(timeout=30)
    assert out.startswith("HTTP/1.1 200")


def test_denials_pause_auto_review_until_a_person_resumes_it(review_proxy, web80,
                                                             client_env):
    for name in ("webhook.site", "transfer.sh", "pastebin.com"):
        assert fetch(client_env, review_proxy, f"http://{name}/hello",
                     agent="bot1").startswith("HTTP/1.1 403")
    paused = review_proxy.wait_for_event(lambda e: e["event"] == "auto_review.paused")
    assert paused["denials"] == 3 and paused["agent"] == "bot1"
    # A low-risk host now goes to a person too, and says why.
    held = curl(client_env, review_proxy, "http://docs.rs/hello", agent="bot1")
    pending = wait_pending(review_proxy, lambda p: p["host"] == "docs.rs")
    assert pending["review"]["state"] == "paused"
    listing = review_proxy.cli("pending").stdout
    assert "auto-review paused" in listing and "--resume-auto bot1" in listing
    assert review_proxy.cli("deny", pending["id"]).returncode == 0
    assert held.communicate(timeout=30)[0].startswith("HTTP/1.1 403")
    result = review_proxy.cli("approve", "--resume-auto", "bot1")
    assert result.returncode == 0, result.stderr
    assert "resumed auto-review" in result.stdout
    resumed = review_proxy.wait_for_event(lambda e: e["event"] == "auto_review.resumed")
    assert resumed["actor"] == f"uid:{os.getuid()}"
    assert fetch(client_env, review_proxy, "http://docs.rs/hello",
                 agent="bot1").startswith("HTTP/1.1 200")
    # Reports count what auto-review did, per host and per agent.
    report = json.loads(review_proxy.cli_report("--decision", "all", "--format", "json"))
    assert report["totals"]["auto_review"]["bot1"] == {"auto-denied": 3, "auto-approved": 1}
    hosts = {h["host"]: h for h in report["hosts"]}
    assert hosts["webhook.site"]["approvals"]["auto_review"] == {"auto-denied": 1}
    table = review_proxy.cli_report("--decision", "all")
    assert "auto-review by agent:" in table and "bot1: auto-approved 1, auto-denied 3" in table


def test_deny_rules_and_the_address_guard_come_before_any_review(tmp_path, web80, client_env):
    proxy = ProxyProcess(tmp_path / "proxy", review_policy(
        NAMES, extra='deny = ["test.pypi.org"]').replace('allowed_cidrs = ["127.0.0.0/8"]', ""))
    try:
        out = fetch(client_env, proxy, "http://test.pypi.org/hello")
        assert out.startswith("HTTP/1.1 403") and "denylist" in out
        out = fetch(client_env, proxy, "http://docs.rs/hello")  # low risk, but loopback
        assert out.startswith("HTTP/1.1 403") and "private_address" in out
        reviews = proxy.events("approval.reviewed")
        assert [e["host"] for e in reviews] == ["docs.rs"]
        assert json.dumps(reviews[0]["outcome"]) == '"allow"'
    finally:
        proxy.stop()


@pytest.mark.filterwarnings("ignore:.*forkpty.*:DeprecationWarning")
def test_watch_shows_a_pause_and_r_resumes_it(review_proxy, web80, client_env):
    terminal = WatchTerminal(review_proxy)
    try:
        terminal.read_until(b"watching")
        # A high-risk name is asked about with the rules reviewer's reason beside it.
        held = curl(client_env, review_proxy, "http://a8f3k2m9q7x1b5z.example.com/hello")
        terminal.read_until(b"[q]uit?")
        assert b"[auto-review: high risk (rules): high risk: a label looks random" in (
            terminal.output)
        terminal.press(b"d")
        assert held.communicate(timeout=30)[0].startswith("HTTP/1.1 403")
        for name in ("webhook.site", "transfer.sh", "pastebin.com"):
            fetch(client_env, review_proxy, f"http://{name}/hello", agent="bot2")
        terminal.read_until(b"(or press r)")
        assert b"auto-review paused for" in terminal.output
        assert b"--resume-auto bot2" in terminal.output
        terminal.press(b"r")
        terminal.read_until(b"resumed auto-review for")
        assert fetch(client_env, review_proxy, "http://docs.rs/hello",
                     agent="bot2").startswith("HTTP/1.1 200")
    finally:
        terminal.close()


def test_scope_once_reviews_every_request_again(tmp_path, web80, client_env):
    proxy = ProxyProcess(tmp_path / "proxy", review_policy(NAMES, auto_review='scope = "once"'))
    try:
        for _ in range(2):
            assert fetch(client_env, proxy, "http://docs.rs/hello").startswith("HTTP/1.1 200")
        assert len(proxy.events("approval.reviewed")) == 2
        assert {e["scope"] for e in proxy.events("approval.decided")} == {"once"}
        explained = proxy.cli("policy", "explain", "--running", "docs.rs:80")
        assert "docs.rs:80  ASK" in explained.stdout and "auto-review" not in explained.stdout
    finally:
        proxy.stop()


def test_reviews_are_exported_over_otlp(tmp_path, web80, client_env):
    receiver = HttpReceiver()
    proxy = ProxyProcess(tmp_path / "proxy", review_policy(NAMES), env={
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf", "OTEL_METRIC_EXPORT_INTERVAL": "300"})
    try:
        assert fetch(client_env, proxy, "http://test.pypi.org/hello").startswith("HTTP/1.1 200")
        assert fetch(client_env, proxy, "http://webhook.site/").startswith("HTTP/1.1 403")
        received = receiver.received
        received.wait_for(lambda: "agent_egress.auto_review.reviews" in received.metrics)
    finally:
        proxy.stop()
        receiver.stop()
    reviews = {e["attributes"]["server.address"]: e for e in received.events(
        "approval.reviewed")}
    low = reviews["test.pypi.org"]
    assert low["body"] == "rules review of test.pypi.org:80: low risk, allow"
    assert low["attributes"]["agent_egress.risk_level"] == "low"
    assert low["attributes"]["agent_egress.signals"] == ["allowed_domain"]
    assert "pypi.org is already allowed" in low["attributes"]["agent_egress.rationale"]
    assert reviews["webhook.site"]["attributes"]["agent_egress.outcome"] == "deny"
    counted = {(p["attributes"]["agent_egress.outcome"], p["attributes"]["agent_egress.risk_level"])
               : p["value"] for p in received.metrics["agent_egress.auto_review.reviews"]}
    assert counted == {("allow", "low"): 1, ("deny", "critical"): 1}
