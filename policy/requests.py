"""Request rules: which methods and paths a host that is already allowed may be sent.

Only consulted after the domain rules allowed the host: request rules never widen them. Per
layer (managed, then user): a matching `deny` request rule refuses; else the most specific
matching `allow`/`ask` rule (exact host over wildcard, longer path glob over shorter, named
methods over any); else `request_default`, when the layer has allow or ask rules for the host
(deny rules alone refuse only what they match). The strictest layer's verdict stands, so a user file
can add restrictions and never lift one. `read_only` hosts refuse every method but GET, HEAD
and OPTIONS, whatever the request rules say.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import NamedTuple

from .engine import Action, Decision, Reason, Rule, RuleIndex
from .errors import InvalidHost
from .hosts import IPAddress, normalize_host
from .paths import InvalidPath, PathGlob, canonical_path, deny_forms, display_path
from .patterns import Kind, Pattern

READ_ONLY_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_STRICTNESS = {Action.ALLOW: 0, Action.ASK: 1, Action.DENY: 2}
_CACHE_LIMIT = 65536


class RequestRule(NamedTuple):
    """One [[network.requests]] table (or a `read_only` entry), compiled."""

    host: Pattern
    methods: frozenset[str] | None  # None: any method
    paths: tuple[PathGlob, ...]  # empty: any path
    action: Action
    source: str
    index: int
    layer: str = "user"
    list_name: str = "requests"

    @property
    def key(self) -> str:
        return f"network.{self.list_name}[{self.index}]"

    @property
    def text(self) -> str:
        if self.list_name == "read_only":
            return f"read_only {self.host.text}"
        methods = ",".join(sorted(self.methods)) if self.methods else "any method"
        paths = " ".join(glob.text for glob in self.paths) or "any path"
        return f"{self.action.value} {methods} {self.host.text} {paths}"

    @property
    def origin(self) -> str:
        return f"{self.source} ({self.layer}): {self.key}"

    @property
    def short_origin(self) -> str:
        return f"{PurePath(self.source).name} ({self.layer}): {self.key}"

    def matches(self, method: str, path: str) -> bool:
        """Whether an allow or ask rule covers this method and canonical path."""
        if self.methods is not None and method not in self.methods:
            return False
        return not self.paths or any(glob.matches(path) for glob in self.paths)

    def refuses(self, method: str, forms: tuple[str, ...]) -> bool:
        """Whether a deny rule covers this method and any spelling of the path (deny_forms),
        in any case: a refusal also covers the spellings other servers treat as the same."""
        if self.methods is not None and method not in self.methods:
            return False
        return not self.paths or any(glob.matches(form, any_case=True)
                                     for glob in self.paths for form in forms)

    def path_matches(self, path: str) -> bool:
        return not self.paths or any(g.matches(path) for g in self.paths)

    @property
    def rank(self) -> tuple[int, int, int, int]:
        """Most specific first: exact host, longer host, longer path glob, named methods."""
        exact = self.host.kind in (Kind.EXACT, Kind.NETWORK)
        longest_path = max((len(glob.text) for glob in self.paths), default=0)
        return (-exact, -len(self.host.key), -longest_path, -(self.methods is not None))


@dataclass(frozen=True)
class RequestLayer:
    """One policy file's request rules, `read_only` and `passthrough` entries."""

    name: str
    rules: tuple[RequestRule, ...] = ()
    read_only: tuple[RequestRule, ...] = ()
    passthrough: tuple[Rule, ...] = ()

    _hosts: tuple[tuple[RuleIndex, RequestRule], ...] = field(init=False, repr=False)
    _passthrough: RuleIndex = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # Each host pattern filed like a domain rule: finding a host's request rules is one
        # O(labels) walk per rule, once per host (RequestPolicy caches the answer).
        object.__setattr__(self, "_hosts", tuple(
            (RuleIndex.build([Rule(r.host, Action.ALLOW, r.source, r.index, r.layer)]), r)
            for r in self.rules + self.read_only))
        object.__setattr__(self, "_passthrough", RuleIndex.build(self.passthrough))

    def covering(self, host: str, ip: IPAddress | None, port: int) -> tuple[RequestRule, ...]:
        """The request rules and read_only entries whose host pattern covers this host."""
        found = []
        for index, rule in self._hosts:
            hit = index.match_ip(ip, port) if ip is not None else index.match_name(host, port)
            if hit is not None:
                found.append(rule)
        return tuple(found)

    def passes_through(self, host: str, ip: IPAddress | None, port: int) -> Rule | None:
        index = self._passthrough
        return index.match_ip(ip, port) if ip is not None else index.match_name(host, port)


class _LayerRules(NamedTuple):
    """One layer's rules for one host, sorted once (per host, cached) for the per-request
    walk: its read_only entry, its deny rules, its allow/ask rules most specific first."""

    name: str
    read_only: RequestRule | None
    denies: tuple[RequestRule, ...]
    choices: tuple[RequestRule, ...]

    @classmethod
    def of(cls, name: str, rules: tuple[RequestRule, ...]) -> _LayerRules:
        requests = [r for r in rules if r.list_name == "requests"]
        return cls(name, next((r for r in rules if r.list_name == "read_only"), None),
                   tuple(r for r in requests if r.action is Action.DENY),
                   tuple(sorted((r for r in requests if r.action is not Action.DENY),
                                key=lambda r: r.rank)))  # stable: file order among equals


class _HostRules(NamedTuple):
    host: str
    per_layer: tuple[_LayerRules, ...]  # the layers with rules for the host
    passthrough: Rule | None  # the passthrough entry that keeps this host out, if any

    @property
    def restricted(self) -> bool:
        return bool(self.per_layer)


class RequestPolicy:
    """The request rules of all layers, with a bounded per-host cache of which apply."""

    __slots__ = ("layers", "default", "_cache")

    def __init__(self, layers: Sequence[RequestLayer], default: Action = Action.DENY) -> None:
        self.layers = tuple(layers)
        self.default = default
        self._cache: dict[tuple[str, int], _HostRules] = {}

    @property
    def configured(self) -> bool:
        return any(layer.rules or layer.read_only for layer in self.layers)

    def host_rules(self, host: str, port: int) -> _HostRules:
        key = (host, port)
        found = self._cache.get(key)
        if found is None:
            found = self._host_rules(host, port)
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[key] = found
        return found

    def _host_rules(self, raw_host: str, port: int) -> _HostRules:
        try:
            normal = normalize_host(raw_host)
        except InvalidHost:
            return _HostRules(raw_host, (), None)
        per_layer, passthrough = [], None
        for layer in self.layers:  # managed first: its passthrough beats user rules
            rules = layer.covering(normal.name, normal.ip, port)
            if rules:
                per_layer.append(_LayerRules.of(layer.name, rules))
            elif passthrough is None and not per_layer:
                passthrough = layer.passes_through(normal.name, normal.ip, port)
                if passthrough is not None:
                    break
        return _HostRules(normal.name, tuple(per_layer), passthrough)

    def intercepts(self, host: str, port: int) -> bool:
        """Whether tunnels to this host are opened to decide their requests."""
        return self.host_rules(host, port).restricted

    def decide(self, host: str, port: int, method: str, target: str) -> Decision:
        """The request-level decision for a host the domain rules allowed."""
        rules = self.host_rules(host, port)
        if not rules.restricted:
            return Decision(Action.ALLOW, Reason.UNRESTRICTED, host, port,
                            detail=f"no request rule covers {host}")
        shown = f"{method} {display_path(target)}"
        try:
            path = canonical_path(target)
        except InvalidPath as exc:
            return Decision(Action.DENY, Reason.INVALID_REQUEST, host, port,
                            detail=f"{shown}: {exc}")
        verdicts = [_layer_verdict(layer, self.default, host, port, method, path, shown)
                    for layer in rules.per_layer]
        return max(verdicts, key=lambda d: _STRICTNESS[d.action])


def _layer_verdict(rules: _LayerRules, default: Action, host: str, port: int, method: str,
                   path: str, shown: str) -> Decision:
    layer, read_only = rules.name, rules.read_only
    if read_only is not None and method not in READ_ONLY_METHODS:
        return Decision(Action.DENY, Reason.READ_ONLY, host, port, read_only,
                        f"{shown}: {host} is read-only, only GET, HEAD and OPTIONS are sent",
                        layer)
    if rules.denies:
        forms = deny_forms(path)
        for rule in rules.denies:
            if rule.refuses(method, forms):
                return Decision(Action.DENY, Reason.REQUEST_DENIED, host, port, rule,
                                f"{shown}: matches the deny request rule", layer)
    rule = next((r for r in rules.choices if r.matches(method, path)), None)
    if rule is not None:  # the first match is the most specific (choices are sorted)
        if rule.action is Action.ASK:
            return Decision(Action.ASK, Reason.NEEDS_APPROVAL, host, port, rule,
                            f"{shown}: needs a person's approval under the request rule", layer)
        return Decision(Action.ALLOW, Reason.REQUEST_RULE, host, port, rule,
                        f"{shown}: matches the request rule", layer)
    if not rules.choices:
        # No allow or ask rule names what is allowed here: deny rules alone refuse only what
        # they match, and read_only only writes.
        if read_only is not None:
            return Decision(Action.ALLOW, Reason.READ_ONLY, host, port, read_only,
                            f"{shown}: a read-only method on a read-only host", layer)
        return Decision(Action.ALLOW, Reason.UNRESTRICTED, host, port,
                        detail=f"{shown}: no deny request rule matches", layer=layer)
    if default is Action.ALLOW:
        return Decision(Action.ALLOW, Reason.REQUEST_RULE, host, port, None,
                        f"{shown}: matches no request rule; request_default is allow", layer)
    on_path = next((r for r in rules.choices if r.path_matches(path)), None)
    reason = Reason.METHOD_NOT_ALLOWED if on_path else Reason.PATH_NOT_ALLOWED
    closest = on_path or rules.choices[0]
    what = (f"{method} is not among the methods the request rules allow for this path"
            if on_path else "no request rule for this host covers this path")
    if default is Action.ASK:
        return Decision(Action.ASK, Reason.NEEDS_APPROVAL, host, port, None,
                        f"{shown}: {what}; request_default asks a person", layer)
    return Decision(Action.DENY, reason, host, port, None,
                    f"{shown}: {what}; request_default is deny (nearest rule: "
                    f"{closest.text!r}, {closest.short_origin})", layer)
