"""`agent-egress report`: reading audit logs into per-host aggregates.

Streams any number of audit logs (rotated, gzipped) line by line: memory grows with the number of
distinct hosts, never with the number of events. Malformed lines are counted and listed, never
fatal. Rendering lives in report_render, candidate rules in report_suggest: reading is the part
every output shares, and the part that must stay fast on large logs.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import tldextract

from .auditlogs import Progress, counted, read_lines
from .report_timeline import Timeline

__all__ = ["HostStats", "Report", "build_report", "counted", "registrable_domain"]

_EXAMPLES = 3
_MALFORMED_LISTED = 20
_AGENTS_KEPT = 50
_extract = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)  # bundled list, no fetch


@lru_cache(maxsize=65536)
def registrable_domain(host: str) -> str:
    """example.co.uk for a.b.example.co.uk; hosts under no known suffix group by last 2 labels."""
    if host.replace(".", "").isdigit() or ":" in host:
        return host  # IP literal
    result = _extract(host)
    if result.suffix and result.domain:
        return f"{result.domain}.{result.suffix}"
    return ".".join(host.split(".")[-2:])


# Refusals whose event detail says what the network did (the address, the DNS failure).
_DETAILED = frozenset({"private_address", "dns_error"})
_DETAIL_KEPT = 300
_REVIEW_OUTCOMES = {"allow": "auto-approved", "deny": "auto-denied", "escalate": "escalated"}


def by_person(actor: object) -> bool:
    """A person's decision (the approval socket names the peer `uid:N`), not the timeout's, the
    queue limit's or a policy reload's."""
    return str(actor).startswith("uid:")


@dataclass
class HostStats:
    host: str
    domain: str
    count: int = 0
    first: str = ""
    last: str = ""
    agents: set[str] = field(default_factory=set)
    ports: set[int] = field(default_factory=set)
    paths: list[str] = field(default_factory=list)
    reasons: Counter[str] = field(default_factory=Counter)
    rules: Counter[str] = field(default_factory=Counter)
    decisions: Counter[str] = field(default_factory=Counter)
    managed_denied: bool = False
    asked: int = 0
    approvals: Counter[str] = field(default_factory=Counter)  # "allow by uid:0 (once)" -> n
    timeouts: int = 0
    # What --suggest weighs (report_suggest), as small counters per host:
    waits: int = 0  # held for a person (enforce mode): the outcome is an event of its own
    refused: Counter[tuple[str, str]] = field(default_factory=Counter)  # (reason, rule) -> n
    audited: Counter[tuple[str, str]] = field(default_factory=Counter)  # audit mode's refusals
    allowed: int = 0  # by a rule or the default
    details: dict[str, str] = field(default_factory=dict)  # first detail per _DETAILED reason
    person_allowed: int = 0  # approval.decided by a person
    person_denied: int = 0
    person_latest: tuple[str, str, str] = ("", "", "")  # (time, decision, "by uid:N (scope)")
    reviewed: Counter[str] = field(default_factory=Counter)  # auto-approved|-denied|escalated

    def seen(self, when: str) -> None:
        if not self.first or when < self.first:
            self.first = when
        if when > self.last:
            self.last = when

    def add(self, event: dict[str, Any]) -> None:
        self.count += 1
        when = str(event.get("time", ""))
        self.seen(when)
        if (agent := event.get("agent")) and len(self.agents) < _AGENTS_KEPT:
            self.agents.add(str(agent))
        if isinstance(event.get("port"), int):
            self.ports.add(event["port"])
        path = event.get("path")
        if path and len(self.paths) < _EXAMPLES and path not in self.paths:
            self.paths.append(str(path).split("?", 1)[0])
        reason, decision = str(event.get("reason")), str(event.get("decision"))
        self.reasons[reason] += 1
        self.decisions[decision] += 1
        if rule := event.get("rule"):
            self.rules[str(rule)] += 1
        if event.get("layer") == "managed" and decision == "deny":
            self.managed_denied = True
        self._weigh(event, when, reason, decision, str(rule or ""))

    def _weigh(self, event: dict[str, Any], when: str, reason: str, decision: str,
               rule: str) -> None:
        """Sort the decision into what --suggest needs: audit mode apart (traffic flowed),
        a person's verdict apart from a rule's."""
        audit = event.get("mode") == "audit"
        if audit and decision in ("deny", "held"):
            self.audited[(reason, rule)] += 1
        elif decision == "held":
            self.waits += 1
        elif decision == "deny":
            self.refused[(reason, rule)] += 1
        elif decision == "allow" and reason in ("allowlist", "default"):
            self.allowed += 1
        if reason in ("approved", "denied_by_approver") and not str(
                event.get("approval_actor", "")).startswith("auto-review"):  # a person's
            self.decided(when, "allow" if reason == "approved" else "deny",
                         f"by {event.get('approval_actor', 'a person')} "
                         f"({event.get('approval_scope', 'scope not logged')})", counted=False)
        if reason in _DETAILED and reason not in self.details and event.get("detail"):
            self.details[reason] = str(event["detail"])[:_DETAIL_KEPT]

    def decided(self, when: str, decision: str, how: str, *, counted: bool = True) -> None:
        """A person's verdict: counted from approval.decided; the latest one (by time) from
        those and from the requests it let through or refused."""
        if counted:
            self.person_allowed += decision == "allow"
            self.person_denied += decision == "deny"
        if when >= self.person_latest[0]:
            self.person_latest = (when, decision, how)

    def join(self, history: HostStats) -> None:
        """Take in the approval history kept apart for this host."""
        self.asked, self.approvals, self.timeouts = history.asked, history.approvals, \
            history.timeouts
        self.reviewed = history.reviewed
        self.person_allowed, self.person_denied = history.person_allowed, history.person_denied
        self.person_latest = max(self.person_latest, history.person_latest)

    def as_dict(self) -> dict[str, Any]:
        return {
            "domain": self.domain, "host": self.host, "count": self.count,
            "first_seen": self.first, "last_seen": self.last,
            "agents": sorted(self.agents), "ports": sorted(self.ports),
            "example_paths": self.paths, "reasons": dict(self.reasons.most_common()),
            "rules": dict(self.rules.most_common()), "decisions": dict(self.decisions),
            "approvals": {"asked": self.asked, "decided": dict(self.approvals.most_common()),
                          "timeouts": self.timeouts, "auto_review": dict(self.reviewed)},
        }


@dataclass
class Report:
    files: list[str]
    decision: str
    since: datetime | None
    until: datetime | None
    agent: str | None
    lines: int = 0
    events: int = 0
    matched: int = 0
    malformed: int = 0
    malformed_at: list[str] = field(default_factory=list)
    hosts: dict[str, HostStats] = field(default_factory=dict)
    timeline: Timeline = field(default_factory=Timeline)  # matched requests over time
    approval_history: dict[str, HostStats] = field(default_factory=dict)
    reviewed_by_agent: dict[str, Counter[str]] = field(default_factory=dict)

    def _matches(self, event: dict[str, Any]) -> bool:
        when = event.get("time")
        if self.since or self.until:
            try:
                moment = datetime.fromisoformat(str(when))
            except ValueError:
                return False
            if self.since and moment < self.since or self.until and moment >= self.until:
                return False
        return self.agent is None or event.get("agent") == self.agent

    def _stats(self, host: str) -> HostStats:
        stats = self.hosts.get(host)
        if stats is None:
            stats = self.hosts[host] = HostStats(host, registrable_domain(host))
        return stats

    def add_line(self, source: str, number: int, line: str) -> None:
        self.lines += 1
        if not line.strip():
            return
        try:
            event = json.loads(line)
            if not isinstance(event, dict) or "event" not in event:
                raise ValueError("not an event object")
        except ValueError:
            self.malformed += 1
            if len(self.malformed_at) < _MALFORMED_LISTED:
                self.malformed_at.append(f"{source}:{number}")
            return
        self.events += 1
        name = event["event"]
        if name == "request.decided":
            decision = event.get("decision")
            wanted = self.decision == "all" or decision == self.decision
            if not wanted or "host" not in event or not self._matches(event):
                return
            self.matched += 1
            self._stats(str(event["host"])).add(event)
            self.timeline.add(str(event.get("time", "")))
        elif name == "approval.reviewed" and "host" in event:
            self._reviewed(event)
        elif name in ("approval.requested", "approval.decided") and "host" in event:
            if not self._matches(event):
                return
            # Kept for every host (events may precede the host's first matching request) and
            # joined when the report is rendered.
            stats = self._history(str(event["host"]))
            when, actor = str(event.get("time", "")), event.get("actor")
            stats.seen(when)
            if name == "approval.requested":
                stats.asked += 1
            elif actor == "timeout":
                stats.timeouts += 1
            else:
                stats.approvals[f"{event.get('decision')} by {actor} "
                                f"({event.get('scope')})"] += 1
                if by_person(actor) and event.get("decision") in ("allow", "deny"):
                    stats.decided(when, str(event["decision"]),
                                  f"by {actor} ({event.get('scope')})")

    def _history(self, host: str) -> HostStats:
        stats = self.approval_history.get(host)
        if stats is None:
            stats = self.approval_history[host] = HostStats(host, "")
        return stats

    def _reviewed(self, event: dict[str, Any]) -> None:
        """Auto-review's final word on a held destination (a rules review that handed over
        to the model is not one), per host and per agent."""
        if event.get("consulting") or not self._matches(event):
            return
        outcome = _REVIEW_OUTCOMES.get(str(event.get("outcome")))
        if outcome is None:
            return
        self._history(str(event["host"])).reviewed[outcome] += 1
        agent = str(event.get("agent") or "(unnamed)")
        if agent in self.reviewed_by_agent or len(self.reviewed_by_agent) < _AGENTS_KEPT * 20:
            self.reviewed_by_agent.setdefault(agent, Counter())[outcome] += 1

    def rows(self) -> list[HostStats]:
        for host, history in self.approval_history.items():
            if (stats := self.hosts.get(host)) is not None:
                stats.join(history)
        return sorted(self.hosts.values(), key=lambda s: (-s.count, s.domain, s.host))

    def every_host(self) -> list[HostStats]:
        """Every host an event names, requests or approvals alike (a person may decide ahead
        of any request), its approval history joined: what --suggest weighs."""
        hosts = {stats.host: stats for stats in self.rows()}
        for host, history in self.approval_history.items():
            if host not in hosts:
                history.domain = registrable_domain(host)
                hosts[host] = history
        return list(hosts.values())

    def totals(self) -> dict[str, Any]:
        agents = set().union(*(s.agents for s in self.hosts.values())) if self.hosts else set()
        return {
            "files": self.files, "decision": self.decision,
            "since": self.since.isoformat() if self.since else None,
            "until": self.until.isoformat() if self.until else None,
            "agent": self.agent, "lines": self.lines, "events": self.events,
            "requests": self.matched, "hosts": len(self.hosts),
            "domains": len({s.domain for s in self.hosts.values()}), "agents": len(agents),
            "malformed_lines": self.malformed, "malformed_at": self.malformed_at,
            "auto_review": {agent: dict(counts) for agent, counts in sorted(
                self.reviewed_by_agent.items())},
        }


def build_report(paths: Iterable[Path], *, decision: str = "deny",
                 since: datetime | None = None, until: datetime | None = None,
                 agent: str | None = None, progress: Progress | None = None) -> Report:
    paths = list(paths)
    report = Report([str(p) for p in paths], decision, since, until, agent)
    read_lines(paths, report.add_line, progress, lambda: report.events)
    return report


