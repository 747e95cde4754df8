"""The `agent-egress` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from importlib.metadata import version

from agent_egress.policy import (
    Action,
    CompiledPolicy,
    InvalidHost,
    PolicyError,
    default_user_policy_path,
    load_policy,
    non_public_reason,
    normalize_host,
    split_host_port,
)

from . import approval_cli
from .approval_client import ApprovalClientError
from .paths import default_socket_path

EXIT_OK, EXIT_DENIED, EXIT_USAGE = 0, 1, 2


def _listen(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
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
    serve.add_argument("--config", metavar="FILE", help="policy file (TOML)")
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
    approval_cli.add_socket_option(serve)

    approval_cli.add_parsers(commands)

    policy = commands.add_parser("policy", help="check and explain policies")
    policy_commands = policy.add_subparsers(dest="policy_command", required=True,
                                            metavar="SUBCOMMAND")
    check = policy_commands.add_parser("check", help="validate a policy file")
    check.add_argument("file", metavar="FILE")
    explain_cmd = policy_commands.add_parser(
        "explain", help="show the decision for a destination and why",
        description="Show the decision for HOST[:PORT] (port 443 when omitted), the rule that "
                    "matched and why, without starting a proxy. Exit status: 0 allowed, "
                    "1 denied or needs approval, 2 bad input.")
    explain_cmd.add_argument("target", metavar="HOST[:PORT]")
    explain_cmd.add_argument("--config", metavar="FILE", help="policy file (default: built-in)")
    explain_cmd.add_argument("--resolve", metavar="HOST=ADDR", action="append", default=[],
                             help="check the host as if it resolved to ADDR (repeatable)")
    explain_cmd.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def _load(path: str | None, resolve: Sequence[str]) -> CompiledPolicy:
    return load_policy(path, resolve=resolve)


def cmd_check(args: argparse.Namespace) -> int:
    policy = _load(args.file, ())
    counts = f"{policy.allow_count} allow, {policy.deny_count} deny rules"
    print(f"{args.file}: OK ({counts}, default {policy.settings.default.value})")
    return EXIT_OK


def explain_target(policy: CompiledPolicy, target: str) -> dict[str, object]:
    """Everything `policy explain` reports, as data."""
    host_text, port = split_host_port(target, default_port=443)
    assert port is not None
    decision = policy.decide(host_text, port)
    result: dict[str, object] = {
        "target": target,
        "host": decision.host,
        "port": port,
        "decision": decision.action.value,
        "reason": decision.reason.value,
        "explanation": decision.explanation,
        "rule": decision.rule.text if decision.rule else None,
        "rule_origin": decision.rule.origin if decision.rule else None,
        "policy": policy.source,
    }
    try:
        host = normalize_host(host_text)
    except InvalidHost:
        return result
    address = host.ip if host.ip is not None else policy.resolve_override(host.name)
    if address is not None:
        result["address"] = str(address)
        result["address_class"] = non_public_reason(address) or "public"
        refusal = policy.address_refusal([address])
        if refusal and decision.action is Action.ALLOW:
            result.update(decision="deny", reason="private_address",
                          explanation=f"{host.name} resolves to {refusal}")
        result["address_refused"] = refusal
    return result


def cmd_explain(args: argparse.Namespace) -> int:
    policy = _load(args.config, args.resolve)
    try:
        result = explain_target(policy, args.target)
    except InvalidHost as exc:
        print(f"agent-egress: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['host']}:{result['port']}  {str(result['decision']).upper()}")
        print(f"  why:    {result['explanation']}")
        print(f"  reason: {result['reason']}")
        if result.get("address"):
            print(f"  address: {result['address']} ({result['address_class']})")
        print(f"  policy: {result['policy']}")
    return EXIT_OK if result["decision"] == "allow" else EXIT_DENIED


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import serve

    config = args.config
    if config is None and default_user_policy_path().exists():
        config = str(default_user_policy_path())
    _load(config, args.resolve)  # a bad file never starts a proxy
    host, port = args.listen
    return serve(listen_host=host, listen_port=port, policy_file=config,
                 audit_log=args.audit_log, resolve=args.resolve,
                 socket_path=args.approval_socket or default_socket_path(),
                 approver_uids=args.approver_uid, extra={"dns_timeout": args.dns_timeout})


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handler = {"serve": cmd_serve, "pending": approval_cli.cmd_pending,
               "approve": approval_cli.cmd_decide, "deny": approval_cli.cmd_decide,
               "watch": approval_cli.cmd_watch}.get(args.command)
    if args.command == "policy":
        handler = {"check": cmd_check, "explain": cmd_explain}[args.policy_command]
    assert handler is not None
    try:
        return handler(args)
    except PolicyError as exc:
        print(f"agent-egress: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ApprovalClientError as exc:
        print(f"agent-egress: {exc}", file=sys.stderr)
        return EXIT_DENIED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
