"""How `agent-egress triage` writes its sessions: Markdown (default), JSON and HTML.

Hosts, agent names and details are the agent's own text: escaped for Markdown and HTML (and
controls made visible) as in reports; JSON is exact data.
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterator
from typing import Any

from .auditlogs import counted
from .textsafe import markdown_text, printable
from .triage import Session, Triage

TIMELINE_ROWS = 40  # destinations shown per session; the JSON has them all


def headline(triage: Triage, sessions: list[Session]) -> str:
    escalate = sum(s.verdict == "escalate" for s in sessions)
    agents = len({s.agent for s in sessions})
    return (f"{counted(len(sessions), 'session')} of {counted(agents, 'agent')} from "
            f"{counted(triage.events, 'event')}: {escalate} to escalate"
            + (f" ({counted(triage.malformed, 'malformed line')} skipped)"
               if triage.malformed else "")
            + (f"; {counted(triage.names_grouped, 'event')} of agent names beyond the first "
               f"{triage.max_agents:,} grouped by client" if triage.names_grouped else ""))


def _refused(spot: dict[str, Any]) -> str:
    return ", ".join(f"{reason} x{n}" for reason, n in spot["refused"].items())


def _by(counts: dict[str, int]) -> str:
    return ", ".join(f"{who} x{n}" for who, n in counts.items())


def session_dict(session: Session) -> dict[str, Any]:
    timeline = sorted(session.destinations.values(), key=lambda d: (d.first, d.host))
    return {"agent": session.agent, "start": session.first, "end": session.last,
            "events": session.events, "verdict": session.verdict,
            "rationale": session.rationale,
            "findings": [f.as_dict() for f in session.findings],
            "narrative": session.narrative,
            "timeline": [d.as_dict() for d in timeline]}


def render_json(triage: Triage, sessions: list[Session]) -> Iterator[str]:
    """One JSON document, written a session at a time: a log of millions of events can
    have hundreds of thousands of destinations, never all in memory as text at once."""
    head = json.dumps({"summary": headline(triage, sessions), "events": triage.events,
                       "malformed_lines": triage.malformed}, indent=2)
    yield head[:-2] + ',\n  "sessions": ['
    for index, session in enumerate(sessions):
        text = json.dumps(session_dict(session), indent=2).replace("\n", "\n    ")
        yield f"{',' if index else ''}\n    {text}"
    yield "\n  ]\n}\n"


def render_markdown(triage: Triage, sessions: list[Session]) -> Iterator[str]:
    md = markdown_text
    yield f"# agent-egress triage\n\n{md(headline(triage, sessions))}\n"
    for session in map(session_dict, sessions):
        out = ["", f"## {md(session['agent'])}: {md(session['start'])} to "
                    f"{md(session['end'])}: **{session['verdict'].upper()}**", "",
                md(session["rationale"])]
        if session["findings"]:
            out += ["", "### Findings", ""]
            for finding in session["findings"]:
                out.append(f"- **{md(finding['kind'])}**: {md(finding['summary'])}")
                out += [f"  - `{md(e['where'])}` {md(e['time'])}: {md(e['text'])}"
                        for e in finding["evidence"]]
        if session["narrative"]:
            out += ["", "### Narrative (model)", "", md(session["narrative"])]
        out += ["", "### Timeline", "",
                "| first | destination | allowed | held | refused | approved by | denied by "
                "| tunnels | bytes up | bytes down |", "|---" * 10 + "|"]
        rows = session["timeline"]
        for spot in rows[:TIMELINE_ROWS]:
            cells = [spot["first"], f"{spot['host']}:{spot['port']}", spot["allowed"],
                     spot["held"], _refused(spot), _by(spot["approved_by"]),
                     _by(spot["denied_by"]), spot["tunnels"], f"{spot['bytes_up']:,}",
                     f"{spot['bytes_down']:,}"]
            out.append("| " + " | ".join(md(c) for c in cells) + " |")
        if len(rows) > TIMELINE_ROWS:
            out.append(f"\n... and {len(rows) - TIMELINE_ROWS} more destinations "
                       "(--format json has them all)")
        yield "\n".join(out) + "\n"


def _h(text: object) -> str:
    return html.escape(printable(text))


def render_html(triage: Triage, sessions: list[Session]) -> Iterator[str]:
    yield from ["<!doctype html><meta charset=utf-8><title>agent-egress triage</title>",
             "<style>body{font:14px system-ui,sans-serif;margin:2em;max-width:75em}"
             "table{border-collapse:collapse;width:100%;table-layout:fixed}"
             "td,th{border:1px solid #ccc;padding:.2em .4em;overflow-wrap:anywhere;"
             "text-align:left}.escalate{color:#b00}.benign_error{color:#a60}"
             ".expected{color:#070}</style>",
             f"<h1>agent-egress triage</h1><p>{_h(headline(triage, sessions))}</p>\n"]
    for session in map(session_dict, sessions):
        parts = [f"<h2>{_h(session['agent'])}: {_h(session['start'])} to "
                     f"{_h(session['end'])}: <span class={session['verdict']}>"
                     f"{_h(session['verdict'].upper())}</span></h2>"
                     f"<p>{_h(session['rationale'])}</p>"]
        for finding in session["findings"]:
            items = "".join(f"<li><code>{_h(e['where'])}</code> {_h(e['time'])}: "
                            f"{_h(e['text'])}</li>" for e in finding["evidence"])
            parts.append(f"<p><b>{_h(finding['kind'])}</b>: {_h(finding['summary'])}</p>"
                         f"<ul>{items}</ul>")
        if session["narrative"]:
            parts.append(f"<p><i>Narrative (model):</i> {_h(session['narrative'])}</p>")
        head = "".join(f"<th>{c}</th>" for c in (
            "first", "destination", "allowed", "held", "refused", "approved by", "denied by",
            "tunnels", "bytes up", "bytes down"))
        rows = "".join(
            "<tr>" + "".join(f"<td>{_h(c)}</td>" for c in (
                spot["first"], f"{spot['host']}:{spot['port']}", spot["allowed"], spot["held"],
                _refused(spot), _by(spot["approved_by"]), _by(spot["denied_by"]),
                spot["tunnels"], f"{spot['bytes_up']:,}", f"{spot['bytes_down']:,}")) + "</tr>"
            for spot in session["timeline"][:TIMELINE_ROWS])
        parts.append(f"<table><tr>{head}</tr>{rows}</table>")
        yield "\n".join(parts) + "\n"


RENDERERS = {"md": render_markdown, "json": render_json, "html": render_html}
