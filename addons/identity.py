"""Which agent made a request: proxy credentials, or the client address via `[identity]`.

An agent identifies itself with ``HTTPS_PROXY=http://AGENT-ID@127.0.0.1:8080``: clients send the
user part in ``Proxy-Authorization``. The password, if any, is never recorded, and the header
never travels upstream.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
from collections.abc import Callable

from agent_egress.policy import CompiledPolicy
from mitmproxy import http

METADATA_KEY = "agent_egress_agent"


def agent_from_credentials(header: str) -> str | None:
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic" or not value:
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user = decoded.partition(":")[0].strip()
    return user[:128] or None


def agent_of(flow: http.HTTPFlow) -> str | None:
    return flow.metadata.get(METADATA_KEY)


class AgentIdentity:
    """Runs before the enforcer: stamps the agent's name on the flow."""

    def __init__(self, policy: Callable[[], CompiledPolicy | None]) -> None:
        self.policy = policy
        self._by_client: dict[str, str] = {}  # a tunnel's requests inherit the CONNECT's name

    def _identify(self, flow: http.HTTPFlow) -> None:
        header = flow.request.headers.get("Proxy-Authorization")
        agent = agent_from_credentials(header) if header else None
        if header is not None and flow.request.method != "CONNECT":
            del flow.request.headers["Proxy-Authorization"]  # never forwarded upstream
        client = flow.client_conn
        if agent is None:
            agent = self._by_client.get(client.id)
        policy = self.policy()
        # Most policies have no [identity] table: then no address is parsed per request.
        if agent is None and policy is not None and policy.settings.identity and client.peername:
            try:
                address = ipaddress.ip_address(client.peername[0].split("%")[0])
            except ValueError:
                address = None
            if address is not None:
                agent = policy.settings.agent_for(address)
        if agent is not None:
            flow.metadata[METADATA_KEY] = agent
            self._by_client[client.id] = agent

    def http_connect(self, flow: http.HTTPFlow) -> None:
        self._identify(flow)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        self._identify(flow)

    def client_disconnected(self, client) -> None:  # type: ignore[no-untyped-def]
        self._by_client.pop(client.id, None)
