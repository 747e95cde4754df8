"""What an agent is told when it is refused: a 403 (400 for malformed input) with plain text it
can relay to its user, and the machine-readable headers (Proxy-Status, x-proxy-error)."""

from __future__ import annotations

from agent_egress.policy import Decision, Reason
from mitmproxy import http

_X_PROXY_ERROR = {
    Reason.DENYLIST: "blocked-by-denylist",
    Reason.DENIED_BY_APPROVER: "blocked-by-denylist",
    Reason.NOT_ALLOWLISTED: "blocked-by-allowlist",
    Reason.NEEDS_APPROVAL: "blocked-by-allowlist",
    Reason.APPROVAL_TIMEOUT: "blocked-by-allowlist",
    Reason.APPROVAL_QUEUE_FULL: "blocked-by-allowlist",
}


_PROXY_STATUS_ERROR = {
    Reason.PRIVATE_ADDRESS: "destination_ip_prohibited",
    Reason.DNS_ERROR: "dns_error",
}


_STATUS = {Reason.INVALID_HOST: 400}


def blocked_response(decision: Decision) -> http.Response:
    """The 403 an agent sees: plain text it can show its user, plus machine-readable headers.

    It names the rule and its file, never a path on the machine (the event keeps those)."""
    why = decision.explain(file_names_only=True)
    body = (f"agent-egress blocked this request.\n"
            f"destination: {decision.host}:{decision.port}\n"
            f"reason: {decision.reason.value}: {why}\n"
            f"what to do: {_what_to_do(decision)} Do not try to reach it another way.\n")
    error = _PROXY_STATUS_ERROR.get(decision.reason, "http_request_denied")
    details = _quoted_header_text(why)
    return http.Response.make(_STATUS.get(decision.reason, 403), body, {
        "Content-Type": "text/plain; charset=utf-8",
        "Proxy-Status": f'agent-egress; error={error}; details="{details}"',
        "x-proxy-error": _X_PROXY_ERROR.get(decision.reason, "blocked-by-policy"),
        "Connection": "close",
    })


def _what_to_do(decision: Decision) -> str:
    """Advice that helps: for an address or DNS refusal, the policy is not the problem."""
    target = f"{decision.host}:{decision.port}"
    if decision.reason is Reason.PRIVATE_ADDRESS:
        return (f"{decision.host} resolves to a non-public address, which no allow rule "
                "changes. If it is an internal service agents should reach, an administrator "
                "can list its network in network.allowed_cidrs; otherwise check the name.")
    if decision.reason is Reason.DNS_ERROR:
        return (f"the proxy could not look up {decision.host}: check the name (a typo?) and "
                "the proxy's DNS; the policy is not the problem.")
    return (f"if the task needs this destination, ask the person running the agent to allow "
            f"it in the agent-egress policy (see: agent-egress policy explain {target}).")


def _quoted_header_text(text: str) -> str:
    """Printable ASCII for a quoted header parameter: hosts and paths come from the agent."""
    ascii_text = text.encode("ascii", "backslashreplace").decode("ascii")
    printable = "".join(c if " " <= c <= "~" else f"\\x{ord(c):02x}" for c in ascii_text)
    return printable.replace("\\", "\\\\").replace('"', '\\"')
