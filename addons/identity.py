"""Which agent made a request: proxy credentials, or the client address via `[identity]`.

An agent identifies itself with ``HTTPS_PROXY=http://AGENT-ID@127.0.0.1:8080``: clients send the
user part in ``Proxy-Authorization``. The password, if any, is never recorded, and the header
never travels upstream.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import logging
from collections.abc import Callable

from agent_egress.policy import CompiledPolicy, Reason
from agent_egress.policy.model import AGENT_NAME, AGENT_NAME_RULE
from mitmproxy import connection, http

from .auditlog import AuditLog
from .connections import client_text, tunnel_scheme

logger = logging.getLogger(__name__)
METADATA_KEY = "agent_egress_agent"
CLAIMED_KEY = "agent_egress_agent_claimed"




def agent_from_credentials(header: str) -> str | None:
    """The user part of Basic proxy credentials, as sent (not yet validated)."""
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic" or not value:
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):  # ValueError: non-ASCII text, not base64 at all
        return None
    return decoded.partition(":")[0] or None


def agent_of(flow: http.HTTPFlow) -> str | None:
    return flow.metadata.get(METADATA_KEY)


def agent_claimed(flow: http.HTTPFlow) -> str | None:
    """A name the agent gave itself that the [identity] table overrode."""
    return flow.metadata.get(CLAIMED_KEY)


def invalid_agent_response(name: str) -> http.Response:
    shown = ascii(name[:80])
    return http.Response.make(407, f"agent-egress refused this request: the agent name {shown} "
                                   f"in the proxy URL is not valid: use {AGENT_NAME_RULE} "
                                   "(e.g. http://codex-1@127.0.0.1:8080).\n", {
        "Content-Type": "text/plain; charset=utf-8",
        "Proxy-Authenticate": 'Basic realm="agent-egress (the user name names the agent)"',
        "x-proxy-error": "invalid-agent-name",
        "Connection": "close",
    })


class AgentIdentity:
    """Runs before the enforcer: stamps the agent's name on the flow.

    Where the policy's [identity] table maps the client's address, that name is the agent: the
    address is something the agent cannot choose, its proxy user name is. A different name it
    claims is kept as `agent_claimed`. A claimed name outside the allowed characters is refused
    with 407: names are shown to people and land in reports.
    """

    def __init__(self, policy: Callable[[], CompiledPolicy | None], audit: AuditLog) -> None:
        self.policy = policy
        self.audit = audit
        self._by_client: dict[str, str] = {}  # a tunnel's requests inherit the CONNECT's name

    def _identify(self, flow: http.HTTPFlow) -> None:
        header = flow.request.headers.get("Proxy-Authorization")
        if header is not None and flow.request.method != "CONNECT":
            del flow.request.headers["Proxy-Authorization"]  # never forwarded upstream
        claimed = agent_from_credentials(header) if header else None
        if claimed is not None and not AGENT_NAME.fullmatch(claimed):
            self._refuse(flow, claimed)
            return
        client = flow.client_conn
        mapped = self._mapped(client)
        agent = mapped or claimed or self._by_client.get(client.id)
        if mapped is not None and claimed is not None and claimed != mapped:
            flow.metadata[CLAIMED_KEY] = claimed
        if agent is not None:
            flow.metadata[METADATA_KEY] = agent
            self._by_client[client.id] = agent

    def _mapped(self, client: connection.Client) -> str | None:
        policy = self.policy()
        # Most policies have no [identity] table: then no address is parsed per request.
        if policy is None or not policy.settings.identity or not client.peername:
            return None
        try:
            address = ipaddress.ip_address(client.peername[0].split("%")[0])
        except ValueError:
            return None
        return policy.settings.agent_for(address)

    def _refuse(self, flow: http.HTTPFlow, claimed: str,
                reason: Reason = Reason.INVALID_AGENT) -> None:
        request = flow.request
        detail = (f"agent names use {AGENT_NAME_RULE}" if reason is Reason.INVALID_AGENT
                  else "internal error while naming the agent; the request was refused")
        self.audit.emit("request.decided", client=client_text(flow.client_conn),
                        scheme=(tunnel_scheme(flow.client_conn) if request.method == "CONNECT"
                                else request.scheme),
                        host=request.pretty_host[:300], port=request.port, decision="deny",
                        reason=reason.value, agent_claimed=claimed[:128] or None, detail=detail)
        flow.response = invalid_agent_response(claimed) if reason is Reason.INVALID_AGENT else (
            http.Response.make(403, f"agent-egress refused this request: {detail}.\n",
                               {"Content-Type": "text/plain; charset=utf-8",
                                "x-proxy-error": "blocked-by-policy", "Connection": "close"}))

    def http_connect(self, flow: http.HTTPFlow) -> None:
        self._guarded(flow)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        self._guarded(flow)

    def _guarded(self, flow: http.HTTPFlow) -> None:
        """A fault here must not let a request through unnamed: it is refused instead."""
        try:
            self._identify(flow)
        except Exception:
            logger.exception("naming the agent failed; the request is refused")
            flow.request.headers.pop("Proxy-Authorization", None)
            self._refuse(flow, "", reason=Reason.INTERNAL_ERROR)

    def client_disconnected(self, client: connection.Client) -> None:
        self._by_client.pop(client.id, None)
