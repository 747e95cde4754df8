"""Request rules, `read_only` and `passthrough` from each file, and what the user file may not
change about the managed ones.

Managed request rules and `read_only` bind: the user file adds stricter ones (each layer's
verdict counts, the strictest stands) and cannot exempt a managed host with `passthrough`. A
managed `passthrough` entry is the administrator's word that a host must never be opened
(certificate pinning), so user request rules on it are reported and left out.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .engine import Action, Rule, RuleIndex
from .errors import InvalidPattern, PolicyError, Problem
from .paths import parse_path_glob
from .patterns import Pattern, parse_pattern
from .requests import RequestLayer, RequestRule
from .source import ParsedFile, locate

Report = Callable[[str, str], None]  # (key, message): a violation, reported and not applied
_STRICTNESS = {"allow": 0, "ask": 1, "deny": 2}


def _pattern(parsed: ParsedFile, key: tuple[Any, ...], text: str,
             problems: list[Problem]) -> Pattern | None:
    try:
        return parse_pattern(text)
    except InvalidPattern as exc:
        name = "network." + ".".join(str(k) for k in key[1:]).replace(".[", "[")
        problems.append(Problem(str(exc), key=name, line=locate(parsed.text, key, text)))
        return None


def compile_request_layer(parsed: ParsedFile, name: str,
                          problems: list[Problem]) -> RequestLayer:
    """One file's request rules; problems (bad host patterns, conflicts) are appended."""
    network = parsed.model.network
    rules = []
    for index, table in enumerate(network.requests):
        host = _pattern(parsed, ("network", "requests", index, "host"), table.host, problems)
        if host is None:
            continue
        globs = tuple(parse_path_glob(text) for text in table.paths or ())
        methods = frozenset(table.methods) if table.methods is not None else None
        rules.append(RequestRule(host, methods, globs, Action(table.action), parsed.source,
                                 index, name))
    read_only = []
    for index, text in enumerate(network.read_only):
        if pattern := _pattern(parsed, ("network", "read_only", index), text, problems):
            read_only.append(RequestRule(pattern, frozenset(), (), Action.DENY, parsed.source,
                                         index, name, "read_only"))
    passthrough = []
    for index, text in enumerate(network.passthrough):
        if pattern := _pattern(parsed, ("network", "passthrough", index), text, problems):
            passthrough.append(Rule(pattern, Action.ALLOW, parsed.source, index, name,
                                    "passthrough"))
    layer = RequestLayer(name, tuple(rules), tuple(read_only), tuple(passthrough))
    for entry, rule in conflicts(layer.passthrough, layer):
        problems.append(Problem(
            f"passthrough {entry.text!r} and {rule.key} ({rule.host.text!r}) name the same "
            "hosts: a host is either intercepted to decide its requests or passed through "
            "untouched; remove one of them",
            key=entry.key, line=locate(parsed.text, ("network", "passthrough", entry.index),
                                       entry.text)))
    return layer


def conflicts(passthrough: tuple[Rule, ...],
              layer: RequestLayer) -> list[tuple[Rule, RequestRule]]:
    """Passthrough entries and request rules that cover some host in common (as far as
    pattern containment tells; a partial overlap is intercepted at run time, failing closed)."""
    found = []
    for entry in passthrough:
        own = RuleIndex.build([entry])
        for rule in layer.rules + layer.read_only:
            other = RuleIndex.build([Rule(rule.host, Action.ALLOW, rule.source, rule.index)])
            if own.covers(rule.host) or other.covers(entry.pattern):
                found.append((entry, rule))
                break
    return found


def bounded_user_layer(user: RequestLayer, managed: RequestLayer,
                       report: Report) -> RequestLayer:
    """The user layer without what would open a managed restriction or pinned host."""
    exempting = {id(entry) for entry, _ in conflicts(user.passthrough, managed)}
    passthrough = []
    for entry in user.passthrough:
        if id(entry) in exempting:
            report(entry.key, f"passthrough {entry.text!r} would exempt hosts the managed "
                              "request rules or read_only cover")
        else:
            passthrough.append(entry)
    kept: dict[str, list[RequestRule]] = {"requests": [], "read_only": []}
    for rule in user.rules + user.read_only:
        if conflicts(managed.passthrough, RequestLayer("user", (rule,))):
            report(rule.key, f"{rule.key} ({rule.host.text!r}) covers hosts the managed "
                             "passthrough keeps untouched")
        else:
            kept[rule.list_name].append(rule)
    return RequestLayer("user", tuple(kept["requests"]), tuple(kept["read_only"]),
                        tuple(passthrough))


def request_settings(user: ParsedFile, managed: ParsedFile | None,
                     report: Report) -> dict[str, Any]:
    """request_default (the stricter binds), explain_https (either file turns it on) and
    upstream_ca_file (the managed file's, when it names one)."""
    net = user.model.network
    default = net.request_default
    if managed is not None:
        floor = managed.model.network.request_default
        if _STRICTNESS[default] < _STRICTNESS[floor]:
            report("network.request_default", f"request_default {default!r} is looser than "
                                              f"the managed {floor!r}")
            default = floor
        elif not user.explicitly_set("network", "request_default"):
            default = floor
    explain = net.explain_https or bool(managed and managed.model.network.explain_https)
    ca_file = None
    for parsed in (managed, user):
        if parsed is not None and parsed.model.network.upstream_ca_file:
            ca_file = _ca_file(parsed)
            if parsed is managed and user.model.network.upstream_ca_file:
                report("network.upstream_ca_file", "the managed policy names the upstream CA")
            break
    return {"request_default": Action(default), "explain_https": explain,
            "upstream_ca_file": ca_file}


def _ca_file(parsed: ParsedFile) -> str:
    """The file as an absolute path (relative to its policy file); a missing one is an
    error, not a silent fallback to other trust."""
    text = parsed.model.network.upstream_ca_file or ""
    path = Path(text).expanduser()
    if not path.is_absolute():
        path = Path(parsed.source).parent / path
    if not path.is_file():
        raise PolicyError(parsed.source, [Problem(
            f"upstream_ca_file {text!r}: {path} is not a readable file; name a PEM file of "
            "the CA certificates intercepted origins are verified against",
            key="network.upstream_ca_file",
            line=locate(parsed.text, ("network", "upstream_ca_file")))])
    return str(path)
