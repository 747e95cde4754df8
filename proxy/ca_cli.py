"""`agent-egress ca path | rotate | export`: the local CA intercepted agents must trust."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .ca import CAError, LocalCA
from .textsafe import printable


def add_ca_dir_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ca-dir", metavar="DIR", type=Path,
                        help="the CA directory (default: $XDG_DATA_HOME/agent-egress/ca)")


def local_ca(args: argparse.Namespace) -> LocalCA:
    return LocalCA(args.ca_dir) if getattr(args, "ca_dir", None) else LocalCA.default()


def add_parsers(commands: Any) -> None:
    ca = commands.add_parser(
        "ca", help="the local CA for intercepted hosts",
        description="The CA that signs the certificates agents see on intercepted hosts (those "
                    "with request rules or read_only, and refusals told over TLS). It is made "
                    "on first use under $XDG_DATA_HOME/agent-egress/ca (directory 0700, key "
                    "0600). 'run' and 'env' point clients at it; see docs/interception.md.")
    ca_commands = ca.add_subparsers(dest="ca_command", required=True, metavar="SUBCOMMAND")
    path = ca_commands.add_parser("path", help="print the CA certificate's path (creating it)")
    rotate = ca_commands.add_parser(
        "rotate", help="replace the CA with a new one",
        description="Replace the CA with a new one. Clients that were given the old certificate "
                    "must be given the new one; a running proxy keeps its CA until restarted.")
    export = ca_commands.add_parser("export", help="print the CA certificate (PEM)")
    for parser, handler in ((path, cmd_path), (rotate, cmd_rotate), (export, cmd_export)):
        add_ca_dir_option(parser)
        parser.set_defaults(handler=handler)


def cmd_path(args: argparse.Namespace) -> int:
    try:
        print(local_ca(args).ensure())
    except CAError as exc:
        return _failed(exc)
    return 0


def cmd_rotate(args: argparse.Namespace) -> int:
    try:
        path = local_ca(args).rotate()
    except CAError as exc:
        return _failed(exc)
    print(f"new CA certificate: {path}\nrestart running proxies and give agents the new "
          "certificate ('agent-egress run' and 'env' do)", file=sys.stderr)
    print(path)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    try:
        sys.stdout.write(local_ca(args).pem().decode("ascii"))
    except CAError as exc:
        return _failed(exc)
    return 0


def _failed(exc: CAError) -> int:
    print(f"agent-egress ca: {printable(exc)}", file=sys.stderr)
    return 1
