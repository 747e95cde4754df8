"""What a held request waits in: the pending approval of a destination, its waiters, and the
verdict that releases them."""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from agent_egress.policy import (
    SCOPES,
    Action,
    CompiledPolicy,
    Decision,
    InvalidHost,
    Reason,
    normalize_host,
    split_host_port,
)
from mitmproxy import connection, http
from mitmproxy.connection import ConnectionState

from . import connections
from .events import client_text, logged_path, request_scheme

_PENDING_ID = re.compile(r"[0-9a-f]{8}")
CLIENT_CHECK_INTERVAL = 0.25  # seconds between checks for waiting clients that hung up


class ApprovalError(Exception):
    """A decision that cannot be applied; the message is for the approver."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class Verdict:
    action: Action  # ALLOW or DENY
    scope: str  # once | session | always | timeout | queue_full
    actor: str  # "uid:1000", "timeout", or "limit"
    approval_id: str | None = None
    detail: str = ""  # why, when no person decided
    connect_only: bool = False  # a grant for tunnels (auto-review saw no method), not requests
    expires: float = 0.0  # a session grant's end (monotonic clock; 0: while the proxy runs)

    def lapsed(self, connect: bool = True) -> bool:
        """Whether this grant no longer applies: expired, or made for tunnels only."""
        return (self.connect_only and not connect) or 0 < self.expires < time.monotonic()


@dataclass(eq=False)
class Waiter:
    client: connection.Client
    future: asyncio.Future[Verdict | None]
    method: str = "CONNECT"  # what it asked: a model's verdict releases only its like


@dataclass(eq=False)
class Pending:
    id: str
    host: str
    port: int
    scheme: str
    method: str | None
    path: str | None
    client: str
    agent: str | None
    owners: tuple[str, ...]  # whom it counts against: the client, and the agent name
    opened: float  # wall clock, for people
    deadline: float  # event-loop clock
    waiters: list[Waiter] = field(default_factory=list)
    requests: int = 0
    timer: asyncio.TimerHandle | None = None
    request: str = ""  # "METHOD /path" when held by an ask request rule
    rule: str | None = None  # that request rule
    review: dict[str, Any] | None = None  # auto-review's assessment (autoreview.note)

    @property
    def key(self) -> tuple[str, int, str]:
        return self.host, self.port, self.request

    def left(self) -> float:
        """Seconds until it expires."""
        return max(0.0, self.deadline - asyncio.get_running_loop().time())

    def waited_ms(self) -> float:
        return round((time.time() - self.opened) * 1000, 1)

    def summary(self, now: float) -> dict[str, Any]:
        return {
            "id": self.id, "host": self.host, "port": self.port, "scheme": self.scheme,
            "method": self.method, "path": self.path, "client": self.client,
            "agent": self.agent,
            "first_seen": datetime.fromtimestamp(self.opened, UTC).isoformat(),
            "waiting": len(self.waiters), "requests": self.requests,
            "clients_gone": not self.waiters,
            "expires_in": max(0.0, round(self.deadline - now, 1)),
            "request_rule": self.rule,
            "review": self.review,
        }


def queue_full(pending: int, per_owner: Mapping[str, int], owners: Iterable[str],
               max_pending: int, max_per_agent: int) -> Verdict | None:
    """The refusal of one pending approval too many, in all or for one of its owners."""
    full = [owner for owner in owners if per_owner.get(owner, 0) >= max_per_agent]
    if pending >= max_pending:
        why = (f"{pending} destinations already await a person's decision "
               f"(approvals.max_pending = {max_pending})")
    elif full:
        why = (f"{full[0]} already has {per_owner[full[0]]} destinations awaiting a "
               f"person's decision (approvals.max_pending_per_agent = {max_per_agent})")
    else:
        return None
    return Verdict(Action.DENY, "queue_full", "limit", detail=(
        f"not asked about: {why}; retry once those are decided (agent-egress pending)"))


def check_decision(decision: str, scope: str, allowed_scopes: frozenset[str]) -> None:
    """ApprovalError unless a decision is allow or deny, in a scope the policy permits."""
    if decision not in ("allow", "deny"):
        raise ApprovalError("bad_request", "decision must be 'allow' or 'deny'")
    if scope not in SCOPES:
        raise ApprovalError("bad_request", f"scope must be one of {', '.join(SCOPES)}")
    if scope not in allowed_scopes:
        allowed = ", ".join(s for s in SCOPES if s in allowed_scopes)
        raise ApprovalError("forbidden_scope",
                            f"the managed policy does not allow {scope!r} decisions "
                            f"(allowed_approval_scopes: {allowed})")


def find_pending(target: str, by_id: Mapping[str, Pending],
                 pending: Iterable[Pending]) -> tuple[list[Pending], str, int | None]:
    """The pending approvals an approver's target names: an id, or HOST[:PORT]."""
    if target in by_id:
        found = by_id[target]
        return [found], found.host, found.port
    if _PENDING_ID.fullmatch(target):  # an id (8 hex digits), not a one-label host name
        raise ApprovalError("unknown_id", f"no pending request with id {target} (it may "
                            "have been decided or expired); 'agent-egress pending' lists "
                            "the waiting ones")
    try:
        host_text, port = split_host_port(target)
        host = normalize_host(host_text).name
    except InvalidHost as exc:
        raise ApprovalError("bad_target",
                            f"{target!r} is neither a pending id nor a HOST[:PORT]: {exc}"
                            ) from None
    matches = [p for p in pending if p.host == host and (port is None or p.port == port)]
    return matches, host, port


def verdict_decision(held: Decision, verdict: Verdict, timeout: float) -> Decision:
    if verdict.scope == "queue_full":
        return held._replace(action=Action.DENY, reason=Reason.APPROVAL_QUEUE_FULL,
                             detail=verdict.detail)
    if verdict.scope == "unavailable":
        return held._replace(action=Action.DENY, reason=Reason.APPROVAL_UNAVAILABLE,
                             detail=verdict.detail)
    if verdict.scope == "timeout":
        return held._replace(
            action=Action.DENY, reason=Reason.APPROVAL_TIMEOUT,
            detail=f"no decision within {timeout:g} s; the person supervising the agent can run "
                   f"'agent-egress approve {held.host}:{held.port}', then retry")
    if verdict.action is Action.ALLOW:
        return held._replace(action=Action.ALLOW, reason=Reason.APPROVED,
                             detail=f"approved by {verdict.actor} ({verdict.scope})")
    why = f": {verdict.detail}" if verdict.detail else ""
    return held._replace(action=Action.DENY, reason=Reason.DENIED_BY_APPROVER,
                         detail=f"denied by {verdict.actor} ({verdict.scope}){why}")


def verdict_fields(verdict: Verdict | None) -> dict[str, Any]:
    if verdict is None:
        return {}
    return {"approval_id": verdict.approval_id, "approval_actor": verdict.actor,
            "approval_scope": verdict.scope}


def client_gone(client: connection.Client) -> bool:
    # Reading is paused while a request is held, so mitmproxy may not have seen the end of
    # the stream yet: the socket is asked directly.
    return not client.state & ConnectionState.CAN_READ or connections.peer_closed(client)


def owners_of(flow: http.HTTPFlow, agent: str | None) -> tuple[str, ...]:
    """Whom a request's pending approval counts against: its client (all of loopback as one;
    not the port: every connection would be a client of its own), and its agent name too.
    Both, so a new name per request does not reset the count."""
    client = f"client {connections.client_key(flow.client_conn)}"
    return (client, f"agent {agent}") if agent else (client,)


def drop_gone(pending: Pending) -> bool:
    """Release the waiters whose client hung up (True if there were any)."""
    gone = [w for w in pending.waiters if client_gone(w.client)]
    for waiter in gone:
        pending.waiters.remove(waiter)
        if not waiter.future.done():
            waiter.future.set_result(None)
    return bool(gone)


def still_asked(policy: CompiledPolicy, pending: Pending) -> bool:
    """Whether a (re)loaded policy still leaves this pending approval to a person."""
    if pending.request:
        method, _, path = pending.request.partition(" ")
        return policy.decide_request(pending.host, pending.port, method, path).action is Action.ASK
    return policy.decide(pending.host, pending.port).action is Action.ASK


def open_pending(flow: http.HTTPFlow, decision: Decision, agent: str | None, asked: str,
                 review: dict[str, Any] | None, deadline: float) -> Pending:
    """A new pending approval for this request (``asked``: "METHOD /path" of an ask rule)."""
    request = flow.request
    is_connect = request.method == "CONNECT"
    return Pending(
        id=secrets.token_hex(4), host=decision.host, port=decision.port,
        scheme=request_scheme(flow), method=None if is_connect else request.method,
        path=None if is_connect else logged_path(request.path),
        client=client_text(flow.client_conn) or "", agent=agent,
        owners=owners_of(flow, agent), opened=time.time(), deadline=deadline, request=asked,
        rule=decision.rule.text if asked and decision.rule else None, review=review)
