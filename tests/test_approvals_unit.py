"""Approvals in-process, with mitmproxy's own test objects: coalescing, expiry, a policy
change, and the order of an `always` decision."""

from __future__ import annotations

import asyncio

import pytest
from agent_egress.addons.approvals import Approvals
from agent_egress.addons.pending import ApprovalError
from agent_egress.policy import Action, Decision, PolicyError, Problem, Reason, parse_policy
from mitmproxy.test import taddons, tflow


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict]] = []

    def emit(self, event: str, **fields) -> None:
        self.events.append((event, fields))

    def named(self, name: str) -> list[dict]:
        return [fields for event, fields in self.events if event == name]


def held(host: str, port: int = 443) -> Decision:
    return Decision(Action.ASK, Reason.NEEDS_APPROVAL, host, port)


def run(scenario) -> None:
    async def main() -> None:
        with taddons.context():
            await scenario()
    asyncio.run(main())


def test_requests_for_one_destination_share_one_approval_and_one_decision() -> None:
    audit = Recorder()
    approvals = Approvals(audit)  # type: ignore[arg-type]

    async def scenario() -> None:
        first = asyncio.ensure_future(approvals.hold(tflow.tflow(), held("a.test"), 30))
        second = asyncio.ensure_future(approvals.hold(tflow.tflow(), held("a.test"), 30))
        await asyncio.sleep(0)
        assert len(approvals.pending) == 1
        (pending,) = approvals.snapshot()
        assert pending["waiting"] == 2 and pending["requests"] == 2
        result = approvals.decide(pending["id"], "allow", "once", "uid:0")
        assert result["released"] == 2
        assert (await first).action is Action.ALLOW and (await second).action is Action.ALLOW
        assert approvals.pending == {}

    run(scenario)
    assert len(audit.named("approval.requested")) == 1


def test_a_pending_approval_expires_with_a_timeout_verdict() -> None:
    audit = Recorder()
    approvals = Approvals(audit)  # type: ignore[arg-type]

    async def scenario() -> None:
        verdict = await approvals.hold(tflow.tflow(), held("slow.test"), 0.05)
        assert (verdict.action, verdict.scope) == (Action.DENY, "timeout")

    run(scenario)
    assert audit.named("approval.decided")[0]["actor"] == "timeout"


def test_a_policy_change_releases_what_it_now_decides_and_sets_the_scopes() -> None:
    audit = Recorder()
    approvals = Approvals(audit)  # type: ignore[arg-type]
    policy = parse_policy('version = 1\n[network]\nallow = ["now.test"]\n', "p.toml")

    async def scenario() -> None:
        covered = asyncio.ensure_future(approvals.hold(tflow.tflow(), held("now.test"), 30))
        other = asyncio.ensure_future(approvals.hold(tflow.tflow(), held("still.test"), 30))
        await asyncio.sleep(0)
        approvals.policy_changed(policy)
        assert (await covered).scope == "reload"  # the enforcer re-decides it by the rule
        assert not other.done()
        approvals.done()

    run(scenario)
    assert approvals.allowed_scopes == frozenset({"once", "session", "always"})
    strict = parse_policy("version = 1\n", "p.toml")
    approvals.policy_changed(strict)  # nothing pending: only the scopes
    with pytest.raises(ApprovalError):
        approvals.decide("x.test", "maybe", "once", "uid:0")


def test_always_writes_then_releases_then_reloads() -> None:
    audit = Recorder()
    steps: list[str] = []
    approvals: Approvals

    def write_rule(action: Action, host: str, port: int | None) -> str:
        steps.append(f"write {action.value} {host}:{port} (held: {len(approvals.pending)})")
        return "/tmp/policy.toml"

    def reload_policy() -> None:
        steps.append(f"reload (held: {len(approvals.pending)})")

    approvals = Approvals(audit, write_rule, reload_policy)  # type: ignore[arg-type]

    async def scenario() -> None:
        waiting = asyncio.ensure_future(approvals.hold(tflow.tflow(), held("w.test"), 30))
        await asyncio.sleep(0)
        result = approvals.decide("w.test:443", "allow", "always", "uid:0")
        assert result["released"] == 1 and result["written"] == "/tmp/policy.toml"
        assert (await waiting).scope == "always"

    run(scenario)
    assert steps == ["write allow w.test:443 (held: 1)", "reload (held: 0)"]


def test_always_that_cannot_be_written_decides_nothing() -> None:
    audit = Recorder()

    def write_rule(action: Action, host: str, port: int | None) -> str:
        raise PolicyError("/tmp/policy.toml", [Problem("the user policy file is gone")])

    approvals = Approvals(audit, write_rule, lambda: None)  # type: ignore[arg-type]

    async def scenario() -> None:
        waiting = asyncio.ensure_future(approvals.hold(tflow.tflow(), held("w.test"), 30))
        await asyncio.sleep(0)
        with pytest.raises(ApprovalError, match="the user policy file is gone"):
            approvals.decide("w.test:443", "allow", "always", "uid:0")
        assert not waiting.done() and len(approvals.pending) == 1
        approvals.done()

    run(scenario)
    assert audit.named("approval.decided") == []


def test_a_session_grant_with_an_end_lapses_then() -> None:
    import time as clock

    from agent_egress.addons.pending import Verdict
    from agent_egress.policy import Action

    forever = Verdict(Action.ALLOW, "session", "uid:1")
    ended = Verdict(Action.ALLOW, "session", "uid:1", expires=clock.monotonic() - 1)
    running = Verdict(Action.ALLOW, "session", "uid:1", expires=clock.monotonic() + 60)
    tunnels = Verdict(Action.ALLOW, "session", "auto", connect_only=True)
    assert not forever.lapsed() and not running.lapsed()
    assert ended.lapsed()
    assert tunnels.lapsed(connect=False) and not tunnels.lapsed(connect=True)
