"""The secrets behind credentials, and the placeholders the agent holds instead.

A secret is read once, when the proxy starts (or reloads), from the OS keyring (the `keyring`
library: macOS Keychain, Windows Credential Manager, Secret Service on Linux), an environment
variable of the proxy, or a file. It lives only in the proxy's memory: no message here (or
anywhere) includes it. A placeholder is fresh for each proxy start and has the secret's shape
where a known prefix says what it is, so clients that check a token's form accept it.
"""

from __future__ import annotations

import os
import secrets
import string
from collections.abc import Iterable
from pathlib import Path

from agent_egress.addons.credentials import Held
from agent_egress.policy import CompiledPolicy
from agent_egress.policy.credentials import Credential

# Known token prefixes, longest first: the placeholder keeps them so clients accept its form.
_PREFIXES = ("github_pat_", "sk-ant-api03-", "sk-ant-", "sk-proj-", "sk-svcacct-", "glpat-",
             "xoxb-", "xoxp-", "xoxa-", "xapp-", "ghp_", "gho_", "ghu_", "ghs_", "ghr_",
             "npm_", "hf_", "pypi-", "AKIA", "sk-", "sk_live_", "sk_test_", "rk_live_")
_MIN_LENGTH = 16  # a placeholder shorter than this could occur in requests by chance


class SecretError(Exception):
    """A credential's secret cannot be read; the message says where and what to do (and
    never holds the secret)."""


def keyring_location(source: str) -> tuple[str, str]:
    """``keyring:SERVICE/USER`` as (service, user)."""
    service, _, user = source.removeprefix("keyring:").partition("/")
    return service, user


def read_secret(name: str, source: str, environ: dict[str, str] | None = None) -> str:
    """The secret of credential ``name`` from its source; raises SecretError."""
    kind, _, where = source.partition(":")
    if kind == "env":
        value = (os.environ if environ is None else environ).get(where)
        if not value:
            raise SecretError(f"credential {name!r}: the proxy's environment has no {where} "
                              "(source env:); set it where the proxy starts")
    elif kind == "file":
        try:
            value = Path(where).read_text().strip()
        except OSError as exc:
            raise SecretError(f"credential {name!r}: cannot read {where}: "
                              f"{exc.strerror or type(exc).__name__}") from None
        if not value:
            raise SecretError(f"credential {name!r}: {where} is empty")
    else:
        value = _from_keyring(name, *keyring_location(source))
    if "\n" in value or "\r" in value or len(value) < 8:
        raise SecretError(f"credential {name!r}: the secret from {source} is not one line of "
                          "at least 8 characters")
    return value


def _from_keyring(name: str, service: str, user: str) -> str:
    import keyring
    from keyring.errors import KeyringError

    try:
        value = keyring.get_password(service, user)
    except KeyringError as exc:
        raise SecretError(f"credential {name!r}: the keyring could not be read "
                          f"({type(exc).__name__}: {exc}); is a keyring service running and "
                          "unlocked for this user?") from None
    if value is None:
        raise SecretError(f"credential {name!r}: no secret in the keyring for {service}/{user};"
                          f" store one with: agent-egress credentials set {name}")
    return value


def placeholder_for(secret: str) -> str:
    """A random stand-in with the secret's form: its known prefix kept, then the same length
    and the same character class (upper, lower, digit) at each position; other characters
    (separators) kept. Never equal to the secret, never containing it."""
    prefix = next((p for p in _PREFIXES if secret.startswith(p)), "")
    length = max(len(secret), len(prefix) + _MIN_LENGTH)
    body = secret[len(prefix):]
    keep = sum(c.isalnum() for c in body) >= 8  # separators kept only around enough randomness
    body = body.ljust(length - len(prefix), "a")
    while True:
        candidate = prefix + "".join(_like(c, keep) for c in body)
        if secret not in candidate and candidate not in secret:
            return candidate


def _like(character: str, keep_separators: bool) -> str:
    for alphabet in (string.ascii_uppercase, string.ascii_lowercase, string.digits):
        if character in alphabet:
            return secrets.choice(alphabet)
    if keep_separators and character in "-_.":
        return character
    return secrets.choice(string.ascii_letters)


class SecretVault:
    """The credentials' secrets and placeholders for one proxy run.

    Placeholders are made once per credential name and kept across policy reloads (the agent
    got them at start); secrets are read at start and again at each reload, so a secret
    stored after the proxy started is picked up by the next reload."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        self._environ = environ
        self._held: dict[str, Held] = {}
        self._synced: object = None

    def held(self) -> list[Held]:
        return list(self._held.values())

    def sync(self, policy: CompiledPolicy | None) -> list[str] | None:
        """Load the secrets of a policy not seen before (at start, after a reload); the
        problems, or None when this policy was already loaded."""
        if policy is None or policy is self._synced:
            return None
        self._synced = policy
        return self.load(policy.credentials.all if policy.credentials else ())

    def environment(self) -> dict[str, str]:
        """What the agent's environment gets: each credential's variable, its placeholder."""
        return {held.env: held.placeholder for held in self._held.values()}

    def load(self, credentials: Iterable[Credential]) -> list[str]:
        """Read every credential's secret; returns the problems (never a secret)."""
        problems, held = [], {}
        for credential in credentials:
            try:
                secret: str | None = read_secret(credential.name, credential.source,
                                                 self._environ)
                problem = ""
            except SecretError as exc:
                secret, problem = None, str(exc)
                problems.append(problem)
            previous = self._held.get(credential.name)  # the agent already holds its placeholder
            placeholder = previous.placeholder if previous else placeholder_for(secret or "x" * 40)
            held[credential.name] = Held(credential.name, credential.env, placeholder, secret,
                                         problem)
        self._held = held
        return problems
