"""`agent-egress pending | approve | deny | watch`: a person's side of the approval socket."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import sys
import termios
import tty
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from agent_egress.policy import SCOPES

from .approval_client import ApprovalClient, ApprovalClientError, find_socket
from .paths import default_socket_path
from .textsafe import host_display, printable, shortened
from .watch_screen import WatchScreen

KEYS = {
    "o": ("allow", "once"),
    "s": ("allow", "session"),
    "a": ("allow", "always"),
    "d": ("deny", "once"),
}


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
        decide.set_defaults(handler=cmd_decide, decision=verb, resume_auto=None)
    watch = commands.add_parser(
        "watch", help="answer approvals interactively as they arrive",
        description="Show held requests one at a time as they arrive and answer each with one "
                    "key: o (allow once), s (for the session), a (always: written to the user "
                    "policy), d (deny), k (skip), q (quit). Without a terminal, lists what "
                    "waits and exits.")
    add_socket_option(watch)
    watch.set_defaults(handler=cmd_watch)


def _socket(args: argparse.Namespace) -> Path:
    return find_socket(args.approval_socket)


def describe(pending: dict[str, Any]) -> str:
    """One line per pending approval. Host, path and agent are the agent's own text: escaped."""
    what = printable(str(pending["scheme"]).upper())
    if pending.get("method"):
        what += f" {shortened(pending['method'], 16)}"
        if pending.get("path"):
            what += f" {shortened(pending['path'])}"
    waiting = ("client gone" if pending["clients_gone"]
               else f"{pending['waiting']} waiting")
    agent = f" agent={printable(pending['agent'])}" if pending.get("agent") else ""
    return (f"{printable(pending['id'])}  {host_display(pending['host'], pending['port'])}  "
            f"{what}  from {printable(pending['client'])}{agent}  "
            f"({waiting}, {pending['expires_in']:.0f}s left){_review(pending.get('review'))}")


def _review(review: dict[str, Any] | None) -> str:
    """Auto-review's word beside a held request; the rationale may be a model's: escaped."""
    if not isinstance(review, dict):
        return ""
    state, why = review.get("state"), shortened(review.get("rationale") or "", 240)
    if state == "reviewing":
        return "  [auto-review: the model is reviewing it]"
    if state == "paused":
        return f"  [auto-review paused: {why}]"
    return (f"  [auto-review: {printable(review.get('risk_level'))} risk "
            f"({printable(review.get('reviewer'))}): {why}]")


def paused_lines(paused: list[dict[str, Any]]) -> list[str]:
    lines = []
    for pause in paused:
        agents = pause.get("agents") or []
        resume = printable(agents[0]) if agents else "'*'"
        lines.append(f"auto-review paused for {printable(pause.get('owner'))} after "
                     f"{printable(pause.get('denials'))} auto-denials; resume: agent-egress "
                     f"approve --resume-auto {resume}")
    return lines


def cmd_pending(args: argparse.Namespace) -> int:
    with ApprovalClient(_socket(args)) as client:
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
    with ApprovalClient(_socket(args)) as client:
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
    with ApprovalClient(_socket(args)) as client:
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
    print(f"{decision} {target} ({result['scope']}): released {result['released']} "
          f"waiting request{'s' if result['released'] != 1 else ''}"
          + (f"; rule written to {printable(result['written'])}" if result.get("written")
             else ""))
    return 0


@contextlib.contextmanager
def _cbreak(fd: int) -> Iterator[None]:
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def cmd_watch(args: argparse.Namespace) -> int:
    path = _socket(args)
    with ApprovalClient(path, timeout=None) as client:
        queue: list[dict[str, Any]] = client.request("subscribe")["pending"]
        if not sys.stdin.isatty():
            for item in queue:
                print(describe(item))
            if not queue:
                print("no requests are waiting for approval")
            print("agent-egress watch: standard input is not a terminal, so there is nobody to "
                  "ask; use 'agent-egress approve ID' or 'agent-egress deny ID' from scripts",
                  file=sys.stderr)
            return 0
        print(f"watching {printable(path)} (Ctrl-C or q to stop)", flush=True)
        with _cbreak(sys.stdin.fileno()):
            return _watch_loop(client, queue)


def _watch_loop(client: ApprovalClient, queue: list[dict[str, Any]]) -> int:
    screen = WatchScreen(sys.stdout)
    current: dict[str, Any] | None = None
    while True:
        if current is None and queue:
            current = queue.pop(0)
            screen.ask(describe(current))
        screen.status(queue)
        readable, _, _ = select.select([client, sys.stdin], [], [], screen.due_in())
        if client in readable:
            for message in client.read_available():
                event = message.get("event")
                item = message.get("pending", {})
                if event == "pending.opened":
                    queue.append(item)
                    screen.queue_changed()
                elif event == "pending.closed":
                    queue[:] = [q for q in queue if q["id"] != item["id"]]
                    screen.queue_changed()
                    if current is not None and current["id"] == item["id"]:
                        screen.closed(f"  -> {printable(message.get('outcome'))}")
                        current = None
                elif event == "pending.updated" and current and current["id"] == item["id"]:
                    if item["clients_gone"] and not current["clients_gone"]:
                        screen.note("  (the waiting client has gone; a session or always "
                                    "decision still applies to its retry)")
                    current = item
                elif event is None and "released" in message:
                    screen.note(f"  released {printable(message['released'])}")
        if sys.stdin in readable:
            key = os.read(sys.stdin.fileno(), 1).decode(errors="replace")
            if key in ("q", "\x04", ""):
                print()
                return 0
            if current is None:
                continue
            if key == "k":
                screen.answer("skipped")
                current = None
            elif key in KEYS:
                decision, scope = KEYS[key]
                screen.answer(f"{decision} {scope}")
                client.send({"op": "decide", "target": current["id"], "decision": decision,
                             "scope": scope})
