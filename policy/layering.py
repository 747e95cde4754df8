"""Managed policy over user policy: precedence, requirements, and what the user may not set.

The managed layer (admin-owned) can only be tightened by the user layer, never loosened. A user
setting that a requirement forbids is reported (which requirement, which managed file) and left
out; the rest of the user policy still applies.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any, NamedTuple

from .credentials import (
    Credential,
    Credentials,
    bounded_user_credentials,
    compile_credentials,
    passthrough_clashes,
)
from .engine import Action, CompiledPolicy, Layer, Rule, Settings, TelemetryPolicy
from .errors import InvalidPattern, PolicyError, Problem
from .hosts import normalize_host
from .patterns import parse_pattern
from .presets import presets
from .request_layering import bounded_user_layer, compile_request_layer, request_settings
from .requests import RequestLayer, RequestPolicy
from .review_layering import auto_review_policy
from .source import ParsedFile, locate

_STRICTNESS = {"allow": 0, "ask": 1, "deny": 2}


class _Violations:
    def __init__(self, user: ParsedFile, managed: ParsedFile | None) -> None:
        self.user = user
        self.managed = managed
        self.messages: list[str] = []

    def add(self, key: str, message: str, requirement: str | None = None) -> None:
        line = locate(self.user.text, tuple(key.split("."))) if self.user.text else None
        where = f" (requirement {requirement} in {self.managed.source})" if (
            requirement and self.managed) else (
            f" (set by {self.managed.source})" if self.managed else "")
        self.messages.append(Problem(f"{message}{where}; not applied", key=key, line=line)
                             .render(self.user.source))


def _rules(parsed: ParsedFile, layer: str, action: Action, problems: list[Problem],
           list_name: str = "") -> list[Rule]:
    network = parsed.model.network
    key = list_name or action.value
    patterns = getattr(network, key)
    rules: list[Rule] = []
    for index, text in enumerate(patterns):
        try:
            parsed_pattern = parse_pattern(text, allow_any=action is Action.ALLOW)
        except InvalidPattern as exc:
            line = locate(parsed.text, ("network", key, index), text)
            problems.append(Problem(str(exc), key=f"network.{key}[{index}]", line=line))
            continue
        rules.append(Rule(parsed_pattern, action, parsed.source, index, layer, list_name))
    if action is Action.ALLOW and not list_name:
        for name in parsed.model.presets:
            for index, text in enumerate(presets()[name].allow):
                rules.append(Rule(parse_pattern(text), action, f"preset {name!r} via "
                                  f"{parsed.source}", index, layer))
    return rules


class _CompiledRules(NamedTuple):  # the first four are Layer.build's rule lists
    allow: list[Rule]
    deny: list[Rule]
    raw_tcp: list[Rule]
    no_upstream: list[Rule]
    requests: RequestLayer
    credentials: list[Credential]


def _compile_layer(parsed: ParsedFile, name: str) -> _CompiledRules:
    problems: list[Problem] = []
    allow = _rules(parsed, name, Action.ALLOW, problems)
    deny = _rules(parsed, name, Action.DENY, problems)
    raw_tcp = _rules(parsed, name, Action.ALLOW, problems, "raw_tcp")
    no_upstream = _rules(parsed, name, Action.ALLOW, problems, "no_upstream")
    requests = compile_request_layer(parsed, name, problems)
    credentials = compile_credentials(parsed, name, problems)
    for credential, entry in passthrough_clashes(credentials, requests.passthrough):
        problems.append(Problem(
            f"passthrough {entry.text!r} and credential {credential.name!r} name the same "
            "hosts: a credential's hosts are intercepted to add it; remove one of them",
            key=entry.key, line=locate(parsed.text, ("network", "passthrough", entry.index),
                                       entry.text)))
    if problems:
        raise PolicyError(parsed.source, sorted(problems, key=lambda p: p.line or 0))
    return _CompiledRules(allow, deny, raw_tcp, no_upstream, requests, credentials)


def compile_layers(user: ParsedFile, managed: ParsedFile | None,
                   resolve: Mapping[str, Any]) -> CompiledPolicy:
    """One CompiledPolicy from the user layer and, when present, the managed layer above it."""
    violations = _Violations(user, managed)
    if user.model.requirements is not None:
        violations.add("requirements", "only the managed policy may set [requirements]")
    user_rules = _compile_layer(user, "user")
    user_allow, user_raw_tcp = user_rules.allow, user_rules.raw_tcp
    request_layers = [user_rules.requests]
    credentials = user_rules.credentials
    layers: list[Layer] = []
    if managed is not None:
        managed_rules = _compile_layer(managed, "managed")
        managed_layer = Layer.build("managed", managed.source, *managed_rules[:4])
        layers.append(managed_layer)
        user_allow = _bounded_user_rules(user_allow, managed, managed_layer, violations)
        user_raw_tcp = _bounded_user_rules(user_raw_tcp, managed, managed_layer, violations)
        request_layers = [managed_rules.requests, bounded_user_layer(
            user_rules.requests, managed_rules.requests, violations.add)]
        credentials = managed_rules.credentials + bounded_user_credentials(
            user_rules.credentials, managed_rules.credentials,
            managed.model.requirements.credential_hosts if managed.model.requirements else None,
            managed_rules.requests.passthrough, violations.add)
    settings = _effective_settings(user, managed, resolve, violations)
    settings = replace(settings, **request_settings(user, managed, violations.add),
                       auto_review=auto_review_policy(user, managed, violations.add,
                                                      settings.approval_scopes))
    layers.append(Layer.build("user", user.source, user_allow, user_rules.deny, user_raw_tcp,
                              user_rules.no_upstream))
    return CompiledPolicy(layers, settings, violations.messages, _shadowed_allows(layers),
                          RequestPolicy(request_layers, settings.request_default),
                          Credentials(credentials))


def _shadowed_allows(layers: list[Layer]) -> list[str]:
    """Allow rules a deny rule fully covers: they never apply (deny wins), say so."""
    warnings = []
    for layer in layers:
        for rule in layer.allow_rules:
            if any(other.deny.covers(rule.pattern) for other in layers):
                warnings.append(f"{rule.origin}: allow rule {rule.text!r} is also denied by a "
                                "deny rule, and deny wins: it never applies")
    return warnings


def _bounded_user_rules(rules: list[Rule], managed: ParsedFile, managed_layer: Layer,
                        violations: _Violations) -> list[Rule]:
    """The user's widening rules that stay inside what the managed layer permits.

    A user rule naming a port is bounded by the managed `network.ports` (when the managed file
    sets them) and by `requirements.allowed_ports`: otherwise `evil.example:22` in a user file
    would open a port the administrator closed.
    """
    requirements = managed.model.requirements
    managed_ports = (set(managed.model.network.ports)
                     if managed.explicitly_set("network", "ports") else None)
    kept = []
    for rule in rules:
        port = rule.pattern.port
        what = f"{rule.list_name or rule.action.value} rule {rule.text!r}"
        if requirements is not None and not requirements.allowlist_expansion and (
                not managed_layer.allow.covers(rule.pattern)):
            violations.add(rule.key, f"{what} reaches beyond the managed "
                                     "allowlist", "allowlist_expansion = false")
        elif port is not None and managed_ports is not None and port not in managed_ports:
            violations.add(rule.key, f"{what} names port {port}, which is not "
                                     "in the managed network.ports")
        elif port is not None and requirements is not None and (
                requirements.allowed_ports is not None
                and port not in requirements.allowed_ports):
            violations.add(rule.key, f"{what} names port {port}", "allowed_ports")
        else:
            kept.append(rule)
    return kept


def _effective_settings(user: ParsedFile, managed: ParsedFile | None,
                        resolve: Mapping[str, Any], violations: _Violations) -> Settings:
    net = user.model.network
    identity = {**user.model.identity, **(managed.model.identity if managed else {})}
    identity_table = tuple(sorted(identity.items(), key=lambda item: -item[0].prefixlen))
    if managed is None:
        return Settings(
            identity=identity_table,
            default=Action(net.default), ports=frozenset(net.ports),
            allow_ip_literals=net.allow_ip_literals, block_private=net.block_private,
            allow_ech=net.allow_ech, allowed_cidrs=tuple(net.allowed_cidrs),
            resolve={**_file_resolve(user), **resolve},
            approval_timeout=user.model.approvals.timeout, mode=user.model.mode,
            telemetry=_telemetry(user, None), **_limits(user, None, violations),
        )
    m_net = managed.model.network
    req = managed.model.requirements

    def managed_sets(key: str) -> bool:
        return managed.explicitly_set("network", key)

    # The managed default binds whether written or not (its default is "ask"): a user file
    # that says "allow" would otherwise open every host the managed file did not list.
    default = net.default
    if _STRICTNESS[default] < _STRICTNESS[m_net.default]:
        violations.add("network.default", f"default {default!r} is looser than the managed "
                                          f"default {m_net.default!r}")
        default = m_net.default
    elif not user.explicitly_set("network", "default"):
        default = m_net.default
    if req and req.default_floor and _STRICTNESS[default] < _STRICTNESS[req.default_floor]:
        violations.add("network.default", f"default {default!r} is looser than "
                                          f"{req.default_floor!r}", "default_floor")
        default = req.default_floor

    ports = set(net.ports)
    if managed_sets("ports"):
        ports = ports & set(m_net.ports) if user.explicitly_set("network", "ports") else set(
            m_net.ports)
        if extra := sorted(set(net.ports) - set(m_net.ports)):
            violations.add("network.ports", f"ports {extra} are not in the managed ports")
    if req and req.allowed_ports is not None:
        if extra := sorted(ports - set(req.allowed_ports)):
            violations.add("network.ports", f"ports {extra} are not allowed", "allowed_ports")
        ports &= set(req.allowed_ports)

    # The managed file's security defaults bind whether it writes them or not: a managed
    # policy that says nothing about IP literals or private upstreams keeps both refused.
    allow_ip_literals = net.allow_ip_literals
    if allow_ip_literals and not m_net.allow_ip_literals:
        violations.add("network.allow_ip_literals", "IP literals are not allowed")
        allow_ip_literals = False

    allow_ech = net.allow_ech
    if allow_ech and not m_net.allow_ech:
        violations.add("network.allow_ech", "encrypted ClientHellos are not allowed")
        allow_ech = False

    block_private = net.block_private or m_net.block_private
    if not net.block_private and block_private:
        violations.add("network.block_private", "private upstreams stay blocked")
    cidrs = list(m_net.allowed_cidrs)
    for index, network in enumerate(net.allowed_cidrs):
        if m_net.block_private and not any(
                network.version == m.version and network.subnet_of(m)  # type: ignore[arg-type]
                for m in m_net.allowed_cidrs):
            violations.add(f"network.allowed_cidrs[{index}]",
                           f"{network} is not among the managed allowed_cidrs")
        else:
            cidrs.append(network)

    if user.model.resolve:
        violations.add("resolve", "with a managed policy, DNS overrides come only from the "
                                  "managed file and serve --resolve")

    # Enforcing binds whether written or not: audit mode (traffic flows, only logged) is the
    # managed file's to allow, by `mode = "audit"` or `allowed_modes`.
    mode = user.model.mode if user.explicitly_set("", "mode") else managed.model.mode
    if req and req.allowed_modes is not None:
        if mode not in req.allowed_modes:
            violations.add("mode", f"mode {mode!r} is not allowed", "allowed_modes")
            mode = "enforce" if "enforce" in req.allowed_modes else req.allowed_modes[0]
    elif mode == "audit" and managed.model.mode != "audit":
        violations.add("mode", "audit mode is not allowed here")
        mode = "enforce"

    timeout = user.model.approvals.timeout
    if managed.explicitly_set("approvals", "timeout"):
        timeout = managed.model.approvals.timeout

    return Settings(
        identity=identity_table,
        default=Action(default), ports=frozenset(ports), allow_ip_literals=allow_ip_literals,
        allow_ech=allow_ech,
        block_private=block_private, allowed_cidrs=tuple(cidrs),
        resolve={**_file_resolve(managed), **resolve}, approval_timeout=timeout, mode=mode,
        approval_scopes=frozenset(req.allowed_approval_scopes) if req and (
            req.allowed_approval_scopes is not None) else Settings.approval_scopes,
        managed_allowed_domains_only=bool(req and req.managed_allowed_domains_only),
        telemetry_required=bool(req and req.telemetry_required),
        protected_file=bool(req and req.protected_file),
        telemetry=_telemetry(user, managed), **_limits(user, managed, violations),
    )


def _telemetry(user: ParsedFile, managed: ParsedFile | None) -> TelemetryPolicy:
    """[telemetry] from both files: a key either file writes, the managed file's first; the
    header and resource-attribute tables merged, managed entries over user ones."""
    tables = [f.model.telemetry for f in (managed, user) if f is not None]

    def pick(key: str) -> Any:
        return next((getattr(t, key) for t in tables if key in t.model_fields_set), None)

    headers: dict[str, str] = {}
    attributes: dict[str, str] = {}
    for table in reversed(tables):
        headers.update(table.headers)
        attributes.update(table.resource_attributes)
    return TelemetryPolicy(
        enabled=pick("enabled"), endpoint=pick("endpoint"), protocol=pick("protocol"),
        headers=headers, resource_attributes=attributes)


_LIMITS = (("network", "header_timeout"), ("network", "max_connections_per_client"),
           ("approvals", "max_pending"), ("approvals", "max_pending_per_agent"))


def _limits(user: ParsedFile, managed: ParsedFile | None,
            violations: _Violations) -> dict[str, Any]:
    """Resource limits: the managed value (written or default) is a ceiling the user may only
    lower, so a user file cannot lift the flood and connection bounds."""
    limits = {}
    for table, key in _LIMITS:
        value = getattr(getattr(user.model, table), key)
        if managed is not None:
            ceiling = getattr(getattr(managed.model, table), key)
            if value > ceiling:
                violations.add(f"{table}.{key}", f"{key} {value:g} is above the managed "
                                                 f"limit {ceiling:g}")
                value = ceiling
        limits[key] = value
    return limits


def _file_resolve(parsed: ParsedFile) -> dict[str, Any]:
    return {normalize_host(host).name: address for host, address in parsed.model.resolve.items()}
