"""`agent-egress triage`: audit logs read into per-agent sessions, each with its timeline and
the findings a security team acts on (proxy/triage_findings.py judges them).

Streams the logs line by line (the same reader as `report`): memory grows with agents,
sessions and distinct destinations, never with events; evidence is kept a few lines per
finding. A session is an agent's events with no gap of 30 minutes or more.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .auditlogs import Progress, open_log, read_lines
from .triage_findings import Detectors, Finding, judge

GAP = 30 * 60.0  # seconds without an event that end a session
MAX_AGENTS = 20_000
MIN_SAMPLE = 20  # tunnels an agent needs before its uploads have a norm
_EVENTS = frozenset({"request.decided", "approval.decided", "approval.reviewed",
                     "tunnel.closed", "credential.used"})


class Destination:
    """One host:port in a session's timeline. There can be hundreds of thousands of them in a
    large log: slots, and the per-reason counts made only when there is something to count."""

    __slots__ = ("host", "port", "first", "last", "allowed", "held", "refused", "approved_by",
                 "denied_by", "tunnels", "bytes_up", "bytes_down")

    def __init__(self, host: str, port: int | None, first: str) -> None:
        self.host, self.port, self.first, self.last = host, port, first, first
        self.allowed = self.held = self.tunnels = self.bytes_up = self.bytes_down = 0
        self.refused: dict[str, int] | None = None  # reason -> n
        self.approved_by: dict[str, int] | None = None  # "person" | "auto-review" -> n
        self.denied_by: dict[str, int] | None = None

    @staticmethod
    def count(counts: dict[str, int] | None, key: str) -> dict[str, int]:
        counts = counts if counts is not None else {}
        counts[key] = counts.get(key, 0) + 1
        return counts

    def as_dict(self) -> dict[str, Any]:
        return {"host": self.host, "port": self.port, "first": self.first, "last": self.last,
                "allowed": self.allowed, "held": self.held, "refused": self.refused or {},
                "approved_by": self.approved_by or {}, "denied_by": self.denied_by or {},
                "tunnels": self.tunnels, "bytes_up": self.bytes_up,
                "bytes_down": self.bytes_down}


@dataclass
class Session:
    agent: str
    start: float
    end: float
    first: str
    last: str
    events: int = 0
    destinations: dict[tuple[str, int | None], Destination] = field(default_factory=dict)
    refusals: Counter[str] = field(default_factory=Counter)
    detectors: Detectors = field(default_factory=Detectors)
    findings: list[Finding] = field(default_factory=list)
    verdict: str = ""
    rationale: str = ""
    narrative: str | None = None

    def destination(self, host: str, port: int | None, when: str) -> Destination:
        key = (host, port)
        found = self.destinations.get(key)
        if found is None:
            found = self.destinations[key] = Destination(host, port, when)
        found.last = when
        return found


def _by(actor: object) -> str:
    text = str(actor or "")
    return "auto-review" if text.startswith("auto-review") else (
        "person" if text.startswith("uid:") else text or "unknown")


@dataclass
class Triage:
    """Sessions per agent, built from events as they are read."""

    since: datetime | None = None
    until: datetime | None = None
    agent: str | None = None
    host: str | None = None
    lines: int = 0
    events: int = 0
    malformed: int = 0
    names_grouped: int = 0  # events of agent names past max_agents, grouped by client
    max_agents: int = MAX_AGENTS
    sessions: dict[str, list[Session]] = field(default_factory=dict)
    uploads: dict[str, Counter[int]] = field(default_factory=dict)  # agent -> log2 histogram

    def add_line(self, source: str, number: int, line: str) -> None:
        self.lines += 1
        if '"event"' not in line:  # every event names itself: this is no event
            self.malformed += bool(line.strip())
            return
        try:
            event = json.loads(line)
            name = event["event"]
            when = str(event["time"])
            moment = datetime.fromisoformat(when)
        except (ValueError, KeyError, TypeError, RecursionError):
            self.malformed += 1  # not JSON, not an object, too deeply nested, no time
            return
        if not isinstance(name, str) or name not in _EVENTS:
            return
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)  # the proxy writes UTC
        if self.since and moment < self.since or self.until and moment >= self.until:
            return
        agent = event.get("agent") or _client(event.get("client"))
        if isinstance(agent, str) and agent not in self.sessions and (
                len(self.sessions) >= self.max_agents):
            # A new name per request must not grow memory without end: past max_agents,
            # further names are grouped by their client.
            self.names_grouped += 1
            agent = _client(event.get("client")) or "client unknown"
        if not isinstance(agent, str) or not agent or (
                self.agent is not None and agent != self.agent):
            return
        self.events += 1
        at = moment.timestamp()
        session = self._session(str(agent), at, when)
        self._add(session, name, event, at, when, f"{Path(source).name}:{number}")

    def _session(self, agent: str, at: float, when: str) -> Session:
        sessions = self.sessions.setdefault(agent, [])
        for session in reversed(sessions):  # the latest first: logs are mostly in order
            if session.start - GAP < at < session.end + GAP:
                if at > session.end:
                    session.end, session.last = at, when
                elif at < session.start:
                    session.start, session.first = at, when
                return session
        session = Session(agent, at, at, when, when)
        sessions.append(session)
        return session

    def _add(self, session: Session, name: str, event: dict[str, Any], at: float, when: str,
             where: str) -> None:
        session.events += 1
        host = event.get("host")
        port = event.get("port") if isinstance(event.get("port"), int) else None
        if not isinstance(host, str):
            return
        spot = session.destination(host, port, when)
        detectors = session.detectors
        if name == "request.decided":
            decision, reason = event.get("decision"), str(event.get("reason"))
            if decision == "allow":
                spot.allowed += 1
                if reason == "approved":
                    spot.approved_by = spot.count(spot.approved_by,
                                                  _by(event.get("approval_actor")))
            elif decision == "held":
                spot.held += 1
            elif decision == "deny":
                spot.refused = spot.count(spot.refused, reason)
                session.refusals[reason] += 1
                if reason == "denied_by_approver":
                    spot.denied_by = spot.count(spot.denied_by,
                                                _by(event.get("approval_actor")))
            detectors.decided(event, decision, reason, at, when, where)
        elif name == "approval.decided":
            detectors.approval(event, when, where)
        elif name == "tunnel.closed":
            spot.tunnels += 1
            up = event.get("bytes_up") if isinstance(event.get("bytes_up"), int) else 0
            spot.bytes_up += up
            down = event.get("bytes_down")
            spot.bytes_down += down if isinstance(down, int) else 0
            self.uploads.setdefault(session.agent, Counter())[up.bit_length()] += 1
            detectors.tunnel(host, port, up, when, where)

    def finish(self) -> list[Session]:
        """Every session judged, in order of agent and start."""
        done = []
        for agent, sessions in sorted(self.sessions.items()):
            norm = _typical_upload(self.uploads.get(agent, Counter()))
            sessions_with = Counter(domain for session in sessions
                                    for domain in session.detectors.uploaded_to())
            for session in sorted(sessions, key=lambda s: s.start):
                if self.host is not None and not any(
                        host == self.host for host, _ in session.destinations):
                    continue
                session.findings = session.detectors.findings(norm, sessions_with)
                session.verdict, session.rationale = judge(session)
                done.append(session)
        return done


def _client(text: object) -> str | None:
    if not isinstance(text, str) or not text:
        return None
    return f"client {text.rpartition(':')[0].strip('[]') or text}"


def _typical_upload(histogram: Counter[int]) -> int:
    """An agent's typical upload per tunnel: the lower quartile, to a power of two (from a
    log2 histogram: a few counters whatever the number of tunnels). The lower quartile, so
    that making many large uploads does not make a larger one look normal; 0 (the floor
    decides) below MIN_SAMPLE tunnels, so a fresh agent name has no norm to hide in."""
    total = sum(histogram.values())
    if total < MIN_SAMPLE:
        return 0
    seen = 0
    for bits in sorted(histogram):
        seen += histogram[bits]
        if seen * 4 >= total:
            return 1 << bits if bits else 0
    return 0


def _first_time(path: Path) -> datetime:
    """When a log starts (its first event's time), to read rotated logs oldest first."""
    raw, lines = open_log(path)
    with raw, lines:
        for line in lines:
            try:
                moment = datetime.fromisoformat(str(json.loads(line)["time"]))
            except (ValueError, KeyError, TypeError, RecursionError):
                continue
            return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return datetime.min.replace(tzinfo=UTC)


def triage(paths: Iterable[Path], *, since: datetime | None = None,
           until: datetime | None = None, agent: str | None = None, host: str | None = None,
           progress: Progress | None = None) -> tuple[Triage, list[Session]]:
    result = Triage(since, until, agent, host)
    ordered = sorted(paths, key=_first_time)  # sessions are built in time order
    read_lines(ordered, result.add_line, progress, lambda: result.events)
    return result, result.finish()
