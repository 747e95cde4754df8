"""A managed policy published at a URL: which downloaded version may replace the one in force.

Pure decisions on bytes already read. A version is accepted only when its signature verifies
with a trusted key, its text is a valid managed policy with a `serial`, and that serial is
above every serial accepted before (the floor), so an old signed version served again (a stale
mirror, a replay) never rolls the policy back. Every refusal is a Rejection with a reason code
(the `policy.rejected` event's `reason`) and a message saying what to do.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .errors import PolicyError, Problem
from .layering import compile_layers
from .loader import parse_policy_text
from .signing import SignatureError, key_id, verify
from .source import ParsedFile

MAX_POLICY_BYTES = 4 * 1024 * 1024
MAX_SIGNATURE_BYTES = 1024

# The `reason` codes of a rejected version (docs/events.md).
FETCH_FAILED, UNSIGNED, BAD_SIGNATURE = "fetch_failed", "unsigned", "bad_signature"
STALE, INVALID, TOO_LARGE = "stale", "invalid", "too_large"


class Rejection(Exception):
    """A version that was not accepted; the one in force stays."""

    def __init__(self, reason: str, message: str, serial: int | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.serial = serial


class SignedPolicy(NamedTuple):
    """A verified managed policy: the exact bytes, their signature, and the parsed text."""

    data: bytes
    signature: bytes
    parsed: ParsedFile
    key: str  # the key_id of the key that verified it

    @property
    def serial(self) -> int:
        assert self.parsed.model.serial is not None  # accept() requires one
        return self.parsed.model.serial


_EMPTY_USER = "version = 1\n"


def signable(text: str, source: str) -> ParsedFile:
    """A managed policy that may be signed and published: valid as a managed layer on its own,
    with a top-level `serial`. PolicyError otherwise."""
    parsed = parse_policy_text(text, source)
    if parsed.model.serial is None:
        raise PolicyError(source, [Problem(
            "a managed policy published at a URL needs a top-level serial = N (an integer "
            "above the serial of every version published before); add it, e.g. serial = 1",
            key="serial")])
    compile_layers(parse_policy_text(_EMPTY_USER, "<no user policy>"), parsed, {})
    return parsed


def accept(data: bytes, signature: bytes, keys: Sequence[Ed25519PublicKey], source: str,
           floor: int, in_force: SignedPolicy | None = None) -> SignedPolicy:
    """The version in ``data`` if it may be put in force; Rejection otherwise.

    ``floor`` is the highest serial accepted so far (0: none). The version in force, served
    again unchanged, is accepted (it is the same policy); another text under its serial is not.
    """
    if len(data) > MAX_POLICY_BYTES:
        raise Rejection(TOO_LARGE, f"{source}: larger than {MAX_POLICY_BYTES} bytes; a policy "
                                   "is never that large, check what the URL serves")
    if len(signature) > MAX_SIGNATURE_BYTES:
        raise Rejection(TOO_LARGE, f"{source}.sig: larger than {MAX_SIGNATURE_BYTES} bytes, "
                                   "not a signature; sign with 'agent-egress policy sign'")
    try:  # nothing is parsed before its signature verifies
        key = verify(data, signature, keys, source)
    except SignatureError as exc:
        raise Rejection(BAD_SIGNATURE, str(exc)) from None
    try:
        text = data.decode("utf-8")
        parsed = signable(text, source)
    except UnicodeDecodeError:
        raise Rejection(INVALID, f"{source}: not UTF-8 text; a policy is a TOML file") from None
    except PolicyError as exc:
        raise Rejection(INVALID, str(exc)) from None
    signed = SignedPolicy(data, signature, parsed, key_id(key))
    if in_force is not None and signed.serial == in_force.serial:
        if data == in_force.data:
            return in_force
        raise Rejection(STALE, f"{source}: serial {signed.serial} is the serial of the policy "
                               "in force, with other content; every published change needs a "
                               "higher serial", signed.serial)
    if signed.serial <= floor:
        raise Rejection(STALE, f"{source}: serial {signed.serial} is not above {floor}, the "
                               "highest serial this proxy accepted; an older version is never "
                               "put back in force (publish the change with a higher serial)",
                        signed.serial)
    return signed
