"""`agent-egress report --suggest`: candidate policy rules, each with the evidence behind it.

Kept apart from reading and rendering because its output is pasted into a policy file: what it
proposes, and that no text from a log can become a rule or a table, is its whole concern.

Three groups, because three different people act on them:
- allow: what a person approved, or what audit mode would have refused for want of a rule (the
  agent used it while nothing was enforced);
- deny: what a person denied, or what a rule or check refused and nobody approved;
- check the network: hosts refused only for their address or DNS. No rule changes that, so they
  are never proposed as rules: a private address or a failing lookup is the network's business.
One rule per host seen: a suggestion never covers a host the log does not show.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import tomlkit
from agent_egress.policy import Action, CompiledPolicy, InvalidPattern, parse_pattern
from agent_egress.policy.patterns import Kind

from .report import HostStats, Report, counted
from .textsafe import printable

NETWORK = frozenset({"private_address", "dns_error"})
# No rule covered the host: in audit mode, evidence the agent needed it; enforced, a refusal.
UNCOVERED = frozenset({"not_allowlisted", "needs_approval", "approval_timeout",
                       "approval_queue_full"})
# A rule or a check refused the host itself, in either mode.
MISUSE = frozenset({"denylist", "sni_mismatch", "host_mismatch", "tunnel_protocol",
                    "ip_literal", "invalid_host", "invalid_request"})
# Anything else (port_not_allowed, invalid_agent, internal_error) is about the port, the agent's
# name or the proxy: no host rule is the answer.


@dataclass
class Candidate:
    stats: HostStats
    basis: str  # approved | audit | denied_by_person | refused_by_rule | address | mixed | other
    why: str

    @property
    def host(self) -> str:
        return self.stats.host

    @property
    def requests(self) -> int:
        return self.stats.count - self.stats.waits

    def evidence(self) -> str:
        """One line, unescaped: the caller escapes it for its format."""
        stats = self.stats
        agents = sorted(stats.agents)
        named = f" ({', '.join(agents[:3])}" + (
            f" and {len(agents) - 3} more)" if len(agents) > 3 else ")")
        text = f"{self.why}; {counted(self.requests, 'request')}"
        if agents:
            text += f" by {counted(len(agents), 'agent')}{named}"
        if stats.first:
            text += f"; first {stats.first}, last {stats.last}"
        return text

    def as_dict(self, pattern: bool) -> dict[str, Any]:
        stats = self.stats
        reasons = _reasons(stats.refused + stats.audited)
        return {**({"pattern": self.host} if pattern else {}), "host": self.host,
                "domain": stats.domain, "basis": self.basis, "requests": self.requests,
                "agents": sorted(stats.agents), "ports": sorted(stats.ports),
                "first_seen": stats.first, "last_seen": stats.last,
                "reasons": dict(reasons.most_common()),
                "audit": dict(_reasons(stats.audited).most_common()),
                "approvals": dict(stats.approvals.most_common()),
                "details": dict(stats.details), "evidence": self.evidence()}


@dataclass
class Suggestions:
    report: Report
    allow: list[Candidate] = field(default_factory=list)
    deny: list[Candidate] = field(default_factory=list)
    check_network: list[Candidate] = field(default_factory=list)
    not_suggested: list[Candidate] = field(default_factory=list)
    skipped: list[Candidate] = field(default_factory=list)  # not a valid rule pattern

    def summary(self) -> str:
        return (f"{counted(len(self.allow), 'allow candidate')}, "
                f"{counted(len(self.deny), 'deny candidate')}, "
                f"{counted(len(self.check_network), 'host')} to check the network")

    def json(self) -> str:
        """The same groups as the TOML, as exact data (JSON escapes what it must)."""
        def listed(candidates: list[Candidate], pattern: bool = False) -> list[dict[str, Any]]:
            return [c.as_dict(pattern) for c in candidates]

        return json.dumps({
            "totals": self.report.totals(), "allow": listed(self.allow, True),
            "deny": listed(self.deny, True), "check_network": listed(self.check_network),
            "not_suggested": listed(self.not_suggested),
            "skipped": [{**c.as_dict(False), "why": "not a valid rule pattern"}
                        for c in self.skipped]}, indent=2) + "\n"

    def toml(self) -> str:
        """Written by tomlkit: patterns are TOML strings the library quotes; everything from
        the log outside them sits in one-line comments escaped with printable()."""
        document = tomlkit.document()
        since = self.report.totals()["since"] or "all time"
        document.add(tomlkit.comment(printable(
            f"Candidate rules from agent-egress report "
            f"({counted(self.report.matched, 'request')}, {since})")))
        for line in ("Review each before pasting it into the [network] table of a policy file.",
                     "allow: hosts a person approved, or that audit mode would have refused "
                     "for want of a rule.",
                     "deny: hosts a person denied, or that a rule refused and nobody approved.",
                     "One rule per host seen: no suggestion covers a host the log does not "
                     "show."):
            document.add(tomlkit.comment(line))
        for candidate in self.skipped:
            document.add(tomlkit.comment(
                f"skipped, not a valid rule pattern: {printable(candidate.host)}"))
        for candidate in self.not_suggested:
            document.add(tomlkit.comment(printable(
                f"not suggested, {candidate.host}: {candidate.evidence()}")))
        network = tomlkit.table()
        for key, candidates in (("allow", self.allow), ("deny", self.deny)):
            array = tomlkit.array()
            for candidate in candidates:
                array.add_line(candidate.host, comment=printable(candidate.evidence()))
            if not candidates:
                array.add_line(comment="(no candidates)")
            array.add_line(indent="")  # the closing bracket on a line of its own
            network.add(key, array)
        document.add("network", network)
        document.add(tomlkit.nl())
        document.add(tomlkit.comment("Check the network, not the policy: refused only for "
                                     "their address or DNS, which no rule changes."))
        for candidate in self.check_network:
            document.add(tomlkit.comment(printable(
                f"  {candidate.host}: {candidate.evidence()}")))
        if not self.check_network:
            document.add(tomlkit.comment("  (none)"))
        return tomlkit.dumps(document)


def suggest(report: Report, managed: CompiledPolicy | None) -> Suggestions:
    """Every host the log names, sorted into the three groups (or left out, saying why)."""
    suggestions = Suggestions(report)
    hosts = sorted(report.every_host(), key=lambda s: (-(s.count - s.waits), s.host))
    for stats in hosts:
        if _managed_denies(stats, managed):
            continue  # never suggest around the administrator's deny rules
        placed = classify(stats)
        if placed is None:
            continue
        group, candidate = placed
        if group in ("allow", "deny") and not _rule_pattern(candidate.host):
            suggestions.skipped.append(candidate)
        else:
            getattr(suggestions, group).append(candidate)
    return suggestions


def classify(stats: HostStats) -> tuple[str, Candidate] | None:
    """The group a host belongs in, and why; None when there is nothing to suggest."""
    refusals = stats.refused + stats.audited
    by_reason = _reasons(refusals)
    misuse = _only(refusals, MISUSE)
    audit_uncovered = _only(stats.audited, UNCOVERED)
    uncovered = _only(stats.refused, UNCOVERED)
    network = _only(refusals, NETWORK)
    verdict = stats.person_latest[1]
    if verdict == "allow":
        return "allow", Candidate(stats, "approved", _person_why(stats, "allow") +
                                  _also_network(network))
    if verdict == "deny":
        return "deny", Candidate(stats, "denied_by_person", _person_why(stats, "deny") +
                                 _also_network(network))
    if misuse or (uncovered and not audit_uncovered):
        ruled = misuse + uncovered
        if stats.allowed:
            return "not_suggested", Candidate(
                stats, "mixed", f"allowed {stats.allowed}x by a rule, and refused "
                                f"{ruled.total()}x ({_listed(ruled)}): see the report")
        return "deny", Candidate(stats, "refused_by_rule",
                                 f"refused {ruled.total()}x: {_listed(ruled)}; never approved" +
                                 _also_network(network))
    if audit_uncovered:
        return "allow", Candidate(
            stats, "audit", f"audit mode would have refused it {audit_uncovered.total()}x "
                            f"({_listed(audit_uncovered, rules=False)})" + _also_network(network))
    if network:
        why = "; ".join(f"{reason} x{n}" + (f": {stats.details[reason]}"
                                             if reason in stats.details else "")
                        for reason, n in _reasons(network).most_common())
        if stats.allowed:
            why += f"; allowed {stats.allowed}x by a rule otherwise"
        return "check_network", Candidate(stats, "address", why)
    if by_reason:
        return "not_suggested", Candidate(
            stats, "other", f"refused only for what no host rule decides "
                            f"({_listed(refusals, rules=False)})")
    return None


def _only(refusals: Counter[tuple[str, str]], reasons: frozenset[str]) -> Counter[tuple[str, str]]:
    return Counter({key: n for key, n in refusals.items() if key[0] in reasons})


def _reasons(refusals: Counter[tuple[str, str]]) -> Counter[str]:
    counts: Counter[str] = Counter()
    for (reason, _), n in refusals.items():
        counts[reason] += n
    return counts


def _listed(refusals: Counter[tuple[str, str]], rules: bool = True) -> str:
    """'denylist (rule.test) x2, sni_mismatch x1', the most common first (at most four)."""
    if not rules:
        return ", ".join(f"{reason} x{n}" for reason, n in _reasons(refusals).most_common(4))
    return ", ".join(f"{reason} ({rule}) x{n}" if rule else f"{reason} x{n}"
                     for (reason, rule), n in refusals.most_common(4))


def _person_why(stats: HostStats, verdict: str) -> str:
    """'a person allowed it 2x (allow by uid:1000 (session) x2)'; a verdict the window shows
    only through the requests it decided names who and how."""
    done, other = ("allowed", "denied") if verdict == "allow" else ("denied", "allowed")
    count, other_count = ((stats.person_allowed, stats.person_denied) if verdict == "allow"
                          else (stats.person_denied, stats.person_allowed))
    decisions = _approvals(stats.approvals, verdict)
    text = (f"a person {done} it {count}x ({decisions})" if count
            else f"a person {done} its requests ({stats.person_latest[2]})")
    if other_count:
        text += f"; also {other} it {other_count}x, less recently"
    return text


def _approvals(approvals: Counter[str], verdict: str) -> str:
    return ", ".join(f"{text} x{n}" for text, n in approvals.most_common()
                     if text.startswith(f"{verdict} by uid:"))


def _also_network(network: Counter[tuple[str, str]]) -> str:
    if not network:
        return ""
    return f"; also refused for its address: {_listed(network, rules=False)}"


def _managed_denies(stats: HostStats, managed: CompiledPolicy | None) -> bool:
    """The managed layer denied it in the log, or the --managed policy's deny rules would."""
    if stats.managed_denied:
        return True
    if managed is None:
        return False
    return any(_managed_deny(managed, stats.host, port) for port in stats.ports or {443})


def _managed_deny(managed: CompiledPolicy, host: str, port: int) -> bool:
    decision = managed.decide(host, port)
    return decision.action is Action.DENY and decision.layer == "managed"


def _rule_pattern(text: str) -> bool:
    """Whether a host from the log is a pattern that names exactly that host.

    Hosts in a log are whatever an agent sent when they were invalid: never `*` or a glob,
    never a port, nothing the policy would read differently from what the evidence shows.
    """
    try:
        pattern = parse_pattern(text, allow_any=False)
    except InvalidPattern:
        return False
    if pattern.port is not None:
        return False
    if pattern.kind is Kind.NETWORK:
        return pattern.network is not None and pattern.network.num_addresses == 1
    return pattern.kind is Kind.EXACT  # a '*' in a host from the log would match others
