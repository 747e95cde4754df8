"""The compiled policy: immutable indexes built once, an O(labels) decision per host.

Domain rules are filed by the suffix they hang from (``exact`` by host, ``subtree`` by the
parent suffix, ``glob`` by the labels after the last wildcard), so a lookup walks the host's
suffixes once, longest first, and the first hit is also the most specific rule.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import PurePath
from types import MappingProxyType
from typing import Any, NamedTuple, Protocol

from .addresses import embedded_ipv4, in_networks, non_public_reason
from .errors import InvalidHost
from .hosts import MAX_HOST_TEXT, Host, IPAddress, normalize_host
from .model import SCOPES
from .patterns import Kind, Pattern

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Action(StrEnum):
    ALLOW = "allow"
    DENY = "deny"
    ASK = "ask"


DEFAULT_PORTS = frozenset({80, 443})


class Reason(StrEnum):
    """Machine-readable reason codes; the event schema documents each."""

    ALLOWLIST = "allowlist"
    DENYLIST = "denylist"
    DEFAULT = "default"
    NOT_ALLOWLISTED = "not_allowlisted"
    NEEDS_APPROVAL = "needs_approval"
    PORT_NOT_ALLOWED = "port_not_allowed"
    IP_LITERAL = "ip_literal"
    INVALID_HOST = "invalid_host"
    INVALID_REQUEST = "invalid_request"  # malformed, or not valid where it was sent
    PRIVATE_ADDRESS = "private_address"
    DNS_ERROR = "dns_error"
    SNI_MISMATCH = "sni_mismatch"
    HOST_MISMATCH = "host_mismatch"
    APPROVED = "approved"
    DENIED_BY_APPROVER = "denied_by_approver"
    APPROVAL_TIMEOUT = "approval_timeout"
    APPROVAL_QUEUE_FULL = "approval_queue_full"
    APPROVAL_UNAVAILABLE = "approval_unavailable"  # a fleet's shared approval state is down
    TUNNEL_PROTOCOL = "tunnel_protocol"  # bytes in a tunnel that are not what the rule allows
    PROXY_PROTOCOL = "proxy_protocol"  # something other than HTTP/1 spoken to the proxy port
    INVALID_AGENT = "invalid_agent"
    REQUEST_HEAD_TOO_LARGE = "request_head_too_large"
    HEADER_TIMEOUT = "header_timeout"
    TOO_MANY_CONNECTIONS = "too_many_connections"
    INTERNAL_ERROR = "internal_error"  # a fault in the proxy: refused, never let through
    UPSTREAM_TLS_ERROR = "upstream_tls_error"  # an intercepted origin's TLS did not verify
    # Request rules (policy.requests), on hosts the domain rules allowed:
    REQUEST_RULE = "request_rule"  # a request rule (or request_default = "allow") allowed it
    REQUEST_DENIED = "request_denied"  # a deny request rule matched
    METHOD_NOT_ALLOWED = "method_not_allowed"  # rules cover the path, not with this method
    PATH_NOT_ALLOWED = "path_not_allowed"  # no request rule for the host covers the path
    READ_ONLY = "read_only"  # a read_only host: only GET, HEAD, OPTIONS
    UNRESTRICTED = "unrestricted"  # no request rule covers the host: its domain rule decides
    # Credentials (policy.credentials): a placeholder where its secret may not go.
    CREDENTIAL_MISDIRECTED = "credential_misdirected"
    CREDENTIAL_UNAVAILABLE = "credential_unavailable"  # bound, but its secret cannot be read
    # serve --managed-url: no verified managed policy yet, so nothing is let through.
    MANAGED_POLICY_UNAVAILABLE = "managed_policy_unavailable"


class Rule(NamedTuple):
    """A pattern as the user wrote it, with where it came from."""

    pattern: Pattern
    action: Action
    source: str  # file the rule is in, or "preset NAME via FILE"
    index: int  # position in its list
    layer: str = "user"  # "managed" or "user"
    list_name: str = ""  # the policy key it is listed under, when not network.allow/deny

    @property
    def key(self) -> str:
        return f"network.{self.list_name or self.action.value}[{self.index}]"

    @property
    def text(self) -> str:
        return self.pattern.text

    @property
    def origin(self) -> str:
        if self.source.startswith("preset "):
            return f"{self.source} ({self.layer})"
        return f"{self.source} ({self.layer}): {self.key}"

    @property
    def short_origin(self) -> str:
        """The origin with file names instead of paths: what the agent's 403 may show."""
        if self.source.startswith("preset "):
            name, _, via = self.source.partition(" via ")
            return f"{name} via {PurePath(via).name} ({self.layer})"
        return f"{PurePath(self.source).name} ({self.layer}): {self.key}"


class RuleLike(Protocol):
    """What a decision needs of its rule: a domain Rule or a request rule (policy.requests)."""

    @property
    def action(self) -> Action: ...
    @property
    def text(self) -> str: ...
    @property
    def key(self) -> str: ...
    @property
    def layer(self) -> str: ...
    @property
    def origin(self) -> str: ...
    @property
    def short_origin(self) -> str: ...


class Decision(NamedTuple):
    action: Action
    reason: Reason
    host: str
    port: int
    rule: RuleLike | None = None
    detail: str = ""
    layer: str = ""  # which policy layer decided: "managed", "user", or "" (default, checks)

    @property
    def allowed(self) -> bool:
        return self.action is Action.ALLOW

    @property
    def explanation(self) -> str:
        """One sentence on why, for people: `policy explain`, the logs."""
        return self.explain()

    def explain(self, *, file_names_only: bool = False) -> str:
        """Why, in one sentence; ``file_names_only`` for the agent's 403, which must not
        disclose the machine's paths (the audit event keeps them)."""
        rule = self.rule
        origin = "" if rule is None else (rule.short_origin if file_names_only else rule.origin)
        match self.reason:
            case Reason.ALLOWLIST if rule:
                return f"matches the allow rule {rule.text!r} ({origin})"
            case Reason.DENYLIST if rule:
                return f"matches the deny rule {rule.text!r} ({origin})"
            case Reason.DEFAULT:
                return "matches no rule; the policy's default is allow"
            case Reason.NOT_ALLOWLISTED:
                return "not on the allowlist (the policy's default is deny)"
            case (Reason.REQUEST_RULE | Reason.REQUEST_DENIED | Reason.READ_ONLY
                  | Reason.NEEDS_APPROVAL) if self.detail:
                return f"{self.detail} {rule.text!r} ({origin})" if rule else self.detail
            case Reason.NEEDS_APPROVAL:
                return "not on the allowlist; needs a person's approval"
            case Reason.APPROVED | Reason.DENIED_BY_APPROVER:
                return self.detail
            case Reason.APPROVAL_TIMEOUT:
                return (f"not on the allowlist, and nobody approved it in time; {self.detail}")
            case _:
                return self.detail or self.reason.value


_Entries = tuple[Rule, ...]


def _first_for_port(rules: _Entries | None, port: int) -> Rule | None:
    if rules:
        for rule in rules:
            if rule.pattern.port is None or rule.pattern.port == port:
                return rule
    return None


def _first_glob(rules: _Entries | None, host: str, port: int) -> Rule | None:
    if rules:
        for rule in rules:
            pattern = rule.pattern
            if (pattern.port is None or pattern.port == port) and pattern.glob_matches(host):
                return rule
    return None


@dataclass(frozen=True, slots=True)
class RuleIndex:
    """All rules of one action, filed for suffix lookup."""

    exact: Mapping[str, _Entries]
    subtree: Mapping[str, _Entries]
    glob: Mapping[str, _Entries]
    any_host: _Entries
    # IP version -> ((prefix length, network as int -> rules), ...), longest prefix first
    networks: Mapping[int, tuple[tuple[int, Mapping[int, _Entries]], ...]]

    @classmethod
    def build(cls, rules: Iterable[Rule]) -> RuleIndex:
        exact: dict[str, _Entries] = {}
        subtree: dict[str, _Entries] = {}
        glob: dict[str, _Entries] = {}
        any_host: _Entries = ()
        networks: dict[int, dict[int, dict[int, _Entries]]] = {}
        for rule in rules:
            p = rule.pattern
            kind = p.kind
            if kind is Kind.EXACT:
                exact[p.key] = exact.get(p.key, ()) + (rule,)
            elif kind is Kind.SUBTREE:
                subtree[p.key] = subtree.get(p.key, ()) + (rule,)
            elif kind is Kind.SUBTREE_AND_SELF:
                exact[p.key] = exact.get(p.key, ()) + (rule,)
                subtree[p.key] = subtree.get(p.key, ()) + (rule,)
            elif kind is Kind.GLOB:
                glob[p.key] = glob.get(p.key, ()) + (rule,)
            elif kind is Kind.ANY:
                any_host += (rule,)
            else:
                assert p.network is not None
                table = networks.setdefault(p.network.version, {}).setdefault(
                    p.network.prefixlen, {})
                address = int(p.network.network_address)
                table[address] = table.get(address, ()) + (rule,)
        frozen_networks = MappingProxyType({
            version: tuple((prefix, MappingProxyType(table))
                           for prefix, table in sorted(by_prefix.items(), reverse=True))
            for version, by_prefix in networks.items()
        })
        # Plain dicts on the hot path (a mappingproxy lookup costs a third more); the index
        # is never handed out for mutation.
        return cls(exact, subtree, glob, any_host, frozen_networks)

    def match_name(self, host: str, port: int) -> Rule | None:
        """Most specific rule for a normalised domain name, or None."""
        if rule := _first_for_port(self.exact.get(host), port):
            return rule
        dot = host.find(".")
        while dot != -1:
            suffix = host[dot + 1 :]
            if rule := _first_for_port(self.subtree.get(suffix), port):
                return rule
            if self.glob and (rule := _first_glob(self.glob.get(suffix), host, port)):
                return rule
            dot = host.find(".", dot + 1)
        if self.glob and (rule := _first_glob(self.glob.get(""), host, port)):
            return rule
        return _first_for_port(self.any_host, port)

    def covers(self, pattern: Pattern) -> bool:
        """Whether every destination ``pattern`` matches is matched by a rule here.

        Used for ``allowlist_expansion = false``: a user allow rule must stay inside the
        managed allowlist. Port 0 asks for a rule valid on every port.
        """
        port = pattern.port or 0
        kind = pattern.kind
        if kind is Kind.NETWORK:
            assert pattern.network is not None
            return any(
                _first_for_port(rules, port) is not None
                and ipaddress.ip_network((address, prefix)).supernet_of(pattern.network)
                for prefix, table in self.networks.get(pattern.network.version, ())
                if prefix <= pattern.network.prefixlen
                for address, rules in table.items()
            )
        if _first_for_port(self.any_host, port):
            return True
        if kind is Kind.EXACT:
            return self.match_name(pattern.key, port) is not None
        if kind is Kind.ANY:
            return False
        subtree_covered = self._subtree_covered(pattern.key, port) if pattern.key else False
        if kind is Kind.SUBTREE_AND_SELF:
            return subtree_covered and self.match_name(pattern.key, port) is not None
        return subtree_covered  # SUBTREE, and GLOB (its hosts lie below its fixed suffix)

    def _subtree_covered(self, suffix: str, port: int) -> bool:
        """Every strict subdomain of ``suffix`` is covered by one subtree rule."""
        candidate = suffix
        while True:
            if _first_for_port(self.subtree.get(candidate), port):
                return True
            dot = candidate.find(".")
            if dot == -1:
                return False
            candidate = candidate[dot + 1 :]

    def match_ip(self, ip: IPAddress, port: int, *, see_through: bool = False) -> Rule | None:
        """Most specific CIDR rule for an address, IPv4-mapped IPv6 also as its IPv4 form.

        ``see_through`` (deny rules) also matches every other IPv6 form that carries an IPv4
        address (NAT64, SIIT, 6to4...): another route to a denied network is still denied,
        while an allow rule is never widened to another route.
        """
        candidates: list[IPAddress] = [ip]
        if isinstance(ip, ipaddress.IPv6Address):
            if ip.ipv4_mapped is not None:
                candidates.insert(0, ip.ipv4_mapped)
            elif see_through and (embedded := embedded_ipv4(ip)) is not None:
                candidates.insert(0, embedded[1])
        for candidate in candidates:
            bits = candidate.max_prefixlen
            value = int(candidate)
            for prefix, table in self.networks.get(candidate.version, ()):
                shift = bits - prefix
                if rule := _first_for_port(table.get(value >> shift << shift), port):
                    return rule
        return None


@dataclass(frozen=True)
class TelemetryPolicy:
    """What the policy files say about OTLP export, layered (managed keys over user keys);
    unset fields fall back to the OTEL_* environment where the export is set up."""

    enabled: bool | None = None  # None: neither file says (a managed value is final)
    endpoint: str | None = None
    protocol: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    resource_attributes: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class AutoReviewPolicy:
    """[approvals.auto_review] after layering (policy.review_layering)."""

    enabled: bool = False
    max_risk: str = "low"  # "low" | "medium"
    scope: str = "session"  # "once" | "session"
    model_url: str = ""  # empty: the rules reviewer alone
    model: str = ""
    api_key: str = ""  # a secret source: env:VAR, keyring:SERVICE/USER, file:/PATH
    timeout: float = 20.0
    max_denials: int = 3


@dataclass(frozen=True)
class Settings:
    """The effective non-rule settings, after layering."""

    default: Action = Action.ASK
    ports: frozenset[int] = DEFAULT_PORTS
    allow_ip_literals: bool = False
    allow_ech: bool = False
    block_private: bool = True
    allowed_cidrs: tuple[IPNetwork, ...] = ()
    resolve: Mapping[str, IPAddress] = field(default_factory=dict)
    approval_timeout: float = 120.0
    mode: str = "enforce"  # "enforce" | "audit"
    approval_scopes: frozenset[str] = frozenset(SCOPES)
    managed_allowed_domains_only: bool = False
    telemetry_required: bool = False
    protected_file: bool = False  # refuse a user policy file others can change
    telemetry: TelemetryPolicy = field(default_factory=TelemetryPolicy)
    identity: tuple[tuple[IPNetwork, str], ...] = ()  # most specific network first
    header_timeout: float = 30.0  # seconds a client may take to send a request head
    max_connections_per_client: int = 256
    max_pending: int = 100  # held approvals, all agents together
    max_pending_per_agent: int = 20
    explain_https: bool = False  # refused HTTPS answered over TLS with the proxy's CA
    upstream_ca_file: str | None = None  # trust for intercepted origins, instead of the system's
    request_default: Action = Action.DENY  # a request to a restricted host no rule matches
    auto_review: AutoReviewPolicy = field(default_factory=AutoReviewPolicy)

    def agent_for(self, address: IPAddress) -> str | None:
        """The configured agent name for a client address, if any."""
        for network, name in self.identity:
            if in_networks(address, (network,)):
                return name
        return None


class Layer(NamedTuple):
    """One policy file's rules, compiled. ``name`` is "managed" or "user"."""

    name: str
    source: str
    allow: RuleIndex
    deny: RuleIndex
    allow_rules: tuple[Rule, ...]  # as written, in file order: for `policy show`
    deny_rules: tuple[Rule, ...]
    raw_tcp: RuleIndex  # destinations whose tunnels may carry bytes that are neither TLS nor HTTP
    raw_tcp_rules: tuple[Rule, ...] = ()
    no_upstream: RuleIndex | None = None  # reached directly, not through a parent proxy

    @classmethod
    def build(cls, name: str, source: str, allow: Sequence[Rule], deny: Sequence[Rule],
              raw_tcp: Sequence[Rule] = (), no_upstream: Sequence[Rule] = ()) -> Layer:
        return cls(name, source, RuleIndex.build(allow), RuleIndex.build(deny), tuple(allow),
                   tuple(deny), RuleIndex.build(raw_tcp), tuple(raw_tcp),
                   RuleIndex.build(no_upstream) if no_upstream else None)


class RequestRules(Protocol):
    """Request-level rules (policy.requests.RequestPolicy, which builds on this module)."""

    @property
    def configured(self) -> bool: ...
    def intercepts(self, host: str, port: int) -> bool: ...
    def decide(self, host: str, port: int, method: str, target: str) -> Decision: ...


class CredentialBindings(Protocol):
    """Credentials and the hosts they are bound to (policy.credentials.Credentials)."""

    @property
    def all(self) -> tuple[Any, ...]: ...
    def bound(self, host: str, port: int) -> tuple[Any, ...]: ...


_CACHE_LIMIT = 65536
_DEFAULT_REASON = {Action.ALLOW: Reason.DEFAULT, Action.DENY: Reason.NOT_ALLOWLISTED,
                   Action.ASK: Reason.NEEDS_APPROVAL}


class CompiledPolicy:
    """A policy ready to decide: layers in precedence order (managed, then user).

    Precedence: managed deny > user deny > managed allow > user allow > default. Built by the
    loader (policy.layering); never mutated after.
    """

    __slots__ = ("layers", "settings", "problems", "warnings", "requests", "credentials",
                 "closed", "_allow_layers", "_cache")

    def __init__(self, layers: Sequence[Layer], settings: Settings,
                 problems: Sequence[str] = (), warnings: Sequence[str] = (),
                 requests: RequestRules | None = None,
                 credentials: CredentialBindings | None = None) -> None:
        self.requests = requests  # None: no request rules (policy.requests.RequestPolicy)
        self.credentials = credentials  # None: no credentials (policy.credentials)
        self.layers = tuple(layers)
        self.settings = settings
        # Requirement violations that were reported and not applied (errors.Problem).
        self.problems = tuple(problems)
        self.warnings = tuple(warnings)  # valid but probably not meant (a shadowed rule)
        managed_only = settings.managed_allowed_domains_only and len(self.layers) > 1
        self._allow_layers = self.layers[:1] if managed_only else self.layers
        self._cache: dict[tuple[str, int], Decision] = {}
        self.closed = ""  # why every request is refused (refusing_everything), when it is

    def refusing_everything(self, why: str) -> CompiledPolicy:
        """This policy's layers and settings, enforcing, deciding every destination and
        request `managed_policy_unavailable` (``why`` is the detail): a proxy whose managed
        policy must come from a URL and never verified one. No request rules or credentials."""
        closed = CompiledPolicy(self.layers, replace(self.settings, mode="enforce",
                                                     default=Action.DENY),
                                self.problems, self.warnings)
        closed.closed = why
        return closed

    def _closed(self, host: str, port: int) -> Decision:
        return Decision(Action.DENY, Reason.MANAGED_POLICY_UNAVAILABLE, host[:MAX_HOST_TEXT],
                        port, detail=self.closed)

    @property
    def source(self) -> str:
        return self.layers[-1].source

    @property
    def allow_count(self) -> int:
        return sum(len(layer.allow_rules) for layer in self.layers)

    @property
    def deny_count(self) -> int:
        return sum(len(layer.deny_rules) for layer in self.layers)

    def decide(self, host: str, port: int) -> Decision:
        """The decision for a destination as a client named it (any spelling)."""
        if self.closed:
            return self._closed(host, port)
        if len(host) > MAX_HOST_TEXT:  # never a host; not cached under an agent-sized key
            return Decision(Action.DENY, Reason.INVALID_HOST, host[:MAX_HOST_TEXT] + "...",
                            port, detail=f"a host of {len(host)} characters (a name has at "
                                         "most 253)")
        key = (host, port)
        decision = self._cache.get(key)
        if decision is None:
            decision = self._decide(host, port)
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[key] = decision
        return decision

    def _decide(self, raw_host: str, port: int) -> Decision:
        try:
            host = normalize_host(raw_host)
        except InvalidHost as exc:
            return Decision(Action.DENY, Reason.INVALID_HOST, raw_host, port, detail=str(exc))
        if host.ip is not None:
            return self._decide_ip(host, port)
        return self._decide_name(host.name, port)

    def _port_denied(self, host: str, port: int, allow_rule: Rule | None) -> Decision | None:
        if port in self.settings.ports or (allow_rule and allow_rule.pattern.port == port):
            return None
        ports = ", ".join(str(p) for p in sorted(self.settings.ports))
        return Decision(Action.DENY, Reason.PORT_NOT_ALLOWED, host, port,
                        detail=f"port {port} is not in the allowed ports ({ports})")

    def _decide_name(self, host: str, port: int) -> Decision:
        for layer in self.layers:
            if rule := layer.deny.match_name(host, port):
                return Decision(Action.DENY, Reason.DENYLIST, host, port, rule, layer=layer.name)
        allow_rule, allow_layer = None, ""
        for layer in self._allow_layers:
            if rule := layer.allow.match_name(host, port):
                allow_rule, allow_layer = rule, layer.name
                break
        if denied := self._port_denied(host, port, allow_rule):
            return denied
        if allow_rule:
            return Decision(Action.ALLOW, Reason.ALLOWLIST, host, port, allow_rule,
                            layer=allow_layer)
        if self._allow_layers is not self.layers:
            return Decision(Action.DENY, Reason.NOT_ALLOWLISTED, host, port, layer="managed",
                            detail="not on the managed allowlist, and the managed policy allows "
                                   "no other destinations (managed_allowed_domains_only)")
        default = self.settings.default
        return Decision(default, _DEFAULT_REASON[default], host, port)

    def _decide_ip(self, host: Host, port: int) -> Decision:
        assert host.ip is not None
        for layer in self.layers:
            if rule := layer.deny.match_ip(host.ip, port, see_through=True):
                return Decision(Action.DENY, Reason.DENYLIST, host.name, port, rule,
                                layer=layer.name)
        if not self.settings.allow_ip_literals:
            return Decision(Action.DENY, Reason.IP_LITERAL, host.name, port,
                            detail="requests to IP addresses are not allowed (allow_ip_literals)")
        allow_rule, allow_layer = None, ""
        for layer in self._allow_layers:
            if rule := layer.allow.match_ip(host.ip, port):
                allow_rule, allow_layer = rule, layer.name
                break
        if denied := self._port_denied(host.name, port, allow_rule):
            return denied
        if allow_rule:
            return Decision(Action.ALLOW, Reason.ALLOWLIST, host.name, port, allow_rule,
                            layer=allow_layer)
        return Decision(Action.DENY, Reason.IP_LITERAL, host.name, port,
                        detail="no CIDR rule in the allow list covers this address")

    def layer_verdicts(self, host: str, port: int) -> list[tuple[Layer, Rule | None, Rule | None]]:
        """For `policy explain`: each layer's matching deny and allow rule, if any."""
        try:
            normal = normalize_host(host)
        except InvalidHost:
            return [(layer, None, None) for layer in self.layers]
        verdicts = []
        for layer in self.layers:
            if normal.ip is not None:
                verdicts.append((layer, layer.deny.match_ip(normal.ip, port, see_through=True),
                                 layer.allow.match_ip(normal.ip, port)))
            else:
                verdicts.append((layer, layer.deny.match_name(normal.name, port),
                                 layer.allow.match_name(normal.name, port)))
        return verdicts

    def raw_tcp_rule(self, host: str, port: int) -> Rule | None:
        """The rule that lets a tunnel to this destination carry raw TCP: the allow rule, when
        it names the port (`github.com:22`), else a `network.raw_tcp` rule.

        Only consulted for a tunnel the domain rules already allowed: it never widens them.
        """
        try:
            normal = normalize_host(host)
        except InvalidHost:
            return None
        decided = self.decide(host, port)
        if (decided.action is Action.ALLOW and decided.rule is not None
                and decided.rule.pattern.port == port):
            return decided.rule
        for layer in self._allow_layers:
            index = layer.raw_tcp
            rule = (index.match_ip(normal.ip, port) if normal.ip is not None
                    else index.match_name(normal.name, port))
            if rule is not None:
                return rule
        return None

    def goes_direct(self, host: str, port: int) -> bool:
        """Whether `network.no_upstream` (in either file) sends this destination straight to
        the origin rather than through the parent proxy (`serve --upstream-proxy`)."""
        try:
            normal = normalize_host(host)
        except InvalidHost:
            return False
        for layer in self.layers:
            index = layer.no_upstream
            if index is not None and (index.match_ip(normal.ip, port) if normal.ip is not None
                                      else index.match_name(normal.name, port)) is not None:
                return True
        return False

    @property
    def interception_configured(self) -> bool:
        """Whether any host's TLS is opened: request rules, read_only, explain_https."""
        configured = self.requests is not None and self.requests.configured
        bound = self.credentials is not None and bool(self.credentials.all)
        return configured or bound or self.settings.explain_https

    def intercepts(self, host: str, port: int) -> bool:
        """Whether a tunnel to this (allowed) host is intercepted: to decide its requests, or
        to add a credential bound to it."""
        if self.requests is not None and self.requests.intercepts(host, port):
            return True
        return self.credentials is not None and bool(self.credentials.bound(host, port))

    def restricts(self, host: str, port: int) -> bool:
        """Whether request rules (or read_only) decide the requests to this host."""
        return self.requests is not None and self.requests.intercepts(host, port)

    def decide_request(self, host: str, port: int, method: str, target: str) -> Decision:
        """Method and path on a host the domain rules allowed (policy.requests)."""
        if self.closed:
            return self._closed(host, port)
        if self.requests is None:
            return Decision(Action.ALLOW, Reason.UNRESTRICTED, host, port,
                            detail=f"no request rule covers {host}")
        return self.requests.decide(host, port, method, target)

    def resolve_override(self, host: str) -> IPAddress | None:
        """The static address configured for a (normalised) host, if any."""
        return self.settings.resolve.get(host)

    def address_denial(self, host: str, port: int,
                       addresses: Sequence[IPAddress]) -> Decision | None:
        """A deny rule for a network one of these addresses (a name's DNS answer) lies in.

        Deny rules for networks apply to where a name leads, not only to IP literals: a
        wildcard-DNS name (nip.io style) must not reach a denied network by another spelling.
        """
        for layer in self.layers:
            for address in addresses:
                if rule := layer.deny.match_ip(address, port, see_through=True):
                    return Decision(Action.DENY, Reason.DENYLIST, host, port, rule,
                                    f"{host} resolves to {address}, which the deny rule "
                                    f"{rule.text!r} covers", layer.name)
        return None

    def address_refusal(self, addresses: Sequence[IPAddress]) -> str | None:
        """Why an upstream resolving to these addresses must be refused, or None."""
        if not self.settings.block_private:
            return None
        for address in addresses:
            reason = non_public_reason(address)
            if reason and not in_networks(address, self.settings.allowed_cidrs):
                return f"{address}, which is {reason}"
        return None
