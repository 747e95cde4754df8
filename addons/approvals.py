"""Holding requests to unknown destinations until a person decides.

Requests for the same host and port share one pending approval (in a fleet, with the other
proxies': addons/fleet.py); one decision releases them all. It lives at most
``approval_timeout`` seconds from when it was opened. When its last waiting client gives up,
it stays listed (marked as such) until then, so a person can still decide for the client's
retry; nothing outlives the deadline.

How many may be pending is bounded, in all and per agent: past that, a new destination is
refused at once rather than queued, so one agent cannot bury the person deciding (nor every
watching approver) under thousands of requests.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from typing import Any

from agent_egress.policy import (
    SCOPES,
    Action,
    CompiledPolicy,
    Decision,
    PolicyError,
)
from mitmproxy import http

from . import connections
from .auditlog import AuditLog
from .pending import (
    CLIENT_CHECK_INTERVAL,
    ApprovalError,
    Pending,
    Verdict,
    Waiter,
    check_decision,
    drop_gone,
    find_pending,
    open_pending,
    owners_of,
    queue_full,
    still_asked,
)


class Approvals:
    """Pending approvals, session decisions, and the subscribers watching them."""

    def __init__(self, audit: AuditLog,
                 write_rule: Callable[[Action, str, int | None], str] | None = None,
                 reload_policy: Callable[[], object] | None = None,
                 unavailable: Callable[[], str | None] = lambda: None) -> None:
        """``write_rule`` writes an `always` decision to the user policy file (its path);
        ``reload_policy`` then loads it. Without them, `always` is refused. ``unavailable``:
        why nobody can be asked now (a fleet's shared state unreachable), else None."""
        self.audit = audit
        self.write_rule = write_rule
        self.reload_policy = reload_policy
        self.unavailable = unavailable
        self.pending: dict[tuple[str, int, str], Pending] = {}  # (host, port, request) -> ...
        self._by_id: dict[str, Pending] = {}
        self._session: dict[str, dict[int | None, Verdict]] = {}  # host -> port|None -> verdict
        self._session_requests: dict[tuple[str, int, str], Verdict] = {}  # request-level asks
        self._per_owner: Counter[str] = Counter()
        self._subscribers: set[Callable[[dict[str, Any]], None]] = set()
        self._watcher: asyncio.Task[None] | None = None
        self.allowed_scopes: frozenset[str] = frozenset(SCOPES)  # learnt from each policy

    # -- queries ---------------------------------------------------------------------------

    def session_verdict(self, host: str, port: int, request: str = "",
                        connect: bool = True) -> Verdict | None:
        """A session decision for this destination (or, with ``request``, for this
        "METHOD path" on it: an ask request rule). ``connect``: asked for a tunnel; a request
        seen with its method does not get a grant made for tunnels only."""
        if request:
            verdict = self._session_requests.get((host, port, request))
        else:
            ports = self._session.get(host)
            verdict = (ports.get(port) or ports.get(None)) if ports else None
        return None if verdict is None or verdict.lapsed(connect) else verdict

    def get(self, approval_id: str) -> Pending | None:
        return self._by_id.get(approval_id)

    def snapshot(self) -> list[dict[str, Any]]:
        now = asyncio.get_running_loop().time()
        return [p.summary(now) for p in sorted(self.pending.values(), key=lambda p: p.opened)]

    def subscribe(self, callback: Callable[[dict[str, Any]], None]) -> None:
        self._subscribers.add(callback)

    def unsubscribe(self, callback: Callable[[dict[str, Any]], None]) -> None:
        self._subscribers.discard(callback)

    def _notify(self, event: str, pending: Pending, **extra: Any) -> None:
        self.broadcast({"event": event,
                        "pending": pending.summary(asyncio.get_running_loop().time()), **extra})

    def broadcast(self, message: dict[str, Any]) -> None:
        """To every subscriber (approvers watching, auto-review)."""
        for callback in list(self._subscribers):
            callback(message)

    def grant(self, host: str, port: int, verdict: Verdict) -> None:
        """A session decision made without a pending approval (auto-review's)."""
        self._session.setdefault(host, {})[port] = verdict

    def annotate(self, approval_id: str, review: dict[str, Any]) -> None:
        """Show a reviewer's assessment beside a pending approval (ApprovalError if gone)."""
        if (pending := self._by_id.get(approval_id)) is None:
            raise ApprovalError("unknown_id", f"no pending request with id {approval_id}")
        pending.review = review
        self._notify("pending.updated", pending)

    def adopt(self, approval_id: str, shared_id: str, left: float) -> None:
        """Join a fleet's pending approval for the same destination: its id, and its deadline
        when sooner than ours."""
        if (pending := self._by_id.pop(approval_id, None)) is None:
            return
        self.audit.emit("approval.joined", approval_id=shared_id, local_id=approval_id,
                        host=pending.host, port=pending.port)
        pending.id, self._by_id[shared_id] = shared_id, pending
        if left < pending.left() and pending.timer is not None:
            pending.timer.cancel()
            pending.deadline = asyncio.get_running_loop().time() + left
            pending.timer = asyncio.get_running_loop().call_at(pending.deadline, self._expire,
                                                               pending)
        self._notify("pending.updated", pending)

    def refuse(self, approval_id: str, why: str) -> None:
        """Close a pending approval nobody can be asked about (the shared state failed)."""
        if (pending := self._by_id.get(approval_id)) is not None:
            self._deny(pending, "unavailable", "state", why)

    def _deny(self, pending: Pending, scope: str, actor: str, why: str = "") -> None:
        """Release the waiters refused: a timeout, or nobody can be asked."""
        self.audit.emit("approval.decided", approval_id=pending.id, host=pending.host,
                        port=pending.port, decision="deny", scope=scope, actor=actor,
                        released=len(pending.waiters), wait_ms=pending.waited_ms())
        self._close(pending, Verdict(Action.DENY, scope, actor, pending.id, why), scope)

    # -- holding ---------------------------------------------------------------------------

    def admit(self, flow: http.HTTPFlow, decision: Decision, agent: str | None,
              max_pending: int, max_per_agent: int, request: str = "") -> Verdict | None:
        """A refusal if holding this request would open one pending approval too many.

        Call right before hold(), with no await between. A request for a destination already
        pending joins it: that is never refused, it adds no work for the person deciding.
        """
        if (decision.host, decision.port, request) in self.pending:
            return None
        if why := self.unavailable():
            return Verdict(Action.DENY, "unavailable", "state", detail=why)
        return queue_full(len(self.pending), self._per_owner, owners_of(flow, agent),
                          max_pending, max_per_agent)

    async def hold(self, flow: http.HTTPFlow, decision: Decision, timeout: float,
                   agent: str | None = None, asked: str = "",
                   review: dict[str, Any] | None = None,
                   opened: Callable[[str], None] | None = None) -> Verdict | None:
        """Wait for a person's verdict on this request; None if the client left first.

        ``asked`` ("METHOD /path") holds it for an ask request rule: one pending approval
        per method and path, not per destination."""
        loop = asyncio.get_running_loop()
        key = (decision.host, decision.port, asked)
        pending = self.pending.get(key)
        request = flow.request
        if pending is None:
            pending = open_pending(flow, decision, agent, asked, review,
                                   deadline=loop.time() + timeout)
            self._per_owner.update(pending.owners)
            pending.timer = loop.call_at(pending.deadline, self._expire, pending)
            self.pending[key] = pending
            self._by_id[pending.id] = pending
            self.audit.emit("approval.requested", approval_id=pending.id, host=pending.host,
                            port=pending.port, scheme=pending.scheme, method=pending.method,
                            path=pending.path, client=pending.client, agent=agent,
                            request_rule=pending.rule)
            event = "pending.opened"
        else:
            event = "pending.updated"
        waiter = Waiter(flow.client_conn, loop.create_future(), request.method)
        pending.waiters.append(waiter)
        pending.requests += 1
        self._notify(event, pending)
        if opened is not None and event == "pending.opened":
            opened(pending.id)  # auto-review's model, asked about exactly this one
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.create_task(self._watch_clients())
        # While a person decides, nothing more is read from the client: what it sends waits
        # in the kernel's bounded buffers, not in the proxy's memory.
        paused = connections.pause_reading(flow.client_conn)
        try:
            return await waiter.future
        finally:
            if paused:
                connections.resume_reading(flow.client_conn)

    async def _watch_clients(self) -> None:
        """Drop waiters whose client hung up, so nothing waits for a connection that is gone."""
        while self.pending:
            await asyncio.sleep(CLIENT_CHECK_INTERVAL)
            for pending in list(self.pending.values()):
                if drop_gone(pending):
                    self._notify("pending.updated", pending)

    def _expire(self, pending: Pending) -> None:
        if self.pending.get(pending.key) is not pending:
            return
        if pending.waiters:
            self._deny(pending, "timeout", "timeout")
        else:
            self.audit.emit("approval.abandoned", approval_id=pending.id, host=pending.host,
                            port=pending.port)
            self._close(pending, None, "abandoned")

    def _close(self, pending: Pending, verdict: Verdict | None, outcome: str,
               release: str | None = None) -> int:
        """``release``: only waiters that asked this ("CONNECT", or a method) get the verdict;
        the others are sent back to be decided afresh (a write that joined a read)."""
        if self._by_id.get(pending.id) is not pending:
            return 0  # already closed
        released = len(pending.waiters)
        afresh = Verdict(Action.DENY, "reload", "policy", pending.id)
        for waiter in pending.waiters:
            if not waiter.future.done():
                waiter.future.set_result(
                    verdict if release is None or waiter.method == release else afresh)
        pending.waiters.clear()
        if pending.timer is not None:
            pending.timer.cancel()
        del self.pending[pending.key]
        del self._by_id[pending.id]
        self._per_owner.subtract(pending.owners)
        for owner in pending.owners:
            if self._per_owner[owner] <= 0:
                del self._per_owner[owner]
        self._notify("pending.closed", pending, outcome=outcome)
        return released

    # -- deciding --------------------------------------------------------------------------

    def decide(self, target: str, decision: str, scope: str, actor: str, detail: str = "",
               release: str | None = None, connect_only: bool = False,
               expires: float = 0.0) -> dict[str, Any]:
        """Apply a person's (or auto-review's) decision; what it did, for the approver.
        ``expires``: a fleet's session grant's end (Verdict). Auto-review's: ``detail``, its
        rationale; ``release``, what it reviewed (_close); ``connect_only``, tunnels only."""
        check_decision(decision, scope, self.allowed_scopes)
        action = Action(decision)
        matches, host, port = find_pending(target, self._by_id, self.pending.values())
        if not matches and scope == "once":
            raise ApprovalError("not_found", f"nothing is waiting for {target}; "
                                "use --scope session or always to decide ahead of a request")
        # In a straight order: write the rule (nothing is decided if that fails), release the
        # requests held for it, then load the policy with the rule (whose reload releases
        # other held requests it now covers).
        written = None
        if scope == "always" and any(p.request for p in matches):
            raise ApprovalError("unsupported", "a request held by an ask request rule is "
                                "decided once or for the session; to decide it always, add a "
                                "[[network.requests]] rule to the policy (docs/policy.md)")
        if scope == "always":
            if self.write_rule is None or self.reload_policy is None:
                raise ApprovalError("unsupported", "this proxy cannot write its policy file")
            try:
                written = self.write_rule(action, host, port)
            except PolicyError as exc:
                raise ApprovalError("write_failed", f"{exc}; nothing was decided") from None
        released, ids = 0, []
        for pending in matches or [None]:
            verdict = Verdict(action, scope, actor, pending.id if pending else None, detail,
                              connect_only, expires)
            if pending is not None and pending.request:
                if scope == "session":
                    self._session_requests[pending.key] = verdict
            elif scope in ("session", "always"):
                self._session.setdefault(host, {})[pending.port if pending else port] = verdict
            self.audit.emit("approval.decided", approval_id=verdict.approval_id, host=host,
                            port=pending.port if pending else port, decision=decision,
                            scope=scope, actor=actor,
                            released=len(pending.waiters) if pending else 0,
                            agent=pending.agent if pending else None,
                            wait_ms=pending.waited_ms() if pending else None)
            if pending is not None:
                ids.append(pending.id)
                released += self._close(pending, verdict, decision, release)
        result = {"host": host, "port": port, "decision": decision, "scope": scope,
                  "ids": ids, "released": released}
        if written is None:
            return result
        try:
            self.reload_policy()  # type: ignore[misc]  (checked with write_rule above)
        except PolicyError as exc:  # written and decided; the reload's failure is reported
            result["reload_failed"] = str(exc)
        return {**result, "written": written}

    def policy_changed(self, policy: CompiledPolicy) -> None:
        """After a (re)load: the scopes approvers may use, and requests the new policy decides
        by rule are released to be re-decided by it."""
        self.allowed_scopes = policy.settings.approval_scopes
        self._session_requests.clear()  # decided under rules that may have changed
        for pending in list(self.pending.values()):
            if not still_asked(policy, pending):
                self.audit.emit("approval.decided", approval_id=pending.id, host=pending.host,
                                port=pending.port, scope="reload", actor="policy",
                                released=len(pending.waiters))
                self._close(pending, Verdict(Action.DENY, "reload", "policy", pending.id),
                            "reload")

    def done(self) -> None:
        for pending in list(self.pending.values()):
            self._close(pending, None, "shutdown")
