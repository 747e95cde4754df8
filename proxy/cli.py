"""The `agent-egress` command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent_egress.policy import (
    BUILTIN,
    CompiledPolicy,
    InvalidHost,
    PolicyError,
    load_policy,
)
from agent_egress.policy.files import DEFAULT_MANAGED_PATH, policy_file_trust
from agent_egress.policy.presets import presets

from . import approval_cli, launch
from .approval_client import ApprovalClient, ApprovalClientError, find_socket
from .paths import default_socket_path, managed_policy_file, user_policy_file
from .textsafe import host_display, printable, printable_lines

if TYPE_CHECKING:
    from .telemetry import Telemetry

EXIT_OK, EXIT_DENIED, EXIT_USAGE = 0, 1, 2


def _listen(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise argparse.ArgumentTypeError(
            f"{value!r}: expected HOST:PORT, e.g. 127.0.0.1:8080 (port 0 picks a free port)")
    return host.strip("[]"), int(port)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agent-egress",
        description="Egress proxy that decides which destinations AI coding agents may reach.",
    )
    parser.add_argument("--version", action="version",
                        version=f"agent-egress {version('agent-egress')}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the proxy",
                                description="Run the proxy. Without --config the built-in "
                                            "default policy applies.")
    serve.add_argument("--config", metavar="FILE", help="user policy file (TOML; default "
                       "$XDG_CONFIG_HOME/agent-egress/policy.toml if present, else built-in)")
    serve.add_argument("--managed", metavar="FILE",
                       help=f"managed (admin-owned) policy (default {DEFAULT_MANAGED_PATH} "
                            "if present)")
    serve.add_argument("--listen", metavar="HOST:PORT", type=_listen,
                       default=("127.0.0.1", 8080),
                       help="address to listen on (default 127.0.0.1:8080; port 0 picks one)")
    serve.add_argument("--audit-log", metavar="FILE",
                       help="audit log, JSON lines ('-' for stdout; default "
                            "$XDG_STATE_HOME/agent-egress/audit.jsonl)")
    serve.add_argument("--resolve", metavar="HOST=ADDR", action="append", default=[],
                       help="static address for a host, like curl --resolve (repeatable)")
    serve.add_argument("--dns-timeout", metavar="SECONDS", type=float, default=5.0,
                       help="timeout of the proxy's own DNS lookups (default 5)")
    serve.add_argument("--approver-uid", metavar="UID", type=int, action="append", default=[],
                       help="another uid allowed to approve (the proxy's own uid and root "
                            "always are; the socket's file permissions must let it in too)")
    serve.add_argument("--agent-uid", metavar="UID", type=int,
                       help="the uid the agent runs as, when known (run --agent-user sets it): "
                            "the proxy then says whether the agent could approve its own "
                            "requests or change the policy files")
    serve.add_argument("--managed-owner", metavar="UID", type=int, action="append", default=[],
                       help="an admin uid besides root that may own the managed policy "
                            "(repeatable); a managed file anyone else can change is refused")
    approval_cli.add_socket_option(serve)

    approval_cli.add_parsers(commands)
    launch.add_parsers(commands, approval_cli.add_socket_option)

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

    policy = commands.add_parser("policy", help="check and explain policies")
    policy_commands = policy.add_subparsers(dest="policy_command", required=True,
                                            metavar="SUBCOMMAND")
    check = policy_commands.add_parser("check", help="validate a policy file")
    check.add_argument("file", metavar="FILE")
    explain_cmd = policy_commands.add_parser(
        "explain", help="show the decision for a destination and why",
        description="Show the decision for HOST[:PORT] (port 443 when omitted), the rule that "
                    "matched and why, with the policy files serve would use, and the addresses "
                    "the name resolves to and their check, as the proxy does. Exit status: "
                    "0 allowed, 1 denied or needs approval, 2 bad input.")
    explain_cmd.add_argument("target", metavar="HOST[:PORT]")
    explain_cmd.add_argument("--config", metavar="FILE",
                             help="user policy (default: as serve picks it: "
                                  "$XDG_CONFIG_HOME/agent-egress/policy.toml if present, else "
                                  "built-in)")
    explain_cmd.add_argument("--managed", metavar="FILE",
                             help=f"managed policy (default: {DEFAULT_MANAGED_PATH} if present)")
    explain_cmd.add_argument("--no-resolve", action="store_true",
                             help="skip the DNS lookup (by default explain resolves the name "
                                  "like the proxy and checks the addresses)")
    explain_cmd.add_argument("--dns-timeout", metavar="SECONDS", type=float, default=5.0,
                             help="timeout of the lookup (default 5)")
    explain_cmd.add_argument("--running", action="store_true",
                             help="ask the running proxy instead (its policy, its session and "
                                  "always approvals)")
    approval_cli.add_socket_option(explain_cmd)
    explain_cmd.add_argument("--resolve", metavar="HOST=ADDR", action="append", default=[],
                             help="check the host as if it resolved to ADDR (repeatable)")
    explain_cmd.add_argument("--json", action="store_true", help="machine-readable output")
    show = policy_commands.add_parser(
        "show", help="print the effective merged policy with each rule's origin",
        description="Print the effective policy: settings after layering, every rule with its "
                    "file and layer, and settings the managed policy did not let apply. When "
                    "the proxy is running, also its status (including a failed reload).")
    show.add_argument("--config", metavar="FILE", help="user policy file")
    show.add_argument("--managed", metavar="FILE", help="managed policy file")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    approval_cli.add_socket_option(show)
    policy_commands.add_parser("presets", help="list the rule presets shipped with agent-egress")
    return parser


def _config(args: argparse.Namespace) -> str | None:
    return user_policy_file(getattr(args, "config", None))


def _managed(args: argparse.Namespace) -> str | None:
    return managed_policy_file(getattr(args, "managed", None))


def _load(path: str | None, resolve: Sequence[str] = (),
          managed: str | None = None) -> CompiledPolicy:
    return load_policy(path, resolve=resolve, managed=managed)


def cmd_check(args: argparse.Namespace) -> int:
    policy = _load(args.file, ())
    counts = f"{policy.allow_count} allow, {policy.deny_count} deny rules"
    print(f"{printable(args.file)}: OK ({counts}, default {policy.settings.default.value})")
    for warning in policy.warnings:
        print(f"  warning: {printable(warning)}")
    return EXIT_OK


def cmd_explain(args: argparse.Namespace) -> int:
    from .explain import explain

    try:
        if args.running:
            with ApprovalClient(find_socket(args.approval_socket), timeout=15) as client:
                result = client.request("explain", target=args.target)["explanation"]
        else:
            config, managed = _config(args), _managed(args)
            policy = _load(config, args.resolve, managed)
            result = asyncio.run(explain(policy, args.target, resolve=not args.no_resolve,
                                         dns_timeout=args.dns_timeout,
                                         files={"user": config or BUILTIN,
                                                "managed": managed}))
    except InvalidHost as exc:
        print(f"agent-egress: {printable_lines(exc)}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print_explanation(result)
    return EXIT_OK if result["decision"] == "allow" else EXIT_DENIED


def _print_explanation(result: dict[str, Any]) -> None:
    """The text form: the target (as typed) and rule texts are shown as data, never control."""
    decision = printable(str(result["decision"]).upper())
    host = str(result["host"])
    shown = f"[{host}]" if ":" in host else host  # an IPv6 address with a port: bracketed
    print(f"{host_display(shown, result['port'])}  {decision}")
    print(f"  why:    {printable(result['explanation'])}")
    print(f"  reason: {printable(result['reason'])}")
    if len(result["layers"]) > 1 or result.get("layer"):
        print(f"  decided by: {printable(result.get('layer') or 'defaults')}")
        for verdict in result["layers"]:
            said = (f"deny {verdict['deny']!r}" if verdict["deny"] else
                    f"allow {verdict['allow']!r}" if verdict["allow"] else "no rule")
            print(f"    {printable(verdict['layer']):<8} {printable(said)}  "
                  f"({printable(verdict['source'])})")
    if result.get("address"):
        others = len(result.get("addresses") or ()) - 1
        print(f"  address: {printable(result['address'])} "
              f"({printable(result['address_class'])})"
              + (f" and {others} more" if others > 0 else ""))
    files = result.get("files") or {}
    print(f"  policy: {printable(files.get('user') or result['policy'])}"
          + (f" under managed {printable(files['managed'])}" if files.get("managed") else "")
          + ("  (the running proxy's)" if result.get("running") else ""))


def cmd_show(args: argparse.Namespace) -> int:
    try:
        policy = _load(_config(args), (), _managed(args))
    except PolicyError as exc:
        print(f"agent-egress: {printable_lines(exc)}", file=sys.stderr)
        if running := _running_status(args):
            _print_running(running)
        return EXIT_USAGE
    settings = policy.settings
    data = {
        "layers": [{"layer": layer.name, "source": layer.source} for layer in policy.layers],
        "settings": {
            "mode": settings.mode, "default": settings.default.value,
            "ports": sorted(settings.ports), "allow_ip_literals": settings.allow_ip_literals,
            "block_private": settings.block_private,
            "allowed_cidrs": [str(c) for c in settings.allowed_cidrs],
            "approval_timeout": settings.approval_timeout,
            "approval_scopes": sorted(settings.approval_scopes),
            "managed_allowed_domains_only": settings.managed_allowed_domains_only,
            "telemetry_required": settings.telemetry_required,
        },
        "rules": [
            {"action": rule.action.value, "pattern": rule.text, "layer": rule.layer,
             "origin": rule.origin}
            for layer in policy.layers for rule in (*layer.deny_rules, *layer.allow_rules)
        ],
        "not_applied": list(policy.problems),
        "warnings": list(policy.warnings),
        "running": _running_status(args),
    }
    if args.json:
        print(json.dumps(data, indent=2))
        return EXIT_OK
    _print_policy(data)
    if data["running"]:
        _print_running(data["running"])
    return EXIT_OK


def _print_policy(data: dict[str, Any]) -> None:
    """The text form of `policy show`; file names and error texts are shown escaped."""
    print("layers (highest precedence first):")
    for layer in data["layers"]:
        print(f"  {printable(layer['layer']):<8} {printable(layer['source'])}")
    print("settings:")
    for key, value in data["settings"].items():
        print(f"  {key} = {printable(json.dumps(value))}")
    print("rules (deny beats allow; managed beats user):")
    for rule in data["rules"]:
        print(f"  {printable(rule['action']):<5} {printable(rule['pattern']):<40} "
              f"{printable(rule['origin'])}")
    if data["not_applied"]:
        print("not applied:")
        for problem in data["not_applied"]:
            print(f"  {printable(problem)}")
    for warning in data["warnings"]:
        print(f"warning: {printable(warning)}")


def _print_running(running: dict[str, Any]) -> None:
    print(f"running proxy: policy loaded {printable(running['loaded_at'])}, "
          f"mode {printable(running['mode'])}")
    if failure := running.get("last_reload_failure"):
        error = printable_lines(failure["error"]).replace("\n", "\n    ")
        print(f"  LAST RELOAD FAILED at {printable(failure['at'])} ({printable(failure['why'])})"
              f"; the policy loaded before stays in force:\n    {error}")
    if separation := running.get("approval_separation"):
        print(f"  approvals: {printable(separation)}")
    for warning in running.get("file_warnings") or ():
        print(f"  WARNING: {printable(warning)}")


def _running_status(args: argparse.Namespace) -> dict[str, Any] | None:
    try:
        with ApprovalClient(find_socket(args.approval_socket), timeout=5) as client:
            return client.request("status")["status"]
    except (ApprovalClientError, OSError, ValueError):
        return None


def cmd_presets(args: argparse.Namespace) -> int:
    for preset in presets().values():
        print(f"{preset.name:<20} {preset.description}")
        print(f"{'':<20} {', '.join(preset.allow)}")
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from agent_egress.addons.auditlog import default_audit_log_path

    from . import report as reporting
    from . import report_render, report_suggest

    if args.suggest and (args.decision or args.format not in ("table", "json")):
        print("agent-egress report: --suggest reads every decision and writes TOML (or JSON "
              "with --format json); drop --decision and other formats", file=sys.stderr)
        return EXIT_USAGE
    try:
        since = reporting.parse_when(args.since) if args.since else None
        until = reporting.parse_when(args.until) if args.until else None
    except ValueError as exc:
        print(f"agent-egress report: {exc}", file=sys.stderr)
        return EXIT_USAGE
    paths = list(reporting.expand_logs(args.logs or [str(default_audit_log_path())]))
    missing = [str(p) for p in paths if not p.is_file()]
    if missing or not paths:
        print(f"agent-egress report: no such audit log: {', '.join(missing) or args.logs}",
              file=sys.stderr)
        return EXIT_USAGE
    total = sum(p.stat().st_size for p in paths)
    decision = "all" if args.suggest else args.decision or "deny"
    result = reporting.build_report(paths, decision=decision, since=since, until=until,
                                    agent=args.agent, progress=reporting.Progress(total))
    if args.suggest:
        managed = _managed(args)
        suggestions = report_suggest.suggest(result,
                                             _load(None, (), managed) if managed else None)
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


def _listen_problem(host: str, port: int) -> str | None:
    """Why serve could not listen there, said in our words (mitmproxy's own message points
    at its --mode flag); bound the way mitmproxy binds, with SO_REUSEADDR."""
    if port == 0:
        return None
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            return (f"cannot listen on {shown}: {exc.strerror or exc}; is another proxy "
                    "running there? Choose another address with --listen HOST:PORT (port 0 "
                    "picks a free one)")
    return None


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import serve

    host, port = args.listen
    if problem := _listen_problem(host, port):
        print(f"agent-egress: {problem}", file=sys.stderr)
        return EXIT_USAGE
    refusal, telemetry = _serve_preflight(args)
    if refusal is not None:
        return refusal
    return serve(listen_host=host, listen_port=port, policy_file=_config(args),
                 managed_file=_managed(args), telemetry=telemetry,
                 audit_log=args.audit_log, resolve=args.resolve,
                 socket_path=args.approval_socket or default_socket_path(),
                 approver_uids=args.approver_uid, agent_uid=args.agent_uid,
                 managed_owners=args.managed_owner, extra={"dns_timeout": args.dns_timeout})


def _serve_preflight(args: argparse.Namespace) -> tuple[int | None, Telemetry | None]:
    """Everything that must hold before a proxy starts: (exit status, None) if it must not.

    What is loaded here to check it is let go before `serve` loads the policy for itself: a
    large policy would otherwise be held twice for the proxy's whole life.
    """
    from .telemetry import Telemetry, TelemetryConfigError, telemetry_config

    config, managed = _config(args), _managed(args)
    policy = _load(config, args.resolve, managed)  # a bad file never starts a proxy
    for problem in (*policy.problems, *policy.warnings):
        print(f"agent-egress: warning: {printable(problem)}", file=sys.stderr)
    trust = policy_file_trust(Path(config) if config else None,
                              Path(managed) if managed else None,
                              managed_owners=args.managed_owner, agent_uid=args.agent_uid,
                              protected=policy.settings.protected_file)
    for refusal in trust.refusals:
        print(f"agent-egress: refusing to start: {printable(refusal)}", file=sys.stderr)
    if trust.refusals:
        return EXIT_USAGE, None
    try:
        telemetry_settings = telemetry_config(policy.settings.telemetry,
                                              policy.settings.telemetry_required)
    except TelemetryConfigError as exc:
        print(f"agent-egress: {exc}", file=sys.stderr)
        return EXIT_USAGE, None
    if not telemetry_settings.enabled:
        return None, None
    print(f"telemetry: OTLP {telemetry_settings.protocol} to "
          f"{telemetry_settings.endpoint or 'the default endpoint'}", file=sys.stderr)
    return None, Telemetry(telemetry_settings)


def _chosen(parser: argparse.ArgumentParser,
            args: argparse.Namespace) -> argparse.ArgumentParser:
    """The (sub)command parser the arguments selected, for errors with its own usage."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            chosen = action.choices.get(getattr(args, action.dest, None) or "")
            return _chosen(chosen, args) if chosen is not None else parser
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # said with the subcommand's usage, not the top-level one
        _chosen(parser, args).error(f"unrecognized arguments: {' '.join(unknown)}")
    handler = {"serve": cmd_serve, "pending": approval_cli.cmd_pending,
               "approve": approval_cli.cmd_decide, "deny": approval_cli.cmd_decide,
               "watch": approval_cli.cmd_watch, "report": cmd_report, "env": launch.cmd_env,
               "run": launch.cmd_run, "health": launch.cmd_health}.get(args.command)
    if args.command == "policy":
        handler = {"check": cmd_check, "explain": cmd_explain, "show": cmd_show,
                   "presets": cmd_presets}[args.policy_command]
    assert handler is not None
    try:
        return handler(args)
    except PolicyError as exc:
        print(f"agent-egress: {printable_lines(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except ApprovalClientError as exc:
        print(f"agent-egress: {printable_lines(exc)}", file=sys.stderr)
        return EXIT_DENIED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
