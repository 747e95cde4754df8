"""The last word on every CONNECT and request: nothing the policy did not decide goes out.

mitmproxy logs an exception raised in an addon hook and carries on as if nothing happened: a
CONNECT would be answered `200 Connection established`. This addon runs after all others and
refuses whatever no decision answered or let through, so a fault anywhere fails closed.
"""

from __future__ import annotations

from agent_egress.policy import Action, Decision, Reason
from mitmproxy import http

from .auditlog import AuditLog
from .enforce import DECIDED
from .events import client_text, request_scheme
from .refusals import blocked_response


class FailClosed:
    def __init__(self, audit: AuditLog) -> None:
        self.audit = audit

    def http_connect(self, flow: http.HTTPFlow) -> None:
        self._refuse_undecided(flow)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        self._refuse_undecided(flow)

    def _refuse_undecided(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or flow.error is not None or flow.metadata.get(DECIDED):
            return
        request = flow.request
        decision = Decision(Action.DENY, Reason.INTERNAL_ERROR, request.pretty_host,
                            request.port, detail="no policy decision was made for this request")
        self.audit.emit("request.decided", client=client_text(flow.client_conn),
                        scheme=request_scheme(flow),
                        host=decision.host, port=decision.port, decision="deny",
                        reason=decision.reason.value, detail=decision.detail)
        flow.response = blocked_response(decision)
