"""PolicyReload and the Enforcer in-process, with mitmproxy's own test context."""

from __future__ import annotations

import asyncio
from pathlib import Path

from agent_egress.addons.approvals import Approvals
from agent_egress.addons.enforce import Enforcer
from agent_egress.addons.pinning import UpstreamPinning
from agent_egress.addons.reload import PolicyReload
from agent_egress.policy import Action
from mitmproxy.test import taddons


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict]] = []

    def emit(self, event: str, **fields) -> None:
        self.events.append((event, fields))

    def named(self, name: str) -> list[dict]:
        return [fields for event, fields in self.events if event == name]


def addons(audit: Recorder) -> tuple[Enforcer, PolicyReload]:
    enforcer = Enforcer(audit, UpstreamPinning(), Approvals(audit))  # type: ignore[arg-type]
    return enforcer, PolicyReload(enforcer, audit)  # type: ignore[arg-type]


def test_a_reload_applies_a_good_file_and_keeps_the_last_good_one_on_a_bad_one(
        tmp_path: Path) -> None:
    audit = Recorder()
    enforcer, reloader = addons(audit)
    policy = tmp_path / "policy.toml"
    policy.write_text('version = 1\n[network]\nallow = ["a.test"]\n')

    async def scenario() -> None:
        with taddons.context(enforcer, reloader) as context:
            context.configure(enforcer, policy_file=str(policy))
            assert enforcer.policy is not None
            assert enforcer.policy.decide("a.test", 443).action is Action.ALLOW
            policy.write_text('version = 1\n[network]\nallow = ["b.test"]\n')
            assert reloader.reload("edited")
            assert enforcer.policy.decide("b.test", 443).action is Action.ALLOW
            policy.write_text("version = 1\n[network\n")
            assert not reloader.reload("edited")
            assert enforcer.policy.decide("b.test", 443).action is Action.ALLOW  # kept

    asyncio.run(scenario())
    assert len(audit.named("policy.loaded")) == 2
    (rejected,) = audit.named("policy.rejected")
    assert rejected["trigger"] == "edited" and "not valid TOML" in rejected["error"]


def test_the_watch_follows_the_reload_interval(tmp_path: Path) -> None:
    audit = Recorder()
    enforcer, reloader = addons(audit)

    async def scenario() -> None:
        with taddons.context(enforcer, reloader) as context:
            context.configure(reloader, reload_interval=30)
            reloader.running()  # the watch starts, polling every 30 s
            context.configure(reloader, reload_interval=0.05)  # takes effect at once
            policy = tmp_path / "policy.toml"
            policy.write_text("version = 1\n")
            context.configure(enforcer, policy_file=str(policy))
            loaded = len(audit.named("policy.loaded"))
            policy.write_text('version = 1\n[network]\nallow = ["c.test"]\n')
            await asyncio.sleep(0.5)  # well under the old 30 s interval
            assert len(audit.named("policy.loaded")) == loaded + 1  # one edit, one reload
            reloader.done()

    asyncio.run(scenario())
