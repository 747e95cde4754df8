"""Ed25519 signatures for a managed policy published at a URL: administrators sign, proxies
verify.

Keys are PEM (the private key PKCS#8, the public key SubjectPublicKeyInfo), so `openssl` reads
and writes them too. A signature file is the base64 of the 64 signature bytes on one line; the
raw 64 bytes (what `openssl pkeyutl -sign -rawin` writes) are accepted as well.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Sequence
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

SIGNATURE_BYTES = 64
MAX_KEY_FILE = 16 * 1024


class SigningKeyError(ValueError):
    """A key file that cannot be used: which file, what is wrong, what to do."""


class SignatureError(ValueError):
    """A signature that is malformed or does not verify with any trusted key."""


def generate_keypair() -> tuple[bytes, bytes]:
    """A new Ed25519 key pair as PEM: (private PKCS#8, public SubjectPublicKeyInfo)."""
    private = Ed25519PrivateKey.generate()
    private_pem = private.private_bytes(serialization.Encoding.PEM,
                                        serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return private_pem, public_pem


def _read_key_file(path: Path) -> bytes:
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_KEY_FILE + 1)
    except OSError as exc:
        raise SigningKeyError(f"key file {path}: cannot be read ({exc.strerror or exc}); check "
                              "the path and its permissions") from None
    if len(data) > MAX_KEY_FILE:
        raise SigningKeyError(f"key file {path}: larger than {MAX_KEY_FILE} bytes, not a PEM "
                              "key; create one with 'agent-egress policy keygen'")
    return data


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """The signing key in a PEM (PKCS#8) file; SigningKeyError otherwise."""
    data = _read_key_file(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise SigningKeyError(f"key file {path}: the key is encrypted; decrypt it first "
                              "(openssl pkey -in KEY -out PLAIN)") from None
    except (ValueError, UnsupportedAlgorithm):
        raise SigningKeyError(f"key file {path}: not a PEM private key; create one with "
                              "'agent-egress policy keygen'") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"key file {path}: a {type(key).__name__.removeprefix('_')}, not "
                              "an Ed25519 key; create one with 'agent-egress policy keygen'")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """The verification key in a PEM (SubjectPublicKeyInfo) file; SigningKeyError otherwise."""
    data = _read_key_file(path)
    if b"PRIVATE KEY" in data:
        raise SigningKeyError(f"key file {path}: this is a private key; give the proxy the "
                              "public key (the .pub file 'agent-egress policy keygen' wrote) "
                              "and keep the private key off the machines it runs on")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise SigningKeyError(f"key file {path}: not a PEM public key; use the .pub file "
                              "'agent-egress policy keygen' wrote") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SigningKeyError(f"key file {path}: not an Ed25519 public key; use the .pub "
                              "file 'agent-egress policy keygen' wrote")
    return key


def key_id(key: Ed25519PublicKey) -> str:
    """A short fingerprint for people: which key verified a policy (status, events)."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + hashlib.sha256(raw).hexdigest()[:16]


def sign(data: bytes, key: Ed25519PrivateKey) -> bytes:
    """The signature file's content for ``data``: base64 of the 64 bytes, one line."""
    return base64.b64encode(key.sign(data)) + b"\n"


def decode_signature(data: bytes, source: str) -> bytes:
    """The 64 signature bytes from a signature file (base64 on one line, or raw)."""
    if len(data) == SIGNATURE_BYTES:
        return data  # raw (base64 of 64 bytes is 88 characters, never 64)
    try:
        raw = base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != SIGNATURE_BYTES:
        raise SignatureError(f"{source}: not an Ed25519 signature (expected base64 of "
                             f"{SIGNATURE_BYTES} bytes on one line, or the raw bytes); sign "
                             "with 'agent-egress policy sign'")
    return raw


def verify(data: bytes, signature: bytes, keys: Sequence[Ed25519PublicKey],
           source: str) -> Ed25519PublicKey:
    """The trusted key whose signature ``signature`` (file content) is over ``data``;
    SignatureError when none verifies it."""
    raw = decode_signature(signature, source)
    for key in keys:
        try:
            key.verify(raw, data)
        except InvalidSignature:
            continue
        return key
    raise SignatureError(f"{source}: the signature does not verify with the trusted key"
                         f"{'s' if len(keys) != 1 else ''} ("
                         f"{', '.join(key_id(key) for key in keys)}): the policy was changed "
                         "after it was signed, or signed with another key; sign it again with "
                         "'agent-egress policy sign'")
