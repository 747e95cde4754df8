"""`agent-egress policy check | explain | show | presets`: policies, as people read them."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
from collections.abc import Sequence
from typing import Any

from agent_egress.policy import BUILTIN, CompiledPolicy, InvalidHost, PolicyError, load_policy
from agent_egress.policy.files import DEFAULT_MANAGED_PATH
from agent_egress.policy.presets import presets
from agent_egress.policy.requests import RequestPolicy

from . import signing_cli
from .approval_cli import add_socket_option
from .approval_client import ApprovalClient, ApprovalClientError, find_socket
from .approver import state_lines
from .launch import managed_url_line
from .paths import managed_policy_file, user_policy_file
from .textsafe import host_display, printable, printable_lines

EXIT_OK, EXIT_DENIED, EXIT_USAGE = 0, 1, 2


def add_parsers(commands: Any) -> None:
    policy = commands.add_parser("policy", help="check and explain policies")
    policy_commands = policy.add_subparsers(dest="policy_command", required=True,
                                            metavar="SUBCOMMAND")
    check = policy_commands.add_parser("check", help="validate a policy file")
    check.add_argument("file", metavar="FILE")
    explain_cmd = policy_commands.add_parser(
        "explain", help="show the decision for a destination and why",
        description="Show the decision for HOST[:PORT] (port 443 when omitted), or for a "
                    "request, METHOD https://HOST/PATH (the request rules too), the rule that "
                    "matched and why, with the policy files serve would use, and the addresses "
                    "the name resolves to and their check, as the proxy does. Exit status: "
                    "0 allowed, 1 denied or needs approval, 2 bad input.")
    explain_cmd.add_argument("target", metavar="HOST[:PORT] | METHOD URL", nargs="+")
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
    add_socket_option(explain_cmd)
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
    add_socket_option(show)
    presets_cmd = policy_commands.add_parser(
        "presets", help="list the rule presets shipped with agent-egress")
    signing_cli.add_parsers(policy_commands)  # keygen, sign, verify (docs/fleet.md)
    check.set_defaults(handler=cmd_check)
    explain_cmd.set_defaults(handler=cmd_explain)
    show.set_defaults(handler=cmd_show)
    presets_cmd.set_defaults(handler=cmd_presets)


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

    if len(args.target) > 2:
        print("agent-egress: explain takes HOST[:PORT] or METHOD URL "
              "(e.g. POST https://api.github.com/repos)", file=sys.stderr)
        return EXIT_USAGE
    args.target = " ".join(args.target)
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
    if request := result.get("request"):
        print(f"  request: {printable(request['method'])} {printable(request['path'])}  "
              f"{printable(str(request['decision']).upper())} ({printable(request['reason'])})")
        if request["explanation"] != result["explanation"]:
            print(f"    why:  {printable(request['explanation'])}")
    if "intercepted" in result:
        print("  tls:    " + ("intercepted to decide each request (request rules)"
                             if result["intercepted"] else "passed through untouched"))
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
    requests = policy.requests
    request_layers = requests.layers if isinstance(requests, RequestPolicy) else ()
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
            "request_default": settings.request_default.value,
            "explain_https": settings.explain_https,
            "upstream_ca_file": settings.upstream_ca_file,
            "auto_review": dataclasses.asdict(settings.auto_review),
        },
        "rules": [
            {"action": rule.action.value, "pattern": rule.text, "layer": rule.layer,
             "origin": rule.origin}
            for layer in policy.layers for rule in (*layer.deny_rules, *layer.allow_rules)
        ],
        "request_rules": [
            {"rule": rule.text, "layer": rule.layer, "origin": rule.origin}
            for layer in request_layers for rule in (*layer.rules, *layer.read_only)
        ],
        "passthrough": [
            {"pattern": rule.text, "layer": rule.layer, "origin": rule.origin}
            for layer in request_layers for rule in layer.passthrough
        ],
        "credentials": [
            {"name": c.name, "env": c.env, "source": c.source, "header": c.header,
             "hosts": [p.text for p in c.hosts], "origin": c.origin}
            for c in (policy.credentials.all if policy.credentials else ())
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
    if data["request_rules"]:
        print("request rules (on allowed hosts; the strictest layer's verdict stands):")
        for rule in data["request_rules"]:
            print(f"  {printable(rule['rule']):<46} {printable(rule['origin'])}")
    for credential in data["credentials"]:
        print(f"  credential {printable(credential['name'])} ({printable(credential['env'])}, "
              f"{printable(credential['source'])}) in {printable(credential['header'])} for "
              f"{printable(', '.join(credential['hosts']))}  {printable(credential['origin'])}")
    for rule in data["passthrough"]:
        print(f"  passthrough {printable(rule['pattern']):<34} {printable(rule['origin'])}")
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
    if managed := running.get("managed_url"):
        print(f"  {managed_url_line(managed)}")
    if separation := running.get("approval_separation"):
        print(f"  approvals: {printable(separation)}")
    if socks := running.get("socks"):
        print(f"  SOCKS5 port: {printable(', '.join(socks))}")
    for warning in running.get("file_warnings") or ():
        print(f"  WARNING: {printable(warning)}")
    for line in state_lines(running):
        print(f"  {line}")


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


