"""The `agent-egress` command line: assembles each command module's subcommands and runs the
one chosen (its handler), with the errors every command shares said the same way."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib.metadata import version

from agent_egress.policy import PolicyError

from . import (
    approval_cli,
    ca_cli,
    connect_cli,
    credentials_cli,
    isolate_bridge,
    launch,
    policy_cli,
    report_cli,
    run,
    serve_cli,
    triage_cli,
)
from .approval_client import ApprovalClientError
from .textsafe import printable_lines

EXIT_DENIED, EXIT_USAGE = 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agent-egress",
        description="Egress proxy that decides which destinations AI coding agents may reach.",
    )
    parser.add_argument("--version", action="version",
                        version=f"agent-egress {version('agent-egress')}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve_cli.add_parsers(commands)
    approval_cli.add_parsers(commands)
    launch.add_parsers(commands)
    run.add_parsers(commands)
    connect_cli.add_parsers(commands)
    isolate_bridge.add_parsers(commands)
    report_cli.add_parsers(commands)
    triage_cli.add_parsers(commands)
    policy_cli.add_parsers(commands)
    ca_cli.add_parsers(commands)
    credentials_cli.add_parsers(commands)
    return parser


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
    try:
        return args.handler(args)
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
