"""What the proxy decides for a destination, and why: `policy explain`, here or in the proxy.

The same steps as the proxy: the rules (each layer's verdict), then for an allowed destination
the addresses it resolves to (the proxy's own lookup, static overrides first) and their check.
`METHOD https://HOST/PATH` adds the request rules' verdict (policy.requests). Run inside the
proxy (`policy explain --running`), it also sees its session approvals.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from agent_egress.addons.resolver import resolve_upstream
from agent_egress.policy import (
    Action,
    CompiledPolicy,
    InvalidHost,
    Reason,
    non_public_reason,
    normalize_host,
    split_host_port,
)
from agent_egress.policy.model import HTTP_METHODS

# (host, port) -> (decision, scope, actor) of a session approval, or None
SessionLookup = Callable[[str, int], tuple[str, str, str] | None]


def parse_target(target: str) -> tuple[str, int, str | None, str | None]:
    """``HOST[:PORT]`` or ``METHOD http(s)://HOST[:PORT]/PATH`` as (host, port, method,
    path); raises InvalidHost saying which forms are valid."""
    method, _, url = target.strip().partition(" ")
    if not url:
        host_text, port = split_host_port(target, default_port=443)
        assert port is not None
        return host_text, port, None, None
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc or "@" in parts.netloc:
        raise InvalidHost(f"{url.strip()!r} is not an http:// or https:// URL; use HOST[:PORT] "
                          "or METHOD https://HOST/PATH")
    if method.upper() not in HTTP_METHODS:
        raise InvalidHost(f"{method!r} is not an HTTP method (GET, POST, ...)")
    host_text, port = split_host_port(parts.netloc,
                                      default_port=443 if parts.scheme == "https" else 80)
    assert port is not None
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return host_text, port, method.upper(), path


async def explain(policy: CompiledPolicy, target: str, *, resolve: bool = True,
                  dns_timeout: float = 5.0, session: SessionLookup | None = None,
                  files: dict[str, str | None] | None = None) -> dict[str, Any]:
    """Everything `policy explain` reports, as data (raises InvalidHost for a bad target)."""
    host_text, port, method, path = parse_target(target)
    decision = policy.decide(host_text, port)
    result: dict[str, Any] = {
        "target": target,
        "host": decision.host,
        "port": port,
        "decision": decision.action.value,
        "reason": decision.reason.value,
        "explanation": decision.explanation,
        "rule": decision.rule.text if decision.rule else None,
        "rule_origin": decision.rule.origin if decision.rule else None,
        "layer": decision.layer or None,
        "policy": policy.source,
        "files": files or {"user": policy.source, "managed": _managed_source(policy)},
        "layers": [
            {"layer": layer.name, "source": layer.source,
             "deny": deny.text if deny else None, "allow": allow.text if allow else None}
            for layer, deny, allow in policy.layer_verdicts(host_text, port)
        ],
    }
    if decision.action is Action.DENY and decision.layer == "managed":
        overridden = [v for v in result["layers"] if v["layer"] == "user" and v["allow"]]
        if overridden:
            result["explanation"] = (f"{decision.explanation}; the user allow rule "
                                     f"{overridden[0]['allow']!r} cannot override it")
    if decision.action is Action.ASK and session is not None and (
            verdict := session(decision.host, port)) is not None:
        action, scope, actor = verdict
        whose = "auto-review's" if actor.startswith("auto-review") else "a person's"
        result.update(decision=action, reason="approved" if action == "allow" else
                      "denied_by_approver",
                      explanation=f"{'approved' if action == 'allow' else 'denied'} by {actor} "
                                  f"for the {scope} ({whose} decision, not a rule)")
    result["intercepted"] = policy.intercepts(decision.host, port)
    if method is not None and path is not None:
        _explain_request(policy, result, decision.host, port, method, path)
    try:
        host = normalize_host(host_text)
    except InvalidHost:
        return result
    # An IP literal or a static override is reported whatever the decision; DNS is asked only
    # where the proxy would ask it (an allowed or held destination), and only when wanted.
    static = host.ip is not None or policy.resolve_override(host.name) is not None
    if not static and (result["decision"] == "deny" or not resolve):
        return result
    resolution = await resolve_upstream(policy, host.name, port, dns_timeout)
    if resolution.addresses:
        result["addresses"] = [str(a) for a in resolution.addresses]
        result["address"] = result["addresses"][0]
        result["address_class"] = non_public_reason(resolution.addresses[0]) or "public"
    result["address_refused"] = resolution.refusal
    if resolution.refusal and result["decision"] == "allow":
        reason = ("denylist" if resolution.denial is not None else
                  "dns_error" if resolution.dns_failed else "private_address")
        result.update(decision="deny", reason=reason, explanation=resolution.refusal)
        if resolution.denial is not None and resolution.denial.rule is not None:
            result.update(rule=resolution.denial.rule.text,
                          rule_origin=resolution.denial.rule.origin,
                          layer=resolution.denial.layer)
    return result


def _explain_request(policy: CompiledPolicy, result: dict[str, Any], host: str, port: int,
                     method: str, path: str) -> None:
    """The request rules' verdict on METHOD PATH; it decides when the host is allowed."""
    request = policy.decide_request(host, port, method, path)
    result["request"] = {
        "method": method, "path": path.split("?", 1)[0],
        "decision": request.action.value, "reason": request.reason.value,
        "explanation": request.explanation,
        "rule": request.rule.text if request.rule else None,
        "rule_origin": request.rule.origin if request.rule else None,
        "layer": request.layer or None,
    }
    if result["decision"] == "allow" and request.reason is not Reason.UNRESTRICTED:
        result.update(decision=request.action.value, reason=request.reason.value,
                      explanation=request.explanation, layer=request.layer or None,
                      rule=result["request"]["rule"],
                      rule_origin=result["request"]["rule_origin"])


def _managed_source(policy: CompiledPolicy) -> str | None:
    managed = [layer.source for layer in policy.layers if layer.name == "managed"]
    return managed[0] if managed else None
