"""What a held request waits in: the pending approval of a destination, its waiters, and the
verdict that releases them."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from agent_egress.policy import Action, Decision, Reason
from mitmproxy import connection, http
from mitmproxy.connection import ConnectionState

from . import connections


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


@dataclass(eq=False)
class Waiter:
    client: connection.Client
    future: asyncio.Future[Verdict | None]


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

    @property
    def key(self) -> tuple[str, int, str]:
        return self.host, self.port, self.request

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
        }


def verdict_decision(held: Decision, verdict: Verdict, timeout: float) -> Decision:
    if verdict.scope == "queue_full":
        return held._replace(action=Action.DENY, reason=Reason.APPROVAL_QUEUE_FULL,
                             detail=verdict.detail)
    if verdict.scope == "timeout":
        return held._replace(
            action=Action.DENY, reason=Reason.APPROVAL_TIMEOUT,
            detail=f"no decision within {timeout:g} s; the person supervising the agent can run "
                   f"'agent-egress approve {held.host}:{held.port}', then retry")
    if verdict.action is Action.ALLOW:
        return held._replace(action=Action.ALLOW, reason=Reason.APPROVED,
                             detail=f"approved by {verdict.actor} ({verdict.scope})")
    return held._replace(action=Action.DENY, reason=Reason.DENIED_BY_APPROVER,
                         detail=f"denied by {verdict.actor} ({verdict.scope})")


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
