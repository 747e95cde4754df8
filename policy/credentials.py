"""Credentials the proxy adds for the agent: which secret, where it may be sent, in which
header. The secrets themselves are never here (proxy/secrets.py reads them); this is the
binding a placeholder is checked against.

Each credential binds host patterns: its hosts are intercepted, and only there, only in its
header, is the placeholder swapped for the secret. Under a managed policy, a user credential
needs hosts inside `requirements.credential_hosts` (when set), may not reuse a managed
credential's name or variable, and may not bind a host the managed `passthrough` keeps
untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import PurePath
from typing import NamedTuple

from .engine import Action, Rule, RuleIndex
from .errors import InvalidHost, InvalidPattern, Problem
from .hosts import normalize_host
from .patterns import Pattern, parse_pattern
from .source import ParsedFile, locate

_CACHE_LIMIT = 65536


class Credential(NamedTuple):
    """One [[credentials]] table, compiled."""

    name: str
    env: str  # the variable the agent gets, holding the placeholder
    source: str  # keyring:SERVICE/USER, env:VARIABLE, file:/PATH
    hosts: tuple[Pattern, ...]
    header: str  # where the placeholder is swapped (case-insensitive name)
    file: str
    index: int
    layer: str = "user"

    @property
    def key(self) -> str:
        return f"credentials[{self.index}]"

    @property
    def origin(self) -> str:
        return f"{self.file} ({self.layer}): {self.key}"

    @property
    def short_origin(self) -> str:
        return f"{PurePath(self.file).name} ({self.layer}): {self.key}"

    def index_of_hosts(self) -> RuleIndex:
        return RuleIndex.build(Rule(pattern, Action.ALLOW, self.file, self.index, self.layer,
                                    "credentials") for pattern in self.hosts)


def compile_credentials(parsed: ParsedFile, layer: str,
                        problems: list[Problem]) -> list[Credential]:
    """A file's credentials; bad host patterns and clashes are appended to ``problems``."""
    compiled, names, variables = [], set(), set()
    for index, table in enumerate(parsed.model.credentials):
        hosts = []
        for position, text in enumerate(table.hosts):
            try:
                hosts.append(parse_pattern(text, allow_any=False))
            except InvalidPattern as exc:
                problems.append(Problem(
                    f"{exc} (a credential's hosts must be named; '*' would send it anywhere)",
                    key=f"credentials[{index}].hosts[{position}]",
                    line=locate(parsed.text, ("credentials", index, "hosts", position), text)))
        for value, seen, what in ((table.name, names, "name"), (table.env, variables, "env")):
            if value in seen:
                problems.append(Problem(f"{what} {value!r} is used by another credential",
                                        key=f"credentials[{index}].{what}",
                                        line=locate(parsed.text, ("credentials", index, what))))
            seen.add(value)
        compiled.append(Credential(table.name, table.env, table.source, tuple(hosts),
                                   table.header, parsed.source, index, layer))
    return compiled


def passthrough_clashes(credentials: Sequence[Credential],
                        passthrough: Sequence[Rule]) -> list[tuple[Credential, Rule]]:
    """Credentials binding a host a passthrough entry keeps untouched (by pattern
    containment; a partial overlap is intercepted at run time, failing closed)."""
    found = []
    for credential in credentials:
        own = credential.index_of_hosts()
        for entry in passthrough:
            other = RuleIndex.build([entry])
            if any(other.covers(p) for p in credential.hosts) or own.covers(entry.pattern):
                found.append((credential, entry))
                break
    return found


def bounded_user_credentials(user: list[Credential], managed: list[Credential],
                             managed_hosts: list[str] | None, managed_passthrough: Sequence[Rule],
                             report: Callable[[str, str], None]) -> list[Credential]:
    """The user's credentials that stay inside what the managed policy permits."""
    allowed = None if managed_hosts is None else RuleIndex.build(
        Rule(parse_pattern(text, allow_any=False), Action.ALLOW, "managed", i, "managed")
        for i, text in enumerate(managed_hosts))
    clashing = {id(c) for c, _ in passthrough_clashes(user, managed_passthrough)}
    names = {c.name for c in managed} | {c.env for c in managed}
    kept = []
    for credential in user:
        if allowed is not None and not all(allowed.covers(p) for p in credential.hosts):
            report(credential.key, f"credential {credential.name!r} binds hosts outside the "
                                   "managed credential_hosts")
        elif credential.name in names or credential.env in names:
            report(credential.key, f"credential {credential.name!r} reuses the name or "
                                   "variable of a managed credential")
        elif id(credential) in clashing:
            report(credential.key, f"credential {credential.name!r} binds hosts the managed "
                                   "passthrough keeps untouched")
        else:
            kept.append(credential)
    return kept


class Credentials:
    """All layers' credentials, with a bounded per-host cache of which are bound there."""

    __slots__ = ("all", "_hosts", "_cache")

    def __init__(self, credentials: Sequence[Credential] = ()) -> None:
        self.all = tuple(credentials)
        self._hosts = tuple((c.index_of_hosts(), c) for c in self.all)
        self._cache: dict[tuple[str, int], tuple[Credential, ...]] = {}

    def bound(self, host: str, port: int) -> tuple[Credential, ...]:
        """The credentials whose secret may be sent to this destination."""
        key = (host, port)
        found = self._cache.get(key)
        if found is None:
            found = self._bound(host, port)
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[key] = found
        return found

    def _bound(self, raw_host: str, port: int) -> tuple[Credential, ...]:
        try:
            host = normalize_host(raw_host)
        except InvalidHost:
            return ()
        return tuple(credential for index, credential in self._hosts
                     if (index.match_ip(host.ip, port) if host.ip is not None
                         else index.match_name(host.name, port)) is not None)
