"""What triage looks for in a session, and the verdict it gives.

Each detector sees a session's events as they are read and keeps only what a finding cites
(at most EVIDENCE lines each). The verdict: `escalate` for any finding (a bypass attempt, a
misdirected credential, exfiltration-shaped traffic, a refused host tried again in another
spelling, a burst of unknown hosts, repeated refusals by a person); `benign_error` when every
refusal is explained by DNS, a timeout or a policy gap; `expected` when nothing was refused.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Protocol

from agent_egress.policy.review import is_ip_literal
from agent_egress.policy.review_signals import (
    LONG_LABEL,
    random_looking,
    registrable_domain,
    skeleton,
)

EVIDENCE = 8  # lines cited per finding
BURST_WINDOW, BURST_HOSTS = 60.0, 20  # distinct unknown hosts within a minute
TUNNEL_NAMES = 3  # random-looking names under one domain
# An upload stands out at 20 times the agent's typical one, from 1 MiB; and at 16 MiB
# whatever the norm, which an agent could otherwise raise by uploading a lot elsewhere.
UPLOAD_FLOOR, UPLOAD_FACTOR, UPLOAD_CEILING = 1 << 20, 20, 16 << 20
RARE_HOST = 2  # other sessions of the agent uploading to a domain, at most, for it to be rare
PERSON_DENIALS = 3
BYPASS = frozenset({"sni_mismatch", "host_mismatch", "ip_literal", "private_address",
                    "invalid_host", "tunnel_protocol"})
# Refusals that are no verdict on the destination: a retry under another name is no evasion.
NOT_ABOUT_THE_HOST = frozenset({"dns_error", "upstream_tls_error", "internal_error",
                                "invalid_request", "too_many_connections", "header_timeout"})
DNS, TIMEOUTS = frozenset({"dns_error"}), frozenset({"approval_timeout", "header_timeout"})
SEVERITY = {"credential_misdirected": 0, "bypass_attempt": 1, "respelled_host": 2,
            "dns_tunnel_shape": 3, "upload_burst": 4, "unknown_burst": 5,
            "approval_denials": 6}


@dataclass(slots=True)
class Evidence:
    where: str  # file:line
    time: str
    text: str

    def as_dict(self) -> dict[str, str]:
        return {"where": self.where, "time": self.time, "text": self.text}


@dataclass
class Finding:
    kind: str
    summary: str = ""
    count: int = 0
    evidence: list[Evidence] = field(default_factory=list)

    def cite(self, evidence: Evidence) -> None:
        self.count += 1
        if len(self.evidence) < EVIDENCE:
            self.evidence.append(evidence)

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "summary": self.summary, "count": self.count,
                "evidence": [e.as_dict() for e in self.evidence]}


@lru_cache(maxsize=65536)
def spelling(host: str) -> str | None:
    """What a name reads as, whatever its spelling: the registered label, Unicode folded to
    ASCII ("pastebin" for pastebin.com, PASTEBIN.net and a Cyrillic pаstebin.com alike)."""
    if is_ip_literal(host):
        return None
    label = registrable_domain(skeleton(host) or host).split(".", 1)[0].lower()
    return label if len(label) >= 4 else None


@lru_cache(maxsize=65536)
def tunnel_shaped(host: str) -> bool:
    """A name that carries data: a random-looking or overlong label below its domain."""
    if is_ip_literal(host):
        return False
    below = host[: -len(registrable_domain(host))].rstrip(".")
    return bool(below) and any(len(label) > LONG_LABEL or random_looking(label)
                               for label in below.split("."))


def _where(event: dict[str, Any]) -> str:
    host, port = event.get("host"), event.get("port")
    return f"{host}:{port}" if port else str(host)


class Detectors:
    """One session's detectors, fed event by event."""

    def __init__(self) -> None:
        self.found: dict[str, Finding] = {}
        self._spellings: dict[str, dict[tuple[str, Any], Evidence]] = {}
        self._window: deque[tuple[float, str]] = deque()
        self._in_window: Counter[str] = Counter()
        self._burst = 0
        self._shapes: dict[str, dict[str, Evidence]] = {}
        self._uploads: dict[str, list[Any]] = {}  # domain -> [bytes, tunnels, largest, its size]

    def _finding(self, kind: str) -> Finding:
        return self.found.setdefault(kind, Finding(kind))

    def decided(self, event: dict[str, Any], decision: object, reason: str, at: float,
                when: str, where: str) -> None:
        host = str(event.get("host"))
        if tunnel_shaped(host):
            # Whatever the decision: an allowed wildcard's random names, or names that fail
            # DNS, are lookups that reached a resolver all the same.
            self._shaped(host, Evidence(where, when, f"{decision} {_where(event)}: {reason}"))
        if decision not in ("deny", "held"):
            return
        detail = str(event.get("detail") or "")[:160]
        evidence = Evidence(where, when, f"{decision} {_where(event)}: {reason}"
                                         + (f" ({detail})" if detail else ""))
        if reason in BYPASS and not (reason == "tunnel_protocol"
                                     and detail.startswith("no complete ")):  # merely slow
            self._finding("bypass_attempt").cite(evidence)
        if reason == "credential_misdirected":
            self._finding("credential_misdirected").cite(evidence)
        if decision == "deny" and reason not in NOT_ABOUT_THE_HOST:
            self._respelled(host, event.get("port"), evidence)
        self._unknown(host, at, evidence)

    def _shaped(self, host: str, evidence: Evidence) -> None:
        names = self._shapes.setdefault(registrable_domain(host), {})
        if len(names) < 64:
            names.setdefault(host, evidence)
        if len(names) >= TUNNEL_NAMES:
            finding = self._finding("dns_tunnel_shape")
            finding.count, finding.evidence = len(names), list(names.values())[:EVIDENCE]

    def _respelled(self, host: str, port: Any, evidence: Evidence) -> None:
        key = spelling(host)
        if key is None:
            return
        # One variant per registered domain and port: two names under one domain are two
        # destinations, not one spelled twice.
        variant = (registrable_domain(host), port)
        tried = self._spellings.setdefault(key, {})
        if variant in tried or len(tried) >= 64:
            return
        tried[variant] = evidence
        if len(tried) >= 2:
            finding = self._finding("respelled_host")
            finding.count, finding.evidence = len(tried), list(tried.values())[:EVIDENCE]

    def _unknown(self, host: str, at: float, evidence: Evidence) -> None:
        self._window.append((at, host))
        self._in_window[host] += 1
        while self._window and at - self._window[0][0] > BURST_WINDOW:
            _, old = self._window.popleft()
            self._in_window[old] -= 1
            if not self._in_window[old]:
                del self._in_window[old]
        if len(self._in_window) >= BURST_HOSTS and len(self._in_window) > self._burst:
            self._burst = len(self._in_window)
            finding = self._finding("unknown_burst")
            finding.count = self._burst
            if len(finding.evidence) < EVIDENCE:
                finding.evidence.append(evidence)

    def approval(self, event: dict[str, Any], when: str, where: str) -> None:
        if event.get("decision") == "deny" and str(event.get("actor", "")).startswith("uid:"):
            self._finding("approval_denials").cite(Evidence(
                where, when, f"denied {_where(event)} by {event.get('actor')}"))

    def tunnel(self, host: str, port: Any, up: int, when: str, where: str) -> None:
        """Bytes up, totalled per registered domain: an upload split into many tunnels, or
        many names, is one upload."""
        if not up:
            return
        domain = registrable_domain(host)
        total = self._uploads.get(domain)
        largest = Evidence(where, when, f"{up:,} bytes up to {host}:{port}")
        if total is None:
            self._uploads[domain] = [up, 1, largest, up]
            return
        total[0] += up
        total[1] += 1
        if up > total[3]:
            total[2], total[3] = largest, up

    def uploaded_to(self) -> Iterable[str]:
        return self._uploads.keys()

    def findings(self, typical_upload: int, sessions_with: Counter[str]) -> list[Finding]:
        """The findings, once the agent's typical upload is known (from all its sessions)."""
        big = min(max(UPLOAD_FLOOR, UPLOAD_FACTOR * typical_upload), UPLOAD_CEILING)
        for domain, (up, tunnels, largest, _) in sorted(self._uploads.items()):
            if up >= big and sessions_with[domain] - 1 <= RARE_HOST:
                self._finding("upload_burst").cite(Evidence(
                    largest.where, largest.time, f"{up:,} bytes up to {domain} in {tunnels} "
                    f"tunnel{'s' * (tunnels != 1)} (the largest: {largest.text})"))
        denials = self.found.get("approval_denials")
        if denials is not None and denials.count < PERSON_DENIALS:
            del self.found["approval_denials"]
        for finding in self.found.values():
            finding.summary = _summary(finding, typical_upload)
        return sorted(self.found.values(), key=lambda f: SEVERITY[f.kind])


def _summary(finding: Finding, typical_upload: int) -> str:
    n = finding.count
    if finding.kind == "bypass_attempt":
        reasons = Counter(e.text.split(": ", 1)[1].split(" (", 1)[0] for e in finding.evidence)
        return (f"{n} bypass attempt{'s' * (n != 1)} ("
                + ", ".join(f"{r} x{c}" for r, c in reasons.most_common()) + ")")
    if finding.kind == "credential_misdirected":
        return f"a credential placeholder sent where its secret may not go ({n}x)"
    if finding.kind == "respelled_host":
        names = ", ".join(e.text.split(" ", 2)[1].rstrip(":") for e in finding.evidence)
        return f"a refused destination tried again in {n} spellings: {names}"
    if finding.kind == "dns_tunnel_shape":
        return f"{n} random-looking names under one domain (a DNS-tunnel shape)"
    if finding.kind == "upload_burst":
        return (f"{n} upload{'s' * (n != 1)} far above the agent's typical "
                f"{typical_upload:,} bytes per tunnel, to domains it rarely uploads to")
    if finding.kind == "unknown_burst":
        return f"{n} distinct unknown hosts within {BURST_WINDOW:g} s"
    return f"{n} requests refused by a person"


class Judged(Protocol):
    """What the verdict is made of (triage.Session)."""

    events: int
    findings: list[Finding]
    refusals: Counter[str]
    destinations: dict[Any, Any]


def judge(session: Judged) -> tuple[str, str]:
    """The verdict and a paragraph that says why."""
    reached = sum(1 for d in session.destinations.values() if d.allowed or d.tunnels)
    scale = (f"The session reached {reached} destination{'s' * (reached != 1)} "
             f"in {session.events} events")
    if session.findings:
        return "escalate", (f"Escalate: {'; '.join(f.summary for f in session.findings)}. "
                            f"{scale}; the evidence lines are cited below.")
    refusals = Counter(session.refusals)
    undecided = sum(d.held for d in session.destinations.values() if not d.allowed
                    and not d.refused)
    if undecided:
        refusals["held, never decided"] = undecided
    if not refusals:
        approved = sum(sum((d.approved_by or {}).values())
                       for d in session.destinations.values())
        return "expected", (f"Expected: only allowed and approved traffic. {scale}"
                            + (f", {approved} approved on request" if approved else "") + ".")
    parts = []
    if dns := sum(refusals[r] for r in DNS):
        parts.append(f"{dns} DNS failure{'s' * (dns != 1)}")
    if timeouts := sum(refusals[r] for r in TIMEOUTS):
        parts.append(f"{timeouts} timeout{'s' * (timeouts != 1)}")
    if undecided:
        parts.append(f"{undecided} held request{'s' * (undecided != 1)} nobody decided")
    gaps = sorted({d.host for d in session.destinations.values()
                   if set(d.refused or ()) - DNS - TIMEOUTS})
    if gaps:
        shown = ", ".join(gaps[:5]) + (f" and {len(gaps) - 5} more" if len(gaps) > 5 else "")
        parts.append(f"{len(gaps)} destination{'s' * (len(gaps) != 1)} outside the policy "
                     f"({shown}; `agent-egress report --suggest` proposes rules)")
    return "benign_error", (f"Benign errors: the refusals are explained by {', '.join(parts)}, "
                            f"and nothing suggests evasion or exfiltration. {scale}.")
