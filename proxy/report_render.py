"""`agent-egress report` output formats: table, JSON, CSV, Markdown and a self-contained HTML page.

Every value in a log is agent-chosen text, so each format escapes it its own way (textsafe).
"""

from __future__ import annotations

import csv
import html
import io
import json
from datetime import datetime
from functools import lru_cache
from importlib import resources
from string import Template

from .report import HostStats, Report, counted
from .report_timeline import UNITS, Timeline
from .textsafe import csv_cell, markdown_text, printable


def _approval_text(stats: HostStats) -> str:
    if not stats.asked and not stats.approvals and not stats.timeouts and not stats.reviewed:
        return ""
    parts = [f"{outcome} {n}" for outcome, n in sorted(stats.reviewed.items())]
    parts += [f"asked {stats.asked}"] if stats.asked else []
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


def headline(report: Report) -> str:
    """The totals in one sentence; every format (and the HTML page) starts with it."""
    t = report.totals()
    label = {"deny": "blocked", "held": "held", "allow": "allowed", "all": "decided"}[
        report.decision]
    text = (f"{counted(t['requests'], f'{label} request')} to {counted(t['hosts'], 'host')} "
            f"in {counted(t['domains'], 'domain')} by {counted(t['agents'], 'agent')} "
            f"({counted(t['events'], 'event')} in {counted(len(t['files']), 'file')})")
    if t["malformed_lines"]:
        text += (f"; {counted(t['malformed_lines'], 'malformed line')} skipped: "
                 f"{', '.join(t['malformed_at'])}"
                 + (" ..." if t["malformed_lines"] > len(t["malformed_at"]) else ""))
    return text


def summary(report: Report) -> str:
    """What `-o FILE` says on standard error about what it wrote."""
    return f"{counted(report.matched, 'request')}, {counted(len(report.hosts), 'host')}"


def render_table(report: Report) -> str:
    rows = [[printable(cell) for cell in _row(s)] for s in report.rows()]
    shown = ["count", "domain", "host", "ports", "agents", "last_seen", "why", "approvals"]
    indexes = [COLUMNS.index(c) for c in shown]
    table = [shown] + [[row[i] for i in indexes] for row in rows]
    widths = [min(max(len(r[i]) for r in table), 48) for i in range(len(shown))]
    out = [printable(headline(report)), ""]
    for number, row in enumerate(table):
        cells = [cell if len(cell) <= 48 else cell[:45] + "..." for cell in row]
        out.append("  ".join(c.rjust(w) if i == 0 else c.ljust(w)
                             for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip())
        if number == 0:
            out.append("  ".join("-" * w for w in widths))
    if report.reviewed_by_agent:
        out += ["", "auto-review by agent:"]
        out += [f"  {printable(agent)}: " + ", ".join(f"{outcome} {n}" for outcome, n in sorted(
            counts.items())) for agent, counts in sorted(report.reviewed_by_agent.items())]
    return "\n".join(out) + "\n"


def render_json(report: Report) -> str:
    return json.dumps({"totals": report.totals(), "timeline": report.timeline.hourly(),
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


def render_markdown(report: Report) -> str:
    cell = markdown_text
    out = ["# agent-egress report", "", cell(headline(report)), "",
           "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    out += ["| " + " | ".join(cell(c) for c in _row(s)) + " |" for s in report.rows()]
    return "\n".join(out) + "\n"


def _label(moment: datetime, unit: str) -> str:
    return moment.strftime("%Y-%m-%d" if unit == "day" else "%Y-%m-%d %H:%M")


def _timeline_section(timeline: Timeline) -> str:
    """A heading naming the bucket, and the chart: bars at their place in time over the whole
    span (gaps stay gaps), the axis labelled with the start of the first bucket and the end of
    the last (never the same moment twice)."""
    unit, start, buckets = timeline.buckets()
    heading = f"<h2>Requests per {unit} (UTC)</h2>"
    if not buckets:
        return heading + '<p class="empty">No requests in this period.</p>'
    step = UNITS[unit]
    end = buckets[-1][0] + step
    slots = round((end - start) / step)
    width, height, pad = 760, 180, 30
    peak = max(n for _, n in buckets)
    slot = (width - 2 * pad) / slots
    bars = []
    for moment, count in buckets:
        h = (height - 2 * pad) * count / peak
        x = pad + round((moment - start) / step) * slot
        bars.append(f'<rect class="bar" x="{x:.2f}" y="{height - pad - h:.1f}" '
                    f'width="{max(slot * 0.85, 0.5):.2f}" height="{h:.1f}">'
                    f"<title>{_label(moment, unit)} UTC: {counted(count, 'request')}</title>"
                    f"</rect>")
    first, last = html.escape(_label(start, unit)), html.escape(_label(end, unit))
    return (f'{heading}<svg id="timeline" viewBox="0 0 {width} {height}" role="img" '
            f'aria-label="requests per {unit}">'
            f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" '
            f'class="axis"/>{"".join(bars)}'
            f'<text class="axis-label" x="{pad}" y="{height - 8}">{first}</text>'
            f'<text class="axis-label" x="{width - pad}" y="{height - 8}" '
            f'text-anchor="end">{last}</text>'
            f'<text x="{pad}" y="18">peak {counted(peak, "request")} per {unit}</text></svg>')


# Share of the table's width per column: a fixed layout never grows past the page, and long
# values (hosts, paths, timestamps: agent-chosen, unbroken) wrap anywhere rather than push the
# last columns out of sight.
_WIDTHS = {"count": 5, "domain": 10, "host": 14, "ports": 5, "agents": 10, "first_seen": 9,
           "last_seen": 9, "why": 11, "example_paths": 13, "approvals": 14}


def _html(text: str) -> str:
    """Text, never markup; controls and bidi overrides shown escaped, as on a terminal."""
    return html.escape(printable(text))


def _list_html(text: str) -> str:
    """A cell whose comma-joined lists (agents, ports) wrap between their items, not inside."""
    return _html(text).replace(",", ",<wbr>")


def render_html(report: Report) -> str:
    assert list(_WIDTHS) == COLUMNS and sum(_WIDTHS.values()) == 100
    columns = "".join(f'<col style="width:{_WIDTHS[c]}%">' for c in COLUMNS)
    head = "".join(f"<th>{_html(c)}</th>" for c in COLUMNS)
    body = "".join(
        "<tr>" + "".join(f'<td{" class=n" if i == 0 else ""}>{_list_html(c)}</td>'
                         for i, c in enumerate(_row(s))) + "</tr>"
        for s in report.rows())
    return _page().substitute(headline=_html(headline(report)),
                              timeline=_timeline_section(report.timeline), columns=columns,
                              head=head, body=body)


@lru_cache(maxsize=1)
def _page() -> Template:
    """The page around the data (report.html, package data): markup and CSS, no script; every
    value put into it is escaped first."""
    return Template(resources.files(__package__).joinpath("report.html").read_text("utf-8"))


RENDERERS = {"table": render_table, "json": render_json, "csv": render_csv,
             "markdown": render_markdown, "html": render_html}
