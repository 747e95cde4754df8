"""A fleet of proxies sharing one approval queue (`serve --state redis://HOST:PORT/DB`).

Each proxy still holds its own clients' requests (addons/approvals.py); this addon mirrors its
pending approvals into Redis, where every proxy's hold for the same destination coalesces into
one (addons/fleet_state.py), and applies the decisions published there, whoever made them and
through whichever proxy or command. `always` decisions live in Redis too and join this
proxy's user layer, bounded by the managed policy like the user file's own rules.

Redis is never on the path of a decision the policy (or a cached grant) makes. When it is
unreachable, new holds are refused at once (`approval_unavailable`), held requests wait out
their timeout, and the proxy reconnects by itself.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from agent_egress.policy import Action, InvalidHost, InvalidPattern
from agent_egress.policy.writer import rule_pattern
from mitmproxy import ctx, exceptions
from redis.exceptions import RedisError

from . import fleet_state as state
from .approvals import Approvals
from .auditlog import AuditLog
from .pending import ApprovalError, check_decision

logger = logging.getLogger(__name__)
_PING_EVERY = 5.0  # seconds: a silent network failure is noticed within about this
_BACKOFF = (0.2, 0.5, 1.0, 2.0, 5.0)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class FleetState:
    def __init__(self, audit: AuditLog, approvals: Approvals,
                 reload_policy: Callable[[], object]) -> None:
        self.audit = audit
        self.approvals = approvals
        self.reload_policy = reload_policy  # recompiles with rules() (a changed `always`)
        self.redis: Any = None
        self.connected = False
        self._since = _now()
        self._error: str | None = None
        self._user = "default"
        self._rules: list[dict[str, Any]] = []
        self._owned: dict[str, tuple[str, int, str]] = {}  # ids this proxy opened in Redis
        self._task: asyncio.Task[None] | None = None
        self._jobs: set[asyncio.Task[Any]] = set()
        self.name = socket.gethostname()

    def load(self, loader: Any) -> None:
        loader.add_option("state_url", str, "",
                          "Shared approval state of a fleet of proxies: redis://[USER:PASS@]"
                          "HOST:PORT/DB (rediss:// for TLS); empty for this proxy alone.")
        loader.add_option("state_session_ttl", float, state.DEFAULT_SESSION_TTL,
                          "Seconds a fleet 'session' decision lasts in the shared state.")

    def configure(self, updated: set[str]) -> None:
        if "state_url" not in updated or not ctx.options.state_url:
            return
        parts = urlsplit(ctx.options.state_url)
        if parts.scheme not in ("redis", "rediss", "unix") or not (parts.hostname or parts.path):
            raise exceptions.OptionsError(
                "--state must be a Redis URL: redis://[USER:PASSWORD@]HOST:PORT/DB, "
                "rediss://... for TLS, or unix:///path/to/redis.sock")

    # -- connection ------------------------------------------------------------------------

    def running(self) -> None:
        if not ctx.options.state_url:
            return
        url = ctx.options.state_url
        self.redis = aioredis.from_url(url, socket_connect_timeout=2, socket_timeout=5,
                                       **state.password_from_environment(url))
        self.approvals.subscribe(self._local)
        self._task = asyncio.create_task(self._follow())

    async def done(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for job in list(self._jobs):
            job.cancel()
        if self.redis is not None:
            await self.redis.aclose()

    async def _follow(self) -> None:
        """Stay subscribed to the fleet's events, reconnecting with backoff."""
        failures = 0
        while True:
            try:
                async with self.redis.pubsub() as pubsub:
                    await pubsub.subscribe(state.CHANNEL)
                    self._user = await state.acl_user(self.redis)
                    await self._load_rules()
                    await self._catch_up()
                    self._set_connected(True)
                    failures = 0
                    await self._listen(pubsub)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # redis' ConnectionError, TimeoutError, OSError, ...
                self._set_connected(False, f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(_BACKOFF[min(failures, len(_BACKOFF) - 1)])
            failures += 1

    async def _listen(self, pubsub: Any) -> None:
        loop = asyncio.get_running_loop()
        pinged = loop.time()
        while self.connected:  # a failed command elsewhere: connect afresh
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if message is not None and message.get("type") == "message":
                try:
                    await self._received(message["data"])
                except (RedisError, OSError):
                    raise  # the connection: reconnect
                except Exception as exc:  # a message this proxy cannot use: not a crash
                    self.audit.emit("state.message_ignored", error=f"{type(exc).__name__}: "
                                    f"{exc}"[:300])
            if loop.time() - pinged > _PING_EVERY:
                await pubsub.ping()
                pinged = loop.time()

    def _set_connected(self, connected: bool, error: str | None = None) -> None:
        if connected == self.connected and error == self._error:
            return
        changed = connected != self.connected
        self.connected, self._error = connected, error
        if changed:
            self._since = _now()
            self.audit.emit("state.connected" if connected else "state.unavailable",
                            state=state.display_url(ctx.options.state_url), error=error)
            if not connected:
                logger.warning(f"shared state unreachable, new holds are refused: {error}")

    def unavailable(self) -> str | None:
        """Why no request may be held now (None: it may)."""
        if self.redis is None or self.connected:
            return None
        return (f"the shared approval state {state.display_url(ctx.options.state_url)} is "
                "unreachable, so no person can be asked; retry later")

    def status(self) -> dict[str, Any]:
        if self.redis is None:
            return {}
        return {"state": {"url": state.display_url(ctx.options.state_url),
                          "connected": self.connected, "since": self._since,
                          "error": self._error, "redis_user": self._user},
                "shared_rules": [{"action": rule.get("decision"), "host": rule.get("host"),
                                  "port": rule.get("port"), "actor": rule.get("actor")}
                                 for rule in self._rules]}

    # -- `always` decisions ----------------------------------------------------------------

    def rules(self, ports: frozenset[int]) -> list[tuple[str, str]]:
        """The fleet's `always` decisions as (action, pattern), for the user layer; none
        where the managed policy does not allow `always` decisions."""
        if "always" not in self.approvals.allowed_scopes:
            return []
        patterns = []
        for rule in self._rules:
            port = rule.get("port")
            pattern = rule_pattern(str(rule.get("host")),
                                   None if port is None or port in ports else int(port))
            patterns.append((str(rule.get("decision")), pattern))
        return patterns

    async def _load_rules(self) -> None:
        if await self._fetch_rules():
            self.reload_policy()

    async def _fetch_rules(self) -> bool:
        """Read the fleet's `always` decisions (whether they changed); invalid ones are
        ignored, with an event."""
        valid = []
        for rule in await state.always_rules(self.redis):
            try:
                valid.append(state.checked_rule(rule))
            except (InvalidHost, InvalidPattern) as exc:
                self.audit.emit("state.rule_ignored", rule=str(rule)[:200], error=str(exc))
        changed, self._rules = valid != self._rules, valid
        return changed

    def written(self, action: Action, host: str, port: int | None) -> str:
        """Approvals' write_rule in a fleet: the decision is already in Redis (whoever made it
        wrote it there before telling the proxies); this names where."""
        return f"{state.display_url(ctx.options.state_url)} ({state.ALWAYS})"

    # -- this proxy's holds ----------------------------------------------------------------

    def _spawn(self, job: Any) -> None:
        task = asyncio.create_task(job)
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)

    def _local(self, message: dict[str, Any]) -> None:
        event, item = message.get("event"), message.get("pending") or {}
        if event == "pending.opened":
            self._spawn(self._share(item["id"]))
        elif event == "pending.closed" and item.get("id") in self._owned:
            host, port, request = self._owned.pop(item["id"])
            self._spawn(self._closed(item["id"], host, port, request,
                                     str(message.get("outcome"))))

    async def _share(self, approval_id: str) -> None:
        """A new local hold: join the fleet's pending approval for it, or open it."""
        pending = self.approvals.get(approval_id)
        if pending is None:
            return
        try:
            shared, left = await state.claim(self.redis, pending.host, pending.port,
                                             pending.request, approval_id, pending.left())
            if shared == approval_id and self.approvals.get(approval_id) is not pending:
                # Closed here while the claim was on its way (its client left, a decision):
                # nothing may join a hold nobody waits on.
                await state.release(self.redis, approval_id, pending.host, pending.port,
                                    pending.request, "closed")
                return
            if shared == approval_id:
                self._owned[approval_id] = pending.key
                summary = pending.summary(asyncio.get_running_loop().time())
                await state.announce(self.redis, {**summary, "proxy": self.name},
                                     pending.request, left)
            else:
                self.approvals.adopt(approval_id, shared, left)
            verdict = (await state.decided(self.redis, shared)
                       or await state.session_grant(self.redis, pending.host, pending.port,
                                                    pending.request))
        except Exception as exc:
            if isinstance(exc, (RedisError, OSError)):  # _listen reconnects
                self._set_connected(False, f"{type(exc).__name__}: {exc}")
            self.approvals.refuse(approval_id, self.unavailable() or
                                  f"the shared state failed ({type(exc).__name__})")
            return
        if verdict is not None:
            self._apply({**verdict, "ids": [shared]})

    async def _closed(self, approval_id: str, host: str, port: int, request: str,
                      outcome: str) -> None:
        try:
            await state.release(self.redis, approval_id, host, port, request, outcome)
        except Exception as exc:  # it expires in Redis by itself
            self._set_connected(False, f"{type(exc).__name__}: {exc}")

    async def _catch_up(self) -> None:
        """After (re)connecting: decisions made while away, and this proxy's holds shared
        again (a restarted Redis has forgotten them)."""
        for pending in list(self.approvals.pending.values()):
            verdict = await state.decided(self.redis, pending.id)
            if verdict is not None:
                self._apply({**verdict, "ids": [pending.id]})
                continue
            shared, left = await state.claim(self.redis, pending.host, pending.port,
                                             pending.request, pending.id, pending.left())
            if shared == pending.id:
                self._owned[pending.id] = pending.key
                summary = pending.summary(asyncio.get_running_loop().time())
                await state.announce(self.redis, {**summary, "proxy": self.name},
                                     pending.request, left, again=True)
            else:  # another proxy was first
                self._owned.pop(pending.id, None)
                self.approvals.adopt(pending.id, shared, left)

    # -- decisions -------------------------------------------------------------------------

    async def _received(self, data: bytes | str) -> None:
        message = state.loads(data)
        if message is None or message.get("event") != "decided":
            return
        if message.get("scope") == "always":
            # Read first, applied by the decision itself: Approvals.decide releases the waiting
            # requests in the approver's name, then reloads the policy (with these rules).
            await self._fetch_rules()
        self._apply(message)

    def _apply(self, message: dict[str, Any]) -> None:
        """A fleet decision, applied to this proxy's waiting requests (or, ahead of them, to
        its session grants)."""
        decision, scope = str(message.get("decision")), str(message.get("scope"))
        actor = str(message.get("actor"))
        expires_at = message.get("expires_at")  # a session grant lapses with its Redis key
        expires = (max(1e-9, time.monotonic() + float(expires_at) - time.time())
                   if isinstance(expires_at, (int, float)) else 0.0)  # (0 would be: never)
        ids = [i for i in message.get("ids") or () if self.approvals.get(i)]
        port = message.get("port")
        host = str(message.get("host"))
        target = host if port is None else f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            for approval_id in ids:
                self.approvals.decide(approval_id, decision, scope, actor, expires=expires)
            if not message.get("ids") and scope in ("session", "always"):
                self.approvals.decide(target, decision, scope, actor, expires=expires)
        except ApprovalError as exc:
            self.audit.emit("approval.refused", target=target, decision=decision, scope=scope,
                            actor=actor, error=str(exc))

    async def decide(self, target: str, decision: str, scope: str,
                     actor: str) -> dict[str, Any]:
        """A decision given on this proxy's approval socket: made for the whole fleet."""
        if not self.connected or self.redis is None:
            raise ApprovalError("unavailable", self.unavailable() or "not connected")
        check_decision(decision, scope, self.approvals.allowed_scopes)  # this proxy's bounds
        try:
            return await state.decide(self.redis, target, decision, scope,
                                      state.actor_of(self._user, f"{actor}@{self.name}"),
                                      session_ttl=ctx.options.state_session_ttl)
        except ApprovalError:
            raise
        except Exception as exc:
            raise ApprovalError("unavailable", f"the shared state failed: {exc}") from None
