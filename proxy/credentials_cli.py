"""`agent-egress credentials set | list | delete`: the secrets behind [[credentials]], kept in
the OS keyring (macOS Keychain, Windows Credential Manager, Secret Service on Linux), never
shown."""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from typing import Any

from agent_egress.policy import load_policy
from agent_egress.policy.credentials import Credential

from .paths import managed_policy_file, user_policy_file
from .secretstore import SecretError, keyring_location, read_secret
from .textsafe import printable

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def add_parsers(commands: Any) -> None:
    credentials = commands.add_parser(
        "credentials", help="store the secrets the proxy adds for agents",
        description="The secrets behind the policy's [[credentials]]: the agent gets a "
                    "placeholder, the proxy swaps in the secret for the bound hosts only "
                    "(docs/credentials.md). The credentials are read from the policy files "
                    "serve would use (--config/--managed).")
    sub = credentials.add_subparsers(dest="credentials_command", required=True,
                                     metavar="SUBCOMMAND")
    set_cmd = sub.add_parser("set", help="store a credential's secret in the keyring",
                             description="Read the secret from the terminal (not echoed) or "
                                         "from standard input, and store it in the OS keyring "
                                         "under the credential's keyring: source.")
    set_cmd.add_argument("name", metavar="NAME")
    list_cmd = sub.add_parser("list", help="names, sources, hosts, and whether each secret "
                                           "is there (never the secret)")
    list_cmd.add_argument("--json", action="store_true", help="machine-readable output")
    delete = sub.add_parser("delete", help="remove a credential's secret from the keyring")
    delete.add_argument("name", metavar="NAME")
    for parser, handler in ((set_cmd, cmd_set), (list_cmd, cmd_list), (delete, cmd_delete)):
        parser.add_argument("--config", metavar="FILE", help="user policy (default: as serve)")
        parser.add_argument("--managed", metavar="FILE",
                            help="managed policy (default: as serve)")
        parser.set_defaults(handler=handler)


def _credentials(args: argparse.Namespace) -> list[Credential]:
    policy = load_policy(user_policy_file(args.config),
                         managed=managed_policy_file(args.managed))
    return list(policy.credentials.all) if policy.credentials else []


def _keyring_credential(args: argparse.Namespace) -> Credential | None:
    found = [c for c in _credentials(args) if c.name == args.name]
    if not found:
        print(f"agent-egress credentials: no credential named {printable(args.name)!r} in the "
              "policy; add a [[credentials]] table (docs/credentials.md)", file=sys.stderr)
        return None
    credential = found[0]
    if not credential.source.startswith("keyring:"):
        print(f"agent-egress credentials: {credential.name!r} is read from "
              f"{printable(credential.source)}, not the keyring: set it there", file=sys.stderr)
        return None
    return credential


def cmd_set(args: argparse.Namespace) -> int:
    credential = _keyring_credential(args)
    if credential is None:
        return EXIT_USAGE
    if sys.stdin.isatty():
        secret = getpass.getpass(f"secret for {credential.name} (not shown): ")
    else:
        secret = sys.stdin.readline()
    secret = secret.strip()
    if len(secret) < 8 or any(ord(c) < 0x20 for c in secret):
        print("agent-egress credentials: a secret is one line of at least 8 characters; "
              "nothing was stored", file=sys.stderr)
        return EXIT_USAGE
    import keyring
    from keyring.errors import KeyringError

    service, user = keyring_location(credential.source)
    try:
        keyring.set_password(service, user, secret)
    except KeyringError as exc:
        print(f"agent-egress credentials: the keyring refused it ({type(exc).__name__}: "
              f"{printable(exc)}); is a keyring service running and unlocked?", file=sys.stderr)
        return EXIT_FAILED
    print(f"stored {credential.name} in the keyring ({service}/{user}); a running proxy "
          "reads it at its next policy reload or restart")
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    rows = []
    for credential in _credentials(args):
        try:
            read_secret(credential.name, credential.source)
            state = "present"
        except SecretError as exc:
            state = f"missing: {exc}"
        rows.append({"name": credential.name, "env": credential.env,
                     "source": credential.source, "header": credential.header,
                     "hosts": [p.text for p in credential.hosts], "layer": credential.layer,
                     "secret": state})
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    if not rows:
        print("no credentials in the policy (docs/credentials.md)")
    for row in rows:
        print(f"{printable(row['name'])}  {printable(row['env'])}  {printable(row['source'])}"
              f"  {printable(row['header'])} for {printable(', '.join(row['hosts']))}"
              f"  ({printable(row['layer'])}): {printable(row['secret'])}")
    return EXIT_OK


def cmd_delete(args: argparse.Namespace) -> int:
    credential = _keyring_credential(args)
    if credential is None:
        return EXIT_USAGE
    import keyring
    from keyring.errors import KeyringError, PasswordDeleteError

    service, user = keyring_location(credential.source)
    try:
        keyring.delete_password(service, user)
    except PasswordDeleteError:
        print(f"agent-egress credentials: no secret stored for {credential.name}",
              file=sys.stderr)
        return EXIT_FAILED
    except KeyringError as exc:
        print(f"agent-egress credentials: the keyring refused it ({type(exc).__name__})",
              file=sys.stderr)
        return EXIT_FAILED
    print(f"deleted {credential.name} from the keyring")
    return EXIT_OK
