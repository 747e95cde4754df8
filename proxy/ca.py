"""The local CA that signs the certificates intercepted agents are shown.

It lives under ``$XDG_DATA_HOME/agent-egress/ca/`` (directory 0700, key 0600), made on first
use; mitmproxy's default ``~/.mitmproxy`` is never used. Leaf certificates come from mitmproxy's
CertStore: an authority key identifier matching the CA's subject key identifier, so strict
verifiers (Python 3.13's default context, OpenSSL 3) accept them.

The key only lets its holder impersonate origins to clients that trust this CA: an agent that
reads it can deceive itself, not pass the proxy, which verifies every origin it connects to.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import stat
import tempfile
from pathlib import Path

from agent_egress.policy.files import UnsafePath, secure_directory
from cryptography import x509
from mitmproxy import certs

BASENAME = "agent-egress"
KEY_SIZE = 2048
_OPTION = "the CA directory (--ca-dir, or $XDG_DATA_HOME/agent-egress/ca)"
_FILES = (f"{BASENAME}-ca.pem", f"{BASENAME}-ca-cert.pem", f"{BASENAME}-dhparam.pem")


class CAError(Exception):
    """The CA cannot be created or loaded; the message says where and what to do."""


def data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "agent-egress"


class LocalCA:
    """A CA directory: created on first use, loaded once, rotated on request."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._store: certs.CertStore | None = None

    @classmethod
    def default(cls) -> LocalCA:
        return cls(data_dir() / "ca")

    @property
    def key_path(self) -> Path:
        """The CA's private key and certificate (mitmproxy's layout): 0600."""
        return self.directory / _FILES[0]

    @property
    def cert_path(self) -> Path:
        """The CA certificate alone: what clients are told to trust."""
        return self.directory / _FILES[1]

    def ensure(self) -> Path:
        """The CA certificate's path, creating the CA if there is none yet."""
        self._secure()
        if not self.key_path.exists():
            self._create()
        self._check_key()
        return self.cert_path

    def rotate(self) -> Path:
        """A new CA in place of the old one (clients must be given the new certificate; a
        running proxy keeps the CA it loaded until it is restarted)."""
        self._secure()
        self._create()
        self._store = None
        return self.cert_path

    def pem(self) -> bytes:
        return self.ensure().read_bytes()

    @property
    def store(self) -> certs.CertStore:
        if self._store is None:
            self.ensure()
            try:
                self._store = certs.CertStore.from_files(
                    self.key_path, self.directory / _FILES[2])
            except (OSError, ValueError) as exc:
                raise CAError(f"cannot load the CA in {self.directory}: {exc}; move the "
                              "directory aside (or run 'agent-egress ca rotate') to make a "
                              "new one") from None
        return self._store

    def entry(self, host: str) -> certs.CertStoreEntry:
        """A certificate (and key) for this host, signed by the CA; cached by the store."""
        try:
            name: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            name = x509.DNSName(host)
        return self.store.get_cert(host, [name], organization=BASENAME)

    @property
    def dhparams(self) -> certs.DHParams:
        return self.store.dhparams

    def _secure(self) -> None:
        try:
            secure_directory(self.directory, _OPTION)
        except UnsafePath as exc:
            raise CAError(str(exc)) from None
        os.chmod(self.directory, 0o700)

    def _create(self) -> None:
        """Write the new CA beside the directory's files, then move each into place: a reader
        never sees a half-written key."""
        staging = Path(tempfile.mkdtemp(prefix=".new-", dir=self.directory))
        try:
            certs.CertStore.create_store(staging, BASENAME, KEY_SIZE,
                                         organization="agent-egress",
                                         cn="agent-egress local CA")
            (staging / _FILES[0]).chmod(0o600)
            for name in _FILES:  # the key (and its certificate) first, the client copy after
                os.replace(staging / name, self.directory / name)
        except OSError as exc:
            raise CAError(f"cannot create the CA in {self.directory}: {exc}") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _check_key(self) -> None:
        info = os.lstat(self.key_path)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
            raise CAError(f"{self.key_path} is not a regular file of this user (uid "
                          f"{os.geteuid()}); move it aside to make a new CA")
        if stat.S_IMODE(info.st_mode) & 0o077:
            os.chmod(self.key_path, 0o600)
