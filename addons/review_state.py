"""What auto-review remembers between requests, each bounded so an agent cannot grow it:
auto-denials per agent (the circuit breaker), recent names under one domain (the DNS-tunnel
shape), and each agent's latest decisions (context for the model)."""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

WINDOW = 600.0  # seconds: denials and subdomains count within the last 10 minutes
MAX_KEYS = 4096  # agents (or clients) remembered; the least recently seen are forgotten
MAX_NAMES = 64  # distinct names remembered per agent and domain (the burst signal needs 5)
RECENT = 20


class _Bounded(OrderedDict[Any, Any]):
    """Least-recently-used keys fall out past ``limit``."""

    def __init__(self, limit: int = MAX_KEYS) -> None:
        super().__init__()
        self.limit = limit

    def touch(self, key: Any, default: Callable[[], Any]) -> Any:
        if key in self:
            self.move_to_end(key)
        else:
            self[key] = default()
            if len(self) > self.limit:
                self.popitem(last=False)
        return self[key]


@dataclass
class Pause:
    owner: str  # "agent NAME" or "client ADDRESS"
    since: float
    denials: int
    agents: set[str] = field(default_factory=set)  # agent names whose denials tripped it


class Breaker:
    """After `limit` auto-denials within WINDOW for one owner, auto-review pauses for it
    until a person resumes it. Owners are both the client and the agent name (pending.owners_of),
    so renaming the agent on every request does not reset the count."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._denials = _Bounded()  # owner -> deque of times
        self.paused: dict[str, Pause] = {}  # bounded: MAX_KEYS at most, via _denials

    def paused_for(self, owners: Iterable[str]) -> Pause | None:
        return next((self.paused[o] for o in owners if o in self.paused), None)

    def denied(self, owners: Iterable[str], agent: str | None, limit: int) -> list[Pause]:
        """Count one auto-denial; the pauses it starts."""
        now, started = self.clock(), []
        for owner in owners:
            times: deque[float] = self._denials.touch(owner, deque)
            times.append(now)
            while times and times[0] < now - WINDOW:
                times.popleft()
            while len(times) > limit:
                times.popleft()
            if len(times) >= limit and owner not in self.paused:
                if len(self.paused) >= MAX_KEYS:
                    continue  # already paused for thousands: everything goes to a person
                pause = Pause(owner, time.time(), len(times), {agent} if agent else set())
                self.paused[owner] = pause
                started.append(pause)
            elif owner in self.paused and agent:
                self.paused[owner].agents.add(agent)
        return started

    def resume(self, agent: str) -> list[Pause]:
        """Resume for an agent name ("*": for everyone): its own pause, and those of the
        clients its denials paused."""
        resumed = [p for p in self.paused.values()
                   if agent == "*" or p.owner == f"agent {agent}" or agent in p.agents]
        for pause in resumed:
            del self.paused[pause.owner]
            self._denials.pop(pause.owner, None)
        return resumed


class Siblings:
    """Distinct names held under one registrable domain for one owner, within WINDOW."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        # hash("owner domain") -> OrderedDict hash(name) -> time: numbers, not the names an
        # agent chose (up to 253 characters each), so the worst case stays small.
        self._names = _Bounded()

    def seen(self, owners: Iterable[str], domain: str, host: str) -> int:
        now, most, name = self.clock(), 0, hash(host)
        for owner in owners:
            names: OrderedDict[int, float] = self._names.touch(hash(f"{owner} {domain}"),
                                                               OrderedDict)
            names[name] = now
            names.move_to_end(name)
            while names and (next(iter(names.values())) < now - WINDOW
                             or len(names) > MAX_NAMES):
                names.popitem(last=False)
            most = max(most, len(names))
        return most


class Recent:
    """Each agent's latest request decisions, for the model's context."""

    FIELDS = ("host", "port", "method", "decision", "reason")

    def __init__(self) -> None:
        self._by_agent = _Bounded(limit=1024)

    def add(self, agent: str, fields: dict[str, Any]) -> None:
        entry = tuple(fields.get(key) for key in self.FIELDS)
        self._by_agent.touch(agent, lambda: deque(maxlen=RECENT)).append(entry)

    def of(self, agent: str) -> list[dict[str, Any]]:
        return [dict(zip(self.FIELDS, entry, strict=True))
                for entry in self._by_agent.get(agent, ())]
