"""What an agent is told when it is refused: a 403 (400 for malformed input) with plain text it
can relay to its user, and the machine-readable headers (Proxy-Status, x-proxy-error)."""

from __future__ import annotations

from agent_egress.policy import Decision, Reason
from agent_egress.policy.paths import display_path
from mitmproxy import http

_X_PROXY_ERROR = {
    Reason.DENYLIST: "blocked-by-denylist",
    Reason.DENIED_BY_APPROVER: "blocked-by-denylist",
    Reason.NOT_ALLOWLISTED: "blocked-by-allowlist",
    Reason.NEEDS_APPROVAL: "blocked-by-allowlist",
    Reason.APPROVAL_TIMEOUT: "blocked-by-allowlist",
    Reason.APPROVAL_QUEUE_FULL: "blocked-by-allowlist",
    Reason.APPROVAL_UNAVAILABLE: "blocked-by-allowlist",
}


_PROXY_STATUS_ERROR = {
    Reason.PRIVATE_ADDRESS: "destination_ip_prohibited",
    Reason.DNS_ERROR: "dns_error",
    Reason.UPSTREAM_TLS_ERROR: "tls_certificate_error",
}


_STATUS = {Reason.INVALID_HOST: 400, Reason.UPSTREAM_TLS_ERROR: 502}


_REQUEST_REASONS = frozenset({Reason.METHOD_NOT_ALLOWED, Reason.PATH_NOT_ALLOWED,
                              Reason.READ_ONLY, Reason.REQUEST_DENIED})


def blocked_response(decision: Decision, request: http.Request | None = None) -> http.Response:
    """The 403 an agent sees: plain text it can show its user, plus machine-readable headers.

    It names the rule and its file, never a path on the machine (the event keeps those), and
    for a request refused by request rules, the method and path (never the query)."""
    why = decision.explain(file_names_only=True)
    asked = ""
    if request is not None and request.method != "CONNECT":
        asked = f"request: {request.method} {display_path(request.path)}\n"
    body = (f"agent-egress blocked this request.\n"
            f"destination: {decision.host}:{decision.port}\n{asked}"
            f"reason: {decision.reason.value}: {why}\n"
            f"what to do: {_what_to_do(decision, request)} Do not try to reach it another "
            "way.\n")
    error = _PROXY_STATUS_ERROR.get(decision.reason, "http_request_denied")
    details = _quoted_header_text(why)
    return http.Response.make(_STATUS.get(decision.reason, 403), body, {
        "Content-Type": "text/plain; charset=utf-8",
        "Proxy-Status": f'agent-egress; error={error}; details="{details}"',
        "x-proxy-error": _X_PROXY_ERROR.get(decision.reason, "blocked-by-policy"),
        "Connection": "close",
    })


def _what_to_do(decision: Decision, request: http.Request | None) -> str:
    """Advice that helps: for an address or DNS refusal, the policy is not the problem."""
    target = f"{decision.host}:{decision.port}"
    if decision.reason in _REQUEST_REASONS and request is not None:
        method, path = request.method, display_path(request.path)
        default = 443 if request.scheme == "https" else 80
        url = (f"{request.scheme}://{decision.host}"
               f"{'' if decision.port == default else f':{decision.port}'}{path}")
        return (f"the destination is allowed, this request is not. If the task needs "
                f"{method} {path} there, ask the person running the agent to change the "
                f"request rules (see: agent-egress policy explain {method} {url}).")
    if decision.reason is Reason.PRIVATE_ADDRESS:
        return (f"{decision.host} resolves to a non-public address, which no allow rule "
                "changes. If it is an internal service agents should reach, an administrator "
                "can list its network in network.allowed_cidrs; otherwise check the name.")
    if decision.reason is Reason.UPSTREAM_TLS_ERROR:
        return (f"the proxy could not verify {target} over TLS, so nothing was sent to it. If "
                "it is an internal service with its own CA, an administrator can name that CA "
                "in network.upstream_ca_file; verification is never turned off.")
    if decision.reason is Reason.MANAGED_POLICY_UNAVAILABLE:
        return ("nothing is reachable until the proxy has verified its managed policy: tell "
                "the person running the agent ('agent-egress health' says why); the proxy "
                "retries on its own, so a later attempt may work.")
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
