"""`serve --managed-url`: the managed layer comes from a signed policy at a URL, refreshed.

The Enforcer builds its managed layer from the verified text this addon holds in memory, never
from a file the agent could write. A new version that verifies and validates is put in force
like a changed file (a reload: open tunnels keep running); one that does not is rejected with a
`policy.rejected` event and the version in force stays. A proxy that never had a good version
refuses every request (`managed_policy_unavailable`) and keeps trying at every refresh.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Protocol

from agent_egress.policy.files import UnsafePath
from agent_egress.policy.loader import ManagedUnavailable
from agent_egress.policy.signed import FETCH_FAILED, INVALID, Rejection, SignedPolicy
from agent_egress.policy.source import ParsedFile
from mitmproxy import ctx

from .auditlog import AuditLog

logger = logging.getLogger(__name__)

ManagedLayer = ParsedFile | ManagedUnavailable  # what the Enforcer compiles as its managed layer


class ManagedSource(Protocol):
    """Where versions come from (proxy/managed_url.py ManagedURL)."""

    shown: str  # the URL, as events and people see it
    floor: int
    fetched_at: str | None

    async def fetch(self, in_force: SignedPolicy | None) -> SignedPolicy | None: ...
    def cached(self) -> SignedPolicy | None: ...
    def commit(self, signed: SignedPolicy) -> None: ...


def managed_fields(managed: Any) -> dict[str, Any]:
    """The managed layer's fields of a `policy.loaded` event: its file or URL, the serial of a
    signed one, and whether it is unavailable (everything refused)."""
    if isinstance(managed, ManagedUnavailable):
        return {"managed": managed.source, "managed_unavailable": True}
    if isinstance(managed, ParsedFile):
        return {"managed": managed.source, "serial": managed.model.serial}
    return {"managed": str(managed) if managed else None}


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class ManagedURLPolicy:
    """Holds the managed policy in force, from the URL or its verified cache, and refreshes it
    every `managed_refresh` seconds."""

    def __init__(self, source: ManagedSource, audit: AuditLog,
                 reload: Callable[..., bool]) -> None:
        self.source = source
        self.audit = audit
        self.reload = reload  # PolicyReload.reload: the enforcer rebuilt with layer()
        self.in_force: SignedPolicy | None = None
        self._uncommitted: SignedPolicy | None = None  # fetched at start, cached once running
        self._failure: dict[str, Any] | None = None
        self._held: list[dict[str, Any]] | None = None  # start()'s events, until the log opens
        self._task: asyncio.Task[None] | None = None

    def load(self, loader: Any) -> None:
        loader.add_option("managed_refresh", float, 60.0,
                          "Seconds between checks of --managed-url for a new version (with "
                          "If-None-Match); 0 turns refreshing off.")

    async def start(self) -> None:
        """Before the proxy listens: the verified cache (it also sets the serial floor), then
        the URL's version if it is newer and good."""
        self._held = []  # serve's options (the audit log's path) are applied next
        try:
            self.in_force = self.source.cached()
        except Rejection as exc:
            self._rejected(exc, "start (cache)")
        try:
            fetched = await self.source.fetch(self.in_force)
        except Rejection as exc:
            self._rejected(exc, "start")
            return
        if fetched is not None:
            self.in_force = self._uncommitted = fetched
        self._failure = None

    def layer(self) -> ManagedLayer:
        """The managed layer the enforcer compiles: verified text, or everything refused."""
        if self.in_force is not None:
            return self.in_force.parsed
        reason = self._failure["reason"] if self._failure else "not fetched yet"
        return ManagedUnavailable(self.source.shown, (
            f"this proxy has no verified managed policy from its URL yet (last attempt: "
            f"{reason}), so it refuses every request until it gets one"))

    def configure(self, updated: set[str]) -> None:
        self._flush()  # the first configure after start(): the audit log comes first
        if "managed_refresh" in updated and self._task is not None:
            self._restart()

    def _flush(self) -> None:
        if self._held is not None:
            held, self._held = self._held, None
            for fields in held:
                self.audit.emit("policy.rejected", **fields)

    def running(self) -> None:
        self._flush()
        if self._uncommitted is not None:
            self._commit(self._uncommitted)
            self._uncommitted = None
        if self.in_force is None:
            logger.warning(f"no verified managed policy from {self.source.shown}: every request "
                         "is refused until one is fetched")
        self._restart()

    def done(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def _restart(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if ctx.options.managed_refresh > 0:
            self._task = asyncio.create_task(self._refresh_loop())

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(ctx.options.managed_refresh)
            await self.refresh()

    async def refresh(self, trigger: str = "refresh") -> None:
        """Ask the URL for a newer version; apply it if it is good."""
        try:
            fetched = await self.source.fetch(self.in_force)
        except Rejection as exc:
            self._rejected(exc, trigger)
            return
        except Exception as exc:  # a fault here must not stop refreshing; nothing changes
            logger.exception("managed policy refresh failed")
            self._rejected(Rejection(FETCH_FAILED, f"internal error ({type(exc).__name__})"),
                           trigger)
            return
        if fetched is None:
            self._failure = None  # the URL serves the version in force
            return
        previous, self.in_force = self.in_force, fetched
        if not self.reload("managed policy from URL", source="url", url=self.source.shown,
                           reason=INVALID, serial=fetched.serial):
            self.in_force = previous  # the reload's policy.rejected event says why
            self._failure = {"at": _now(), "trigger": trigger, "reason": INVALID,
                             "serial": fetched.serial, "count": 1,
                             "error": "valid alone, but not with the user policy (see the "
                                      "policy.rejected event)"}
            return
        self._failure = None
        self._commit(fetched)

    def _commit(self, signed: SignedPolicy) -> None:
        try:
            self.source.commit(signed)
        except (OSError, UnsafePath) as exc:
            # In force all the same; only a restart without the network is not covered.
            self.audit.emit("policy.cache_failed", url=self.source.shown, serial=signed.serial,
                            error=str(exc))
            logger.warning(f"cannot cache the managed policy: {exc}")

    def _rejected(self, exc: Rejection, trigger: str) -> None:
        """Record a rejected version; the event once per distinct failure (a URL down for a
        day is one event, not one a minute)."""
        repeated = self._failure is not None and (
            (self._failure["reason"], self._failure["error"]) == (exc.reason, str(exc)))
        count = self._failure["count"] + 1 if repeated and self._failure else 1
        self._failure = {"at": _now(), "trigger": trigger, "reason": exc.reason,
                         "error": str(exc), "serial": exc.serial, "count": count}
        logger.warning(f"managed policy rejected ({exc.reason}), "
                     f"{'the version in force stays' if self.in_force else 'none in force'}: "
                     f"{exc}")
        if repeated:
            return
        fields = {"source": "url", "url": self.source.shown, "trigger": trigger,
                  "reason": exc.reason, "error": str(exc), "serial": exc.serial,
                  "in_force": self.in_force.serial if self.in_force else None}
        if self._held is not None:
            self._held.append(fields)
        else:
            self.audit.emit("policy.rejected", **fields)

    def status(self) -> dict[str, Any]:
        """What `policy show` and `health` report about the managed policy from the URL."""
        signed = self.in_force
        return {"url": self.source.shown, "available": signed is not None,
                "serial": signed.serial if signed else None,
                "key": signed.key if signed else None, "floor": self.source.floor,
                "fetched_at": self.source.fetched_at, "last_failure": self._failure}
