"""`agent-egress report`: what agents tried to reach, and why it was refused, from audit logs.

Streams any number of audit logs (rotated, gzipped) line by line: memory grows with the number of
distinct hosts, never with the number of events. Malformed lines are counted and listed, never
fatal.
"""

from __future__ import annotations

import csv
import gzip
import html
import io
import json
import re
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from pathlib import Path
from typing import IO, Any

import tldextract
import tomlkit
from agent_egress.policy import Action, CompiledPolicy, InvalidPattern, parse_pattern

from .textsafe import csv_cell, printable

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


def parse_when(text: str, now: datetime | None = None) -> datetime:
    """'24h', '7d', '30m' (ago), or an ISO date/time (UTC when no zone is given)."""
    now = now or datetime.now(UTC)
    units = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
    if text[:-1].isdigit() and text[-1:] in units:
        return now - timedelta(**{units[text[-1]]: int(text[:-1])})
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{text!r} is neither a duration like 24h/7d nor a date like "
                         "2026-11-24 or 2026-11-24T08:00") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


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

    def add(self, event: dict[str, Any]) -> None:
        self.count += 1
        when = event.get("time", "")
        if not self.first or when < self.first:
            self.first = when
        if when > self.last:
            self.last = when
        if (agent := event.get("agent")) and len(self.agents) < _AGENTS_KEPT:
            self.agents.add(str(agent))
        if isinstance(event.get("port"), int):
            self.ports.add(event["port"])
        path = event.get("path")
        if path and len(self.paths) < _EXAMPLES and path not in self.paths:
            self.paths.append(str(path).split("?", 1)[0])
        self.reasons[str(event.get("reason"))] += 1
        self.decisions[str(event.get("decision"))] += 1
        if rule := event.get("rule"):
            self.rules[str(rule)] += 1
        if event.get("layer") == "managed" and event.get("decision") == "deny":
            self.managed_denied = True

    def as_dict(self) -> dict[str, Any]:
        return {
            "domain": self.domain, "host": self.host, "count": self.count,
            "first_seen": self.first, "last_seen": self.last,
            "agents": sorted(self.agents), "ports": sorted(self.ports),
            "example_paths": self.paths, "reasons": dict(self.reasons.most_common()),
            "rules": dict(self.rules.most_common()), "decisions": dict(self.decisions),
            "approvals": {"asked": self.asked, "decided": dict(self.approvals.most_common()),
                          "timeouts": self.timeouts},
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
    timeline: Counter[str] = field(default_factory=Counter)  # hour bucket -> matched requests
    approval_history: dict[str, HostStats] = field(default_factory=dict)

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
            self.timeline[str(event.get("time", ""))[:13]] += 1
        elif name in ("approval.requested", "approval.decided") and "host" in event:
            if not self._matches(event):
                return
            # Kept for every host (events may precede the host's first matching request) and
            # joined when the report is rendered.
            host = str(event["host"])
            stats = self.approval_history.get(host)
            if stats is None:
                stats = self.approval_history[host] = HostStats(host, "")
            if name == "approval.requested":
                stats.asked += 1
            elif event.get("actor") == "timeout":
                stats.timeouts += 1
            else:
                stats.approvals[f"{event.get('decision')} by {event.get('actor')} "
                                f"({event.get('scope')})"] += 1

    def rows(self) -> list[HostStats]:
        for host, history in self.approval_history.items():
            if (stats := self.hosts.get(host)) is not None:
                stats.asked, stats.approvals = history.asked, history.approvals
                stats.timeouts = history.timeouts
        return sorted(self.hosts.values(), key=lambda s: (-s.count, s.domain, s.host))

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
        }


def open_log(path: Path) -> tuple[IO[bytes], IO[str]]:
    """The raw file (its position drives the progress bar) and text lines, gunzipped if need be."""
    raw = path.open("rb")
    gzipped = raw.read(2) == b"\x1f\x8b"
    raw.seek(0)
    stream: IO[bytes] = gzip.GzipFile(fileobj=raw) if gzipped else raw  # type: ignore[assignment]
    return raw, io.TextIOWrapper(stream, encoding="utf-8", errors="replace")


class Progress:
    """A one-line progress indicator on a terminal's stderr; silent when piped."""

    def __init__(self, total_bytes: int, stream: IO[str] = sys.stderr) -> None:
        self.total = max(total_bytes, 1)
        self.stream = stream
        self.enabled = stream.isatty()
        self._shown = 0.0

    def update(self, done_bytes: int, events: int) -> None:
        now = time.monotonic()
        if not self.enabled or now - self._shown < 0.2:
            return
        self._shown = now
        share = min(done_bytes / self.total, 1.0)
        bar = "#" * int(share * 30)
        self.stream.write(f"\rreading audit logs [{bar:<30}] {share:6.1%} {events:,} events")
        self.stream.flush()

    def finish(self) -> None:
        if self.enabled:
            self.stream.write("\r" + " " * 78 + "\r")
            self.stream.flush()


def build_report(paths: Iterable[Path], *, decision: str = "deny",
                 since: datetime | None = None, until: datetime | None = None,
                 agent: str | None = None, progress: Progress | None = None) -> Report:
    paths = list(paths)
    report = Report([str(p) for p in paths], decision, since, until, agent)
    done = 0
    for path in paths:
        raw, lines = open_log(path)
        with raw, lines:
            for number, line in enumerate(lines, start=1):
                report.add_line(str(path), number, line)
                if progress is not None and number % 20000 == 0:
                    progress.update(done + raw.tell(), report.events)
        done += path.stat().st_size
    if progress is not None:
        progress.finish()
    return report


# -- suggestions ------------------------------------------------------------------------------

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


# -- output formats ---------------------------------------------------------------------------

def _approval_text(stats: HostStats) -> str:
    if not stats.asked and not stats.approvals and not stats.timeouts:
        return ""
    parts = [f"asked {stats.asked}"] if stats.asked else []
    parts += [f"{text} x{n}" for text, n in stats.approvals.most_common(2)]
    if stats.timeouts:
        parts.append(f"timed out {stats.timeouts}")
    return "; ".join(parts)


def _why(stats: HostStats) -> str:
    reason = stats.reasons.most_common(1)[0][0]
    rule = stats.rules.most_common(1)[0][0] if stats.rules else ""
    return f"{reason} ({rule})" if rule else reason


COLUMNS = ["count", "domain", "host", "ports", "agents", "first_seen", "last_seen", "why",
           "example_paths", "approvals"]


def _row(stats: HostStats) -> list[str]:
    return [str(stats.count), stats.domain, stats.host, ",".join(map(str, sorted(stats.ports))),
            ",".join(sorted(stats.agents)), stats.first, stats.last, _why(stats),
            " ".join(stats.paths), _approval_text(stats)]


def _headline(report: Report) -> str:
    t = report.totals()
    label = {"deny": "blocked", "held": "held", "allow": "allowed", "all": "decided"}[
        report.decision]
    text = (f"{t['requests']:,} {label} requests to {t['hosts']:,} hosts in {t['domains']:,} "
            f"domains by {t['agents']:,} agents ({t['events']:,} events in "
            f"{len(t['files'])} file{'s' if len(t['files']) != 1 else ''})")
    if t["malformed_lines"]:
        text += (f"; {t['malformed_lines']:,} malformed lines skipped: "
                 f"{', '.join(t['malformed_at'])}"
                 + (" ..." if t["malformed_lines"] > len(t["malformed_at"]) else ""))
    return text


def render_table(report: Report) -> str:
    rows = [[printable(cell) for cell in _row(s)] for s in report.rows()]
    shown = ["count", "domain", "host", "ports", "agents", "last_seen", "why", "approvals"]
    indexes = [COLUMNS.index(c) for c in shown]
    table = [shown] + [[row[i] for i in indexes] for row in rows]
    widths = [min(max(len(r[i]) for r in table), 48) for i in range(len(shown))]
    out = [printable(_headline(report)), ""]
    for number, row in enumerate(table):
        cells = [cell if len(cell) <= 48 else cell[:45] + "..." for cell in row]
        out.append("  ".join(c.rjust(w) if i == 0 else c.ljust(w)
                             for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip())
        if number == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out) + "\n"


def render_json(report: Report) -> str:
    return json.dumps({"totals": report.totals(), "timeline": dict(sorted(report.timeline.items())),
                       "hosts": [s.as_dict() for s in report.rows()]}, indent=2) + "\n"


def render_csv(report: Report) -> str:
    """Exact data, except that no cell can start a spreadsheet formula.

    RFC 4180 line ends: with them the writer quotes any cell holding a CR or LF, which would
    otherwise start a new row.
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(COLUMNS)
    writer.writerows([csv_cell(cell) for cell in _row(s)] for s in report.rows())
    return buffer.getvalue()


_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]<>|&~])")


def _markdown_text(text: str) -> str:
    """Shown as typed by any CommonMark renderer: no links, HTML, entities, code or cells."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", printable(text))


def render_markdown(report: Report) -> str:
    cell = _markdown_text
    out = ["# agent-egress report", "", cell(_headline(report)), "",
           "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    out += ["| " + " | ".join(cell(c) for c in _row(s)) + " |" for s in report.rows()]
    return "\n".join(out) + "\n"


def _timeline_svg(report: Report) -> str:
    buckets = sorted(report.timeline.items())
    if not buckets:
        return '<p class="empty">No requests in this period.</p>'
    width, height, pad = 760, 180, 30
    peak = max(n for _, n in buckets)
    bar = max((width - 2 * pad) / len(buckets), 1)
    bars = []
    for index, (hour, count) in enumerate(buckets):
        h = (height - 2 * pad) * count / peak
        x = pad + index * bar
        bars.append(f'<rect class="bar" x="{x:.1f}" y="{height - pad - h:.1f}" '
                    f'width="{max(bar - 1, 0.5):.1f}" height="{h:.1f}">'
                    f"<title>{_html(hour)}:00 UTC: {count}</title></rect>")
    first, last = _html(buckets[0][0]), _html(buckets[-1][0])
    return (f'<svg id="timeline" viewBox="0 0 {width} {height}" role="img" '
            f'aria-label="requests per hour">'
            f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" '
            f'class="axis"/>{"".join(bars)}'
            f'<text x="{pad}" y="{height - 8}">{first}:00</text>'
            f'<text x="{width - pad}" y="{height - 8}" text-anchor="end">{last}:00</text>'
            f'<text x="{pad}" y="18">peak {peak} per hour</text></svg>')


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222}
h1{font-size:1.4em}.totals{margin:.5em 0 1.5em;color:#444}
svg{width:100%;max-width:760px;height:auto;border:1px solid #ddd;background:#fafafa}
.bar{fill:#c0392b}.axis{stroke:#888}svg text{font-size:11px;fill:#555}
table{border-collapse:collapse;margin-top:1.5em;width:100%}
th,td{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top}
th{background:#eee}td.n{text-align:right}
@media print{body{margin:0}svg{border:none}tr{page-break-inside:avoid}}
"""


# No script from anywhere, no fetches; the page's own inline CSS only.
_CSP = "default-src 'none'; style-src 'unsafe-inline'"


def _html(text: str) -> str:
    """Text, never markup; controls and bidi overrides shown escaped, as on a terminal."""
    return html.escape(printable(text))


def render_html(report: Report) -> str:
    head = "".join(f"<th>{_html(c)}</th>" for c in COLUMNS)
    body = "".join(
        "<tr>" + "".join(f'<td{" class=n" if i == 0 else ""}>{_html(c)}</td>'
                         for i, c in enumerate(_row(s))) + "</tr>"
        for s in report.rows())
    return (f"<!doctype html><html><head><meta charset=utf-8>"
            f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
            f"<title>agent-egress report</title>"
            f"<style>{_CSS}</style></head><body><h1>agent-egress report</h1>"
            f'<p class="totals">{_html(_headline(report))}</p>'
            f"<h2>Requests per hour (UTC)</h2>{_timeline_svg(report)}"
            f'<table id="hosts"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
            f"</body></html>\n")


RENDERERS = {"table": render_table, "json": render_json, "csv": render_csv,
             "markdown": render_markdown, "html": render_html}


def expand_logs(paths: Iterable[str]) -> Iterator[Path]:
    """Files as given; a directory stands for its audit logs, rotated ones included."""
    for text in paths:
        path = Path(text)
        if path.is_dir():
            yield from sorted(p for p in path.iterdir() if p.is_file() and ".jsonl" in p.name)
        else:
            yield path
