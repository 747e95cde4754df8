"""`agent-egress report`: what agents tried to reach, from audit logs (see report.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from agent_egress.policy import load_policy

from .paths import managed_policy_file

EXIT_OK, EXIT_USAGE = 0, 2


def add_parsers(commands: Any) -> None:
    report = commands.add_parser(
        "report", help="report blocked (or other) destinations from audit logs",
        description="Group what agents tried to reach by registrable domain and host, with "
                    "counts, first/last seen, agents, ports, example paths, why, and approval "
                    "history. Reads several logs (rotated and gzipped ones too) as one stream.")
    report.add_argument("logs", metavar="AUDIT_LOG", nargs="*",
                        help="audit log files or directories (default: the default audit log)")
    report.add_argument("--since", metavar="24h|DATE", help="only events at or after this")
    report.add_argument("--until", metavar="24h|DATE", help="only events before this")
    report.add_argument("--agent", metavar="ID", help="only this agent's requests")
    report.add_argument("--decision", choices=("deny", "held", "allow", "all"),
                        help="which decisions to report (default: deny, i.e. blocked); "
                             "not with --suggest, which reads every decision")
    report.add_argument("--format", choices=("table", "json", "csv", "markdown", "html"),
                        default="table", help="output format (default: table); --suggest "
                                              "writes TOML, or JSON with --format json")
    report.add_argument("-o", "--output", metavar="FILE", help="write here instead of stdout")
    report.add_argument("--suggest", action="store_true",
                        help="print candidate allow/deny rules (TOML) with their evidence, "
                             "and hosts refused only for their address or DNS")
    report.add_argument("--managed", metavar="FILE",
                        help="managed policy whose deny rules --suggest must respect")
    report.set_defaults(handler=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from agent_egress.addons.auditlog import default_audit_log_path

    from . import auditlogs, report_render, report_suggest
    from . import report as reporting

    if args.suggest and (args.decision or args.format not in ("table", "json")):
        print("agent-egress report: --suggest reads every decision and writes TOML (or JSON "
              "with --format json); drop --decision and other formats", file=sys.stderr)
        return EXIT_USAGE
    try:
        since = auditlogs.parse_when(args.since) if args.since else None
        until = auditlogs.parse_when(args.until) if args.until else None
        paths = auditlogs.chosen_logs(args.logs, default_audit_log_path())
    except ValueError as exc:
        print(f"agent-egress report: {exc}", file=sys.stderr)
        return EXIT_USAGE
    total = sum(p.stat().st_size for p in paths)
    decision = "all" if args.suggest else args.decision or "deny"
    result = reporting.build_report(paths, decision=decision, since=since, until=until,
                                    agent=args.agent, progress=auditlogs.Progress(total))
    if args.suggest:
        managed = managed_policy_file(args.managed)
        suggestions = report_suggest.suggest(
            result, load_policy(None, managed=managed) if managed else None)
        text = suggestions.json() if args.format == "json" else suggestions.toml()
        summary = suggestions.summary()
    else:
        text = report_render.RENDERERS[args.format](result)
        summary = report_render.summary(result)
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
        print(f"wrote {args.output}: {summary}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return EXIT_OK


