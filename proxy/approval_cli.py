"""`agent-egress pending | approve | deny | watch`: a person's side of the approval socket."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from agent_egress.policy import SCOPES

from .approval_client import ApprovalClient, ApprovalClientError, find_socket
from .approver import add_state_option, approval_client
from .paths import default_socket_path
from .textsafe import host_display, printable
from .watch_cli import cmd_watch
from .watch_screen import describe, paused_lines


def add_socket_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--approval-socket", metavar="PATH", type=Path,
                        default=None, help=f"approval socket (default {default_socket_path()})")


def add_parsers(commands: Any) -> None:
    pending = commands.add_parser(
        "pending", help="list requests waiting for approval",
        description="List the requests the proxy holds for a person's approval: id, "
                    "destination, what was asked (CONNECT or method and path), client, agent, "
                    "and the time left before they are denied. Decide with approve or deny.")
    pending.add_argument("--json", action="store_true", help="machine-readable output")
    add_socket_option(pending)
    add_state_option(pending)
    pending.set_defaults(handler=cmd_pending)
    for name, verb in (("approve", "allow"), ("deny", "deny")):
        decide = commands.add_parser(
            name, help=f"{verb} a waiting request (by id) or a destination (HOST[:PORT])",
            description=f"{verb.capitalize()} the pending approval ID, or every request for "
                        "HOST[:PORT]. With --scope session or always this also decides ahead "
                        "of requests that have not arrived yet (e.g. a client's retry).")
        decide.add_argument("target", metavar="ID|HOST[:PORT]", nargs="?" if verb == "allow"
                            else None)
        decide.add_argument("--scope", choices=SCOPES, default="once",
                            help="once: the requests waiting now; session: until the proxy "
                                 "stops; always: also written to the user policy file")
        if verb == "allow":
            decide.add_argument("--resume-auto", metavar="AGENT",
                                help="instead: resume auto-review for AGENT after its "
                                     "auto-denials paused it ('*': for every agent)")
        add_socket_option(decide)
        add_state_option(decide)
        decide.set_defaults(handler=cmd_decide, decision=verb, resume_auto=None)
    watch = commands.add_parser(
        "watch", help="answer approvals interactively as they arrive",
        description="Show held requests one at a time as they arrive and answer each with one "
                    "key: o (allow once), s (for the session), a (always: written to the user "
                    "policy), d (deny), k (skip), q (quit). Without a terminal, lists what "
                    "waits and exits.")
    add_socket_option(watch)
    add_state_option(watch)
    watch.set_defaults(handler=cmd_watch)


def cmd_pending(args: argparse.Namespace) -> int:
    with approval_client(args) as client:
        reply = client.request("list")
    pending = reply["pending"]
    if args.json:
        print(json.dumps(pending, indent=2))
        return 0
    if not pending:
        print("no requests are waiting for approval")
    for item in pending:
        print(describe(item))
    for line in paused_lines(reply.get("auto_review_paused") or []):
        print(line)
    return 0


def _resume(args: argparse.Namespace) -> int:
    with ApprovalClient(find_socket(args.approval_socket)) as client:
        resumed = client.request("resume_auto", agent=args.resume_auto)["resumed"]
    if not resumed:
        print(f"auto-review was not paused for {printable(args.resume_auto)}")
    for pause in resumed:
        print(f"resumed auto-review for {printable(pause['owner'])}")
    return 0


def cmd_decide(args: argparse.Namespace) -> int:
    if args.resume_auto is not None:
        if args.target:
            raise SystemExit("agent-egress: give a target or --resume-auto, not both")
        return _resume(args)
    if not args.target:
        raise SystemExit("agent-egress approve: give the pending ID or HOST[:PORT] to approve "
                         "('agent-egress pending' lists them), or --resume-auto AGENT")
    decision = args.decision
    with approval_client(args) as client:
        try:
            result = client.request("decide", target=args.target, decision=decision,
                                    scope=args.scope)
        except ApprovalClientError as exc:
            if exc.code != "unknown_id":
                raise
            print(f"agent-egress: {printable(exc)}", file=sys.stderr)
            waiting = client.request("list")["pending"]
            for item in waiting:
                print(f"  {describe(item)}", file=sys.stderr)
            if not waiting:
                print("  (no requests are waiting for approval)", file=sys.stderr)
            return 1
    target = host_display(result["host"], result.get("port") or None)
    if result.get("fleet"):
        print(_fleet_outcome(decision, target, result))
        return 0
    print(f"{decision} {target} ({result['scope']}): released {result['released']} "
          f"waiting request{'s' if result['released'] != 1 else ''}"
          + (f"; rule written to {printable(result['written'])}" if result.get("written")
             else ""))
    return 0


def _fleet_outcome(decision: str, target: str, result: dict[str, Any]) -> str:
    """A fleet decision: recorded in the shared state; each proxy releases its own requests."""
    held = len(result["ids"])
    where = " (stored in the shared state)" if result["scope"] in ("session", "always") else ""
    return (f"{decision} {target} ({result['scope']}){where}: {held} held destination"
            f"{'s' if held != 1 else ''} decided for the fleet; sent to "
            f"{result['delivered']} subscriber{'s' if result['delivered'] != 1 else ''} "
            "(proxies and watchers)")
