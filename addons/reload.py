"""Live reload: a changed policy file (or SIGHUP) is loaded without dropping connections.

A file that fails to load leaves the last good policy in force; the failure is logged as an
event and shown by `agent-egress policy show`. Open tunnels keep running; new requests use the
new policy.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent_egress.policy import PolicyError, Problem
from agent_egress.policy.files import FileTrust, files_signature, policy_file_trust
from mitmproxy import ctx

from .auditlog import AuditLog
from .connections import listen_addresses
from .enforce import Enforcer

logger = logging.getLogger(__name__)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class PolicyReload:
    def __init__(self, enforcer: Enforcer, audit: AuditLog) -> None:
        self.enforcer = enforcer
        self.audit = audit
        self._task: asyncio.Task[None] | None = None
        self._loaded_at = _now()
        self._failure: dict[str, Any] | None = None
        self._trust = FileTrust()
        self._attempted: tuple[Any, ...] | None = None

    def load(self, loader: Any) -> None:
        loader.add_option("reload_interval", float, 1.0,
                          "Seconds between checks for changed policy files; 0 turns it off.")
        loader.add_option("managed_owners", Sequence[int], [],
                          "Uids besides root that may own the managed policy (an admin account).")
        loader.add_option("agent_uid", int, -1,
                          "The uid the agent runs as, when known (-1: unknown).")

    def file_trust(self) -> FileTrust:
        """Who can change the policy files, as checked now (the user file may have been
        replaced by one the agent can write since the proxy started)."""
        policy = self.enforcer.policy
        return policy_file_trust(
            Path(ctx.options.policy_file) if ctx.options.policy_file else None,
            Path(ctx.options.managed_policy_file) if ctx.options.managed_policy_file else None,
            managed_owners=ctx.options.managed_owners,
            agent_uid=ctx.options.agent_uid if ctx.options.agent_uid >= 0 else None,
            protected=bool(policy and policy.settings.protected_file))

    def running(self) -> None:
        self._trust = self.file_trust()
        self._loaded_at = _now()
        self._restart_watch()

    def configure(self, updated: set[str]) -> None:
        if "reload_interval" in updated and self._task is not None:
            self._restart_watch()  # an interval changed while running takes effect at once

    def _restart_watch(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if ctx.options.reload_interval > 0:
            self._task = asyncio.create_task(self._watch())

    def done(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(ctx.options.reload_interval)
            # Compared with what the policy in force was read from, however it was loaded (an
            # `always` approval reloads it itself): one edit, one reload.
            current = files_signature((ctx.options.policy_file,
                                       ctx.options.managed_policy_file))
            if current not in (self.enforcer.loaded_from, self._attempted):
                self._attempted = current  # a file that fails is retried once it changes
                self.reload("file changed")

    def reload(self, why: str = "requested", **fields: Any) -> bool:
        """Load the policy afresh; ``fields`` go into a `policy.rejected` event."""
        trust = self.file_trust()
        try:
            if trust.refusals:
                raise PolicyError(ctx.options.managed_policy_file or ctx.options.policy_file,
                                  [Problem(refusal) for refusal in trust.refusals])
            policy = self.enforcer.reload()
        except PolicyError as exc:
            self._failure = {"at": _now(), "why": why, "error": str(exc)}
            self.audit.emit("policy.rejected", trigger=why, error=str(exc),
                            problems=[p.render(exc.path) for p in exc.problems], **fields)
            logger.error(f"policy reload failed, the previous policy stays in force:\n{exc}")
            return False
        self._trust = trust
        self._failure = None
        self._loaded_at = _now()
        logger.warning(f"policy reloaded ({why}): {policy.allow_count + policy.deny_count} rules"
                     + (f", {len(policy.problems)} settings not applied" if policy.problems
                        else ""))
        return True

    def status(self) -> dict[str, Any]:
        """What `policy show` reports about the running proxy."""
        policy = self.enforcer.policy
        return {
            "listen": listen_addresses(),
            "socks": listen_addresses(socks=True),
            "policy": ctx.options.policy_file or "built-in default policy",
            "managed": ctx.options.managed_policy_file or None,
            "mode": policy.settings.mode if policy else None,
            "loaded_at": self._loaded_at,
            "violations": list(policy.problems) if policy else [],
            "last_reload_failure": self._failure,
            "file_warnings": list(self._trust.warnings),
        }
