"""What a held request waits in: the pending approval of a destination, its waiters, and the
verdict that releases them."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from agent_egress.policy import Action
from mitmproxy import connection


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
        }
