"""`agent-egress policy keygen | sign | verify`: for administrators who publish a managed policy
at a URL (serve --managed-url; docs/fleet.md)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from agent_egress.policy.signed import signable
from agent_egress.policy.signing import (
    SignatureError,
    SigningKeyError,
    generate_keypair,
    key_id,
    load_private_key,
    load_public_key,
    sign,
    verify,
)

from .textsafe import printable, printable_lines

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def add_parsers(policy_commands: Any) -> None:
    keygen = policy_commands.add_parser(
        "keygen", help="make an Ed25519 key pair for signing managed policies",
        description="Write a new Ed25519 private key (PEM, PKCS#8, mode 0600) and its public "
                    "key (FILE.pub), which proxies are given with serve --managed-key. Keep "
                    "the private key where policies are signed (CI secrets), never on the "
                    "machines the proxies run on. Existing files are never overwritten.")
    keygen.add_argument("--out", metavar="FILE", default="agent-egress-policy.key",
                        help="private key file (default agent-egress-policy.key; the public "
                             "key goes to FILE.pub)")
    keygen.set_defaults(handler=cmd_keygen)
    sign_cmd = policy_commands.add_parser(
        "sign", help="sign a managed policy for publishing at a URL",
        description="Check FILE (a valid managed policy with a top-level serial) and write its "
                    "detached signature, base64 on one line, to FILE.sig. Publish both: the "
                    "policy at the URL, the signature at URL.sig.")
    sign_cmd.add_argument("file", metavar="FILE")
    sign_cmd.add_argument("--key", metavar="KEY", required=True, help="private key (PEM)")
    sign_cmd.add_argument("--out", metavar="SIG", help="signature file (default FILE.sig)")
    sign_cmd.set_defaults(handler=cmd_sign)
    verify_cmd = policy_commands.add_parser(
        "verify", help="check a signed managed policy as a proxy would",
        description="Verify FILE's signature (FILE.sig) with the public key and check the "
                    "policy. Exit 0 if a proxy would accept it (given a higher serial).")
    verify_cmd.add_argument("file", metavar="FILE")
    verify_cmd.add_argument("--key", metavar="PUBKEY_FILE", required=True, action="append")
    verify_cmd.add_argument("--sig", metavar="SIG", help="signature file (default FILE.sig)")
    verify_cmd.set_defaults(handler=cmd_verify)


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` (never replacing a file, never through a link) with ``mode``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 mode)
    with os.fdopen(fd, "wb") as handle:
        os.fchmod(handle.fileno(), mode)
        handle.write(data)


def cmd_keygen(args: argparse.Namespace) -> int:
    private_path = Path(args.out)
    public_path = Path(f"{args.out}.pub")
    private_pem, public_pem = generate_keypair()
    for path in (private_path, public_path):
        if os.path.lexists(path):
            print(f"agent-egress: {printable(path)} exists; keygen never overwrites a key "
                  "(choose another --out)", file=sys.stderr)
            return EXIT_USAGE
    try:
        _write_new(private_path, private_pem, 0o600)
        _write_new(public_path, public_pem, 0o644)
    except OSError as exc:
        print(f"agent-egress: cannot write the key: {printable(exc)}", file=sys.stderr)
        return EXIT_FAILED
    print(f"private key: {printable(private_path)} (keep it secret: whoever has it can set "
          "every proxy's policy)")
    print(f"public key:  {printable(public_path)} ({key_id(load_public_key(public_path))}; "
          "give it to the proxies: serve --managed-key)")
    return EXIT_OK


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError as exc:
        print(f"agent-egress: cannot read {printable(path)}: {printable(exc.strerror or exc)}",
              file=sys.stderr)
        return None


def cmd_sign(args: argparse.Namespace) -> int:
    path = Path(args.file)
    if (data := _read(path)) is None:
        return EXIT_USAGE
    try:
        parsed = signable(data.decode("utf-8"), str(path))  # PolicyError: said by cli.main
        key = load_private_key(Path(args.key))
    except UnicodeDecodeError:
        print(f"agent-egress: {printable(path)} is not UTF-8 text", file=sys.stderr)
        return EXIT_USAGE
    except SigningKeyError as exc:
        print(f"agent-egress: {printable(exc)}", file=sys.stderr)
        return EXIT_USAGE
    out = Path(args.out or f"{args.file}.sig")
    out.write_bytes(sign(data, key))
    print(f"signed {printable(path)} (serial {parsed.model.serial}) with "
          f"{key_id(key.public_key())}: {printable(out)}")
    print("publish both: the policy at its URL, the signature at the same URL + .sig")
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    path = Path(args.file)
    sig_path = Path(args.sig or f"{args.file}.sig")
    if (data := _read(path)) is None or (signature := _read(sig_path)) is None:
        return EXIT_USAGE
    try:
        keys = [load_public_key(Path(key)) for key in args.key]
        key = verify(data, signature, keys, str(sig_path))
        parsed = signable(data.decode("utf-8"), str(path))
    except (SigningKeyError, UnicodeDecodeError) as exc:
        print(f"agent-egress: {printable(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except SignatureError as exc:
        print(f"agent-egress: {printable_lines(exc)}", file=sys.stderr)
        return EXIT_FAILED
    print(f"{printable(path)}: signature OK ({key_id(key)}), serial {parsed.model.serial}")
    return EXIT_OK
