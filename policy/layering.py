"""Managed policy over user policy: precedence, requirements, and what the user may not set.

The managed layer (admin-owned) can only be tightened by the user layer, never loosened. A user
setting that a requirement forbids is reported (which requirement, which managed file) and left
out; the rest of the user policy still applies.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from .engine import Action, CompiledPolicy, Layer, Rule, Settings
from .errors import InvalidPattern, PolicyError, Problem
from .model import PolicyFile
from .patterns import parse_pattern
from .presets import presets

_STRICTNESS = {"allow": 0, "ask": 1, "deny": 2}


class ParsedFile(NamedTuple):
    """A policy file that validated: its model, where it came from, and its text."""

    model: PolicyFile
    source: str
    text: str

    def explicitly_set(self, table: str, key: str) -> bool:
        section = getattr(self.model, table) if table else self.model
        return key in section.model_fields_set


class _Violations:
    def __init__(self, user: ParsedFile, managed: ParsedFile | None) -> None:
        self.user = user
        self.managed = managed
        self.messages: list[str] = []

    def add(self, key: str, message: str, requirement: str | None = None) -> None:
        from .loader import locate

        line = locate(self.user.text, tuple(key.split("."))) if self.user.text else None
        where = f" (requirement {requirement} in {self.managed.source})" if (
            requirement and self.managed) else (
            f" (set by {self.managed.source})" if self.managed else "")
        self.messages.append(Problem(f"{message}{where}; not applied", key=key, line=line)
                             .render(self.user.source))


def _rules(parsed: ParsedFile, layer: str, action: Action,
           problems: list[Problem]) -> list[Rule]:
    from .loader import locate

    network = parsed.model.network
    patterns = network.allow if action is Action.ALLOW else network.deny
    rules: list[Rule] = []
    for index, text in enumerate(patterns):
        try:
            parsed_pattern = parse_pattern(text, allow_any=action is Action.ALLOW)
        except InvalidPattern as exc:
            line = locate(parsed.text, ("network", action.value, index), text)
            problems.append(Problem(str(exc), key=f"network.{action.value}[{index}]", line=line))
            continue
        rules.append(Rule(parsed_pattern, action, parsed.source, index, layer))
    if action is Action.ALLOW:
        for name in parsed.model.presets:
            for index, text in enumerate(presets()[name].allow):
                rules.append(Rule(parse_pattern(text), action, f"preset {name!r} via "
                                  f"{parsed.source}", index, layer))
    return rules


def _compile_layer(parsed: ParsedFile, name: str) -> tuple[list[Rule], list[Rule]]:
    problems: list[Problem] = []
    allow = _rules(parsed, name, Action.ALLOW, problems)
    deny = _rules(parsed, name, Action.DENY, problems)
    if problems:
        raise PolicyError(parsed.source, problems)
    return allow, deny


def compile_layers(user: ParsedFile, managed: ParsedFile | None,
                   resolve: Mapping[str, Any]) -> CompiledPolicy:
    """One CompiledPolicy from the user layer and, when present, the managed layer above it."""
    violations = _Violations(user, managed)
    requirements = managed.model.requirements if managed else None
    if user.model.requirements is not None:
        violations.add("requirements", "only the managed policy may set [requirements]")
    user_allow, user_deny = _compile_layer(user, "user")
    layers: list[Layer] = []
    if managed is not None:
        managed_allow, managed_deny = _compile_layer(managed, "managed")
        managed_layer = Layer.build("managed", managed.source, managed_allow, managed_deny)
        layers.append(managed_layer)
        if requirements is not None and not requirements.allowlist_expansion:
            kept = []
            for rule in user_allow:
                if managed_layer.allow.covers(rule.pattern):
                    kept.append(rule)
                else:
                    violations.add(f"network.allow[{rule.index}]",
                                   f"allow rule {rule.text!r} reaches beyond the managed "
                                   "allowlist", "allowlist_expansion = false")
            user_allow = kept
    settings = _effective_settings(user, managed, resolve, violations)
    if requirements is not None and requirements.allowed_ports is not None:
        allowed_ports = set(requirements.allowed_ports)
        kept = []
        for rule in user_allow:
            if rule.pattern.port is not None and rule.pattern.port not in allowed_ports:
                violations.add(f"network.allow[{rule.index}]",
                               f"allow rule {rule.text!r} names port {rule.pattern.port}",
                               "allowed_ports")
            else:
                kept.append(rule)
        user_allow = kept
    layers.append(Layer.build("user", user.source, user_allow, user_deny))
    return CompiledPolicy(layers, settings, violations.messages)


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
            allowed_cidrs=tuple(net.allowed_cidrs),
            resolve={**_file_resolve(user), **resolve},
            approval_timeout=user.model.approvals.timeout, mode=user.model.mode,
        )
    m_net = managed.model.network
    req = managed.model.requirements

    def managed_sets(key: str) -> bool:
        return managed.explicitly_set("network", key)

    default = net.default
    if managed_sets("default") and _STRICTNESS[default] < _STRICTNESS[m_net.default]:
        violations.add("network.default", f"default {default!r} is looser than the managed "
                                          f"default {m_net.default!r}")
        default = m_net.default
    elif not user.explicitly_set("network", "default") and managed_sets("default"):
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

    allow_ip_literals = net.allow_ip_literals
    if managed_sets("allow_ip_literals") and allow_ip_literals and not m_net.allow_ip_literals:
        violations.add("network.allow_ip_literals", "IP literals are not allowed")
        allow_ip_literals = False

    block_private = net.block_private or (managed_sets("block_private") and
                                          m_net.block_private)
    if not net.block_private and block_private:
        violations.add("network.block_private", "private upstreams stay blocked")
    cidrs = list(m_net.allowed_cidrs)
    for index, network in enumerate(net.allowed_cidrs):
        if managed_sets("block_private") and m_net.block_private and not any(
                network.version == m.version and network.subnet_of(m)  # type: ignore[arg-type]
                for m in m_net.allowed_cidrs):
            violations.add(f"network.allowed_cidrs[{index}]",
                           f"{network} is not among the managed allowed_cidrs")
        else:
            cidrs.append(network)

    if user.model.resolve:
        violations.add("resolve", "with a managed policy, DNS overrides come only from the "
                                  "managed file and serve --resolve")

    mode = user.model.mode if user.explicitly_set("", "mode") else managed.model.mode
    if managed.explicitly_set("", "mode") and managed.model.mode == "enforce":
        if mode != "enforce":
            violations.add("mode", "audit mode is not allowed here")
        mode = "enforce"
    if req and req.allowed_modes is not None and mode not in req.allowed_modes:
        violations.add("mode", f"mode {mode!r} is not allowed", "allowed_modes")
        mode = "enforce" if "enforce" in req.allowed_modes else req.allowed_modes[0]

    timeout = user.model.approvals.timeout
    if managed.explicitly_set("approvals", "timeout"):
        timeout = managed.model.approvals.timeout

    return Settings(
        identity=identity_table,
        default=Action(default), ports=frozenset(ports), allow_ip_literals=allow_ip_literals,
        block_private=block_private, allowed_cidrs=tuple(cidrs),
        resolve={**_file_resolve(managed), **resolve}, approval_timeout=timeout, mode=mode,
        approval_scopes=frozenset(req.allowed_approval_scopes) if req and (
            req.allowed_approval_scopes is not None) else Settings.approval_scopes,
        managed_allowed_domains_only=bool(req and req.managed_allowed_domains_only),
        telemetry_required=bool(req and req.telemetry_required),
    )


def _file_resolve(parsed: ParsedFile) -> dict[str, Any]:
    from .hosts import normalize_host

    return {normalize_host(host).name: address for host, address in parsed.model.resolve.items()}
