"""`agent-egress report --suggest`: candidate policy rules, each with the evidence behind it.

Kept apart from reading and rendering because its output is pasted into a policy file: what it
proposes, and that no text from a log can become a rule or a table, is its whole concern.
"""

from __future__ import annotations

from collections import Counter

import tomlkit
from agent_egress.policy import Action, CompiledPolicy, InvalidPattern, parse_pattern

from .report import HostStats, Report
from .textsafe import printable

_DENY_REASONS = {"denied_by_approver", "sni_mismatch", "host_mismatch", "private_address"}


def suggest(report: Report, managed: CompiledPolicy | None, *, min_count: int = 3,
            min_agents: int = 2) -> str:
    """A TOML snippet of candidate rules, each with the evidence behind it."""
    allow, deny = _candidates(report, managed, min_count, min_agents)
    return _suggestion_toml(report, allow, deny)


def _candidates(report: Report, managed: CompiledPolicy | None, min_count: int,
                min_agents: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(pattern, evidence) pairs to allow and to deny, as the log has them (unescaped)."""
    by_domain: dict[str, list[HostStats]] = {}
    for stats in report.rows():
        by_domain.setdefault(stats.domain, []).append(stats)
    allow, deny = [], []
    for domain, hosts in by_domain.items():
        flagged = any(set(h.reasons) & _DENY_REASONS or h.reasons.get("denylist") or
                      any(key.startswith("deny") for key in h.approvals) for h in hosts)
        if any(h.managed_denied for h in hosts):
            continue  # never suggest around the administrator's deny rules
        count = sum(h.count for h in hosts)
        agents = set().union(*(h.agents for h in hosts))
        pattern = hosts[0].host if len(hosts) == 1 else f"**.{domain}"
        if managed is not None and managed.decide(hosts[0].host, 443).action is Action.DENY:
            continue
        if flagged:
            reasons = Counter()
            for h in hosts:
                reasons.update(h.reasons)
            evidence = ", ".join(f"{r} x{n}" for r, n in reasons.most_common(3))
            approvals = sum(sum(v for k, v in h.approvals.items() if k.startswith("deny"))
                            for h in hosts)
            if approvals or set(reasons) & _DENY_REASONS:
                deny.append((pattern, f"{count} requests; {evidence}"
                             + (f"; denied by a person {approvals}x" if approvals else "")))
            continue
        blocked_for = {"not_allowlisted", "needs_approval", "approval_timeout"}
        if count >= min_count and len(agents) >= min_agents and all(
                set(h.reasons) <= blocked_for for h in hosts):
            hosts_text = ", ".join(h.host for h in hosts[:3])
            allow.append((pattern, f"{count} requests by {len(agents)} agents "
                                   f"({', '.join(sorted(agents)[:3])}); hosts: {hosts_text}; "
                                   f"{hosts[0].first[:10]} to {max(h.last for h in hosts)[:10]}"))
    return allow, deny


def _rule_pattern(text: str) -> bool:
    """Whether a host from the log is a pattern that names exactly that host (or subtree).

    Hosts in a log are whatever an agent sent when they were invalid: never `*`, never a port,
    nothing the policy would read differently from what the evidence shows.
    """
    try:
        return parse_pattern(text, allow_any=False).port is None
    except InvalidPattern:
        return False


def _suggestion_toml(report: Report, allow: list[tuple[str, str]],
                     deny: list[tuple[str, str]]) -> str:
    """Written by tomlkit: patterns are TOML strings, evidence sits in one-line comments."""
    document = tomlkit.document()
    document.add(tomlkit.comment(printable(
        f"Candidate rules from agent-egress report ({report.matched} requests, "
        f"{report.totals()['since'] or 'all time'})")))
    document.add(tomlkit.comment(
        "Review each before pasting it into the [network] table of a policy file."))
    skipped = [p for p, _ in allow + deny if not _rule_pattern(p)]
    for pattern in skipped:
        document.add(tomlkit.comment(f"skipped, not a valid rule pattern: {printable(pattern)}"))
    network = tomlkit.table()
    for key, candidates in (("allow", allow), ("deny", deny)):
        array = tomlkit.array()
        valid = [(p, why) for p, why in candidates if p not in skipped]
        for pattern, why in valid:
            array.add_line(pattern, comment=printable(why))
        if not valid:
            array.add_line(comment="(no candidates)")
        array.add_line(indent="")  # the closing bracket on a line of its own
        network.add(key, array)
    document.add("network", network)
    return tomlkit.dumps(document)
