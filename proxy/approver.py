"""Where an approver's command talks to: a fleet's shared state (--state), else one proxy's
approval socket. Both answer the same requests with the same events."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from .approval_client import ApprovalClient, find_socket

if TYPE_CHECKING:
    from .fleet_client import StateClient


def add_state_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state", metavar="URL",
                        help="a fleet's shared state (redis://[USER:PASS@]HOST:PORT/DB, as "
                             "given to 'serve --state'): every proxy's held requests, instead "
                             "of one proxy's socket (docs/fleet.md)")


def approval_client(args: argparse.Namespace,
                    timeout: float | None = 10.0) -> ApprovalClient | StateClient:
    if getattr(args, "state", None):
        from .fleet_client import StateClient  # redis, loaded only for a fleet

        return StateClient(args.state, timeout=timeout)
    return ApprovalClient(find_socket(args.approval_socket), timeout=timeout)


def where(client: ApprovalClient | StateClient) -> str:
    return str(client.path) if isinstance(client, ApprovalClient) else client.where


def state_lines(status: dict[str, Any]) -> list[str]:
    """What `health` and `policy show` say about a proxy's shared state (none alone)."""
    from .textsafe import host_display, printable

    fleet = status.get("state")
    if not fleet:
        return []
    if fleet.get("connected"):
        lines = [f"shared state: {printable(fleet['url'])} connected since "
                 f"{printable(fleet['since'])} as Redis user {printable(fleet['redis_user'])}"]
    else:
        lines = [f"shared state: {printable(fleet['url'])} UNAVAILABLE since "
                 f"{printable(fleet['since'])} ({printable(fleet.get('error') or 'connecting')})"
                 "; decisions by policy go on, new holds are refused (approval_unavailable), "
                 "the proxy reconnects by itself"]
    for rule in status.get("shared_rules") or ():
        lines.append(f"  always {printable(rule.get('action'))} "
                     f"{host_display(str(rule.get('host')), rule.get('port'))} "
                     f"(by {printable(rule.get('actor'))}, in the shared state)")
    return lines
