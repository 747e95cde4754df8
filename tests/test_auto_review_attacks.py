"""Auto-review under attack (an independent review's findings, kept as regressions): nothing
here may let a request through that should have gone to a person. Every name maps to a
loopback origin of the test, so a wrong allow lands on this machine and is seen."""

from __future__ import annotations

import os
import signal
import time
from importlib import resources

import pytest
from holding import wait_pending
from modelserver import ALLOW, ModelServer
from proxyproc import ProxyProcess
from reviewing import ORIGIN_ADDRESS, curl, fetch, review_policy

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to listen on port 80")

ESCALATE = {"risk_level": "medium", "outcome": "escalate", "rationale": "unsure"}
DENY = {"risk_level": "high", "outcome": "deny", "rationale": "no"}


@pytest.fixture
def model():
    server = ModelServer()
    yield server
    server.stop()


def model_keys(model: ModelServer, **extra: object) -> str:
    lines = [f'model_url = "{model.base_url}"', 'model = "m"', "timeout = 5",
             *(f"{key} = {value}" for key, value in extra.items())]
    return "\n".join(lines)


def reached(origin, path: str) -> bool:
    return any(f" {path} " in f" {request} " for request in origin.requests)


def test_a_request_refused_by_the_queue_leaves_no_model_consult_behind(tmp_path, web80, model,
                                                                      client_env):
    names = ["filler-notes.org", "victim-notes.org"]
    proxy = ProxyProcess(tmp_path / "p", review_policy(
        names, auto_review=model_keys(model),
        extra="").replace("timeout = 30", "timeout = 30\nmax_pending_per_agent = 1"))
    try:
        model.script = [("answer", ESCALATE)]
        filler = curl(client_env, proxy, "http://filler-notes.org/")
        wait_pending(proxy, lambda p: p["host"] == "filler-notes.org"
                     and (p["review"] or {}).get("state") == "escalated")
        # The rules are unsure of victim (a model consult would follow), but the agent's queue
        # is full: refused at once.
        assert "approval_queue_full" in fetch(client_env, proxy, "http://victim-notes.org/x")
        assert proxy.cli("deny", "filler-notes.org").returncode == 0
        filler.communicate(timeout=30)
        # A write to victim: the rules escalate it to a person (a write on an unknown host is
        # high); the model must not be asked about the earlier GET and release this POST.
        model.script = [("answer", ALLOW)]
        post = curl(client_env, proxy, "http://victim-notes.org/upload", "-d", "s=hunter2")
        pending = wait_pending(proxy, lambda p: p["host"] == "victim-notes.org")
        time.sleep(0.5)
        assert post.poll() is None and not reached(web80, "/upload")
        assert not [e for e in proxy.events("approval.reviewed") if e["reviewer"] == "model"
                    and e["host"] == "victim-notes.org"]
        assert proxy.cli("deny", pending["id"]).returncode == 0
        post.communicate(timeout=30)
    finally:
        proxy.stop()


def test_no_model_allow_applies_once_the_breaker_paused(tmp_path, web80, model, client_env):
    names = [f"brk{n}-notes.org" for n in range(5)]
    proxy = ProxyProcess(tmp_path / "p", review_policy(
        names, auto_review=model_keys(model, max_denials=1)).replace(
        "timeout = 30", "timeout = 6"))
    try:
        model.script = [("delayed", (0.2, DENY)), ("delayed", (1.5, ALLOW))]
        held = [curl(client_env, proxy, f"http://{name}/probe-{n}")
                for n, name in enumerate(names)]
        for process in held:
            process.communicate(timeout=30)
        paused = proxy.events("auto_review.paused")
        assert paused
        allowed = [e for e in proxy.events("approval.decided") if e["decision"] == "allow"]
        assert allowed == [] and not any(reached(web80, f"/probe-{n}") for n in range(5))
        late = [e for e in proxy.events("approval.reviewed") if e.get("proposed") == "allow"]
        assert late and all(e["outcome"] == "escalate" for e in late)
    finally:
        proxy.stop()


def test_a_model_answer_after_auto_review_was_turned_off_does_not_apply(tmp_path, web80,
                                                                         model, client_env):
    proxy = ProxyProcess(tmp_path / "p", review_policy(
        ["late-notes.org"], auto_review=model_keys(model)).replace("timeout = 30",
                                                                    "timeout = 6"))
    try:
        model.script = [("delayed", (2, ALLOW))]
        held = curl(client_env, proxy, "http://late-notes.org/late")
        wait_pending(proxy, lambda p: p["host"] == "late-notes.org")
        after = len(proxy.events())
        proxy.policy_path.write_text(proxy.policy_path.read_text().replace(
            "enabled = true", "enabled = false"))
        proxy.process.send_signal(signal.SIGHUP)
        proxy.wait_for_event(lambda e: e["event"] == "policy.loaded", after=after)
        held.communicate(timeout=30)
        assert not reached(web80, "/late")
        assert not [e for e in proxy.events("approval.decided") if e["decision"] == "allow"]
    finally:
        proxy.stop()


def default_policy_with_review(names: list[str]) -> str:
    text = resources.files("agent_egress.policy").joinpath("default.toml").read_text()
    resolve = "\n".join(f'"{name}" = "{ORIGIN_ADDRESS}"' for name in names)
    return text.replace("allowed_cidrs = []", 'allowed_cidrs = ["127.0.0.0/8"]') + f"""
[approvals]
timeout = 3

[approvals.auto_review]
enabled = true

[resolve]
{resolve}
"""


def test_a_sibling_of_an_allowed_service_is_not_low_risk(tmp_path, web80, client_env):
    # The built-in policy allows developer.mozilla.org and static.rust-lang.org: not their
    # organisations' paste and playground services.
    names = ["paste.mozilla.org", "play.rust-lang.org", "test.pypi.org"]
    proxy = ProxyProcess(tmp_path / "p", default_policy_with_review(names))
    try:
        assert "allowed_cidrs" in proxy.policy_path.read_text()
        for url in ("http://paste.mozilla.org/a", "http://play.rust-lang.org/b"):
            assert fetch(client_env, proxy, url).startswith("HTTP/1.1 403")
        assert not reached(web80, "/a") and not reached(web80, "/b")
        # pypi.org itself is allowed: a name under it still is low risk.
        fetch(client_env, proxy, "http://test.pypi.org/c")
        assert reached(web80, "/c")
    finally:
        proxy.stop()


def test_a_read_auto_approved_over_plain_http_does_not_approve_a_write(tmp_path, web80,
                                                                      client_env):
    proxy = ProxyProcess(tmp_path / "p", review_policy(["test.pypi.org"]).replace(
        "timeout = 30", "timeout = 3"))
    try:
        fetch(client_env, proxy, "http://test.pypi.org/read")
        fetch(client_env, proxy, "http://test.pypi.org/again")  # a read again: reviewed, fine
        assert reached(web80, "/read") and reached(web80, "/again")
        out, _ = curl(client_env, proxy, "http://test.pypi.org/upload", "-d",
                      "s=1").communicate(timeout=30)
        assert "approval_timeout" in out and not reached(web80, "/upload")
    finally:
        proxy.stop()


def test_max_risk_medium_without_a_model_does_not_approve_the_unknown(tmp_path, web80,
                                                                      client_env):
    proxy = ProxyProcess(tmp_path / "p", review_policy(
        ["exfil-notes.org"], auto_review='max_risk = "medium"').replace(
        "timeout = 30", "timeout = 3"))
    try:
        out = fetch(client_env, proxy, "http://exfil-notes.org/leak")
        assert "approval_timeout" in out and not reached(web80, "/leak")
    finally:
        proxy.stop()


def test_a_write_joining_a_read_under_model_review_is_decided_afresh(tmp_path, web80, model,
                                                                     client_env):
    proxy = ProxyProcess(tmp_path / "p", review_policy(
        ["join-notes.org"], auto_review=model_keys(model)).replace("timeout = 30",
                                                                    "timeout = 6"))
    try:
        model.script = [("delayed", (1.5, ALLOW)), ("answer", ESCALATE)]
        read = curl(client_env, proxy, "http://join-notes.org/read")
        wait_pending(proxy, lambda p: p["host"] == "join-notes.org")
        write = curl(client_env, proxy, "http://join-notes.org/upload", "-d", "s=hunter2")
        read.communicate(timeout=30)
        out, _ = write.communicate(timeout=30)
        assert reached(web80, "/read") and not reached(web80, "/upload")
        assert "approval_timeout" in out  # it went to a person, who did not answer
        reviewed = [(e["reviewer"], e.get("method"), e["outcome"])
                    for e in proxy.events("approval.reviewed")]
        assert ("rules", "POST", "escalate") in reviewed  # the write had its own review
    finally:
        proxy.stop()


def test_a_tunnel_to_port_80_does_not_carry_writes_past_review(tmp_path, web80, client_env):
    proxy = ProxyProcess(tmp_path / "p", review_policy(["test.pypi.org"]).replace(
        "timeout = 30", "timeout = 3"))
    try:
        # curl -p: CONNECT test.pypi.org:80, then the POST inside the tunnel.
        out, _ = curl(client_env, proxy, "http://test.pypi.org/upload-tunnel", "-p", "-d",
                      "s=1").communicate(timeout=30)
        assert not reached(web80, "/upload-tunnel")
        out, _ = curl(client_env, proxy, "http://test.pypi.org/upload-plain", "-d",
                      "s=1").communicate(timeout=30)
        assert "approval_timeout" in out and not reached(web80, "/upload-plain")
        fetch(client_env, proxy, "http://test.pypi.org/read-plain")  # a read: reviewed, low
        assert reached(web80, "/read-plain")
    finally:
        proxy.stop()


def test_an_in_label_glob_vouches_only_for_what_it_matches(tmp_path, web80, client_env):
    proxy = ProxyProcess(tmp_path / "p", review_policy(["paste.corp-cdn.com"]).replace(
        'allow = ["pypi.org"]', 'allow = ["pypi.org", "us-*.corp-cdn.com"]').replace(
        "timeout = 30", "timeout = 3"))
    try:
        assert "approval_timeout" in fetch(client_env, proxy, "http://paste.corp-cdn.com/leak")
        assert not reached(web80, "/leak")
    finally:
        proxy.stop()


def test_the_model_is_not_asked_about_approvals_that_expired_in_its_queue(tmp_path, web80,
                                                                          model, client_env):
    names = [f"q{n}-notes.org" for n in range(12)]
    proxy = ProxyProcess(tmp_path / "p", review_policy(
        names, auto_review=model_keys(model)).replace("timeout = 30", "timeout = 1"))
    try:
        model.script = [("delayed", (1.5, ESCALATE))]
        held = [curl(client_env, proxy, f"http://{name}/x") for name in names]
        for process in held:
            process.communicate(timeout=30)
        time.sleep(4)  # the first four answers come back; the queue behind them is dropped
        assert len(model.received) == 4
    finally:
        proxy.stop()
