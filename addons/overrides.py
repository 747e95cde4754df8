"""Form fields that change a request's method in the application behind an origin.

Rails, Laravel and Symfony read a POST's `_method` form field as the real method: a POST the
request rules allow could be a DELETE they refuse. Headers and the query are seen when the
request is decided (httpchecks.implied_requests); the body only once it has arrived, so a
form POST to a host with request rules is checked here, after its body. A body too large to
be held (streamed) is scanned as it passes: `_method` anywhere in it cuts the request.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from agent_egress.policy import Action, CompiledPolicy, Decision, Reason
from mitmproxy import http

from .auditlog import AuditLog
from .enforce import DECIDED
from .events import decision_fields, interception_fields, request_fields
from .httpchecks import form_methods
from .refusals import blocked_response

_FORMS = ("application/x-www-form-urlencoded", "multipart/form-data")
_HELD_BODY = 1 << 20  # serve's stream_large_bodies: larger bodies are streamed, not held
_CHECK = "agent_egress_form_check"  # flow metadata: check this body's _method fields


class FormOverrides:
    """Refuses a form POST whose `_method` field asks for a method the request rules refuse."""

    def __init__(self, audit: AuditLog, policy: Callable[[], CompiledPolicy | None]) -> None:
        self.audit = audit
        self.policy = policy

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        request = flow.request
        policy = self.policy()
        if (policy is None or flow.response is not None or not flow.metadata.get(DECIDED)
                or request.method != "POST" or not _is_form(request)
                or not policy.restricts(request.pretty_host, request.port)):
            return
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) <= _HELD_BODY:
            flow.metadata[_CHECK] = True
        else:  # after any other filter already on the stream (the credential broker's)
            request.stream = _chained(request.stream, _scanner(lambda: self._cut(flow)))

    def request(self, flow: http.HTTPFlow) -> None:
        if not flow.metadata.pop(_CHECK, False) or flow.response is not None:
            return
        policy = self.policy()
        request = flow.request
        if policy is None:
            return
        methods = _methods(request)
        worst: Decision | None = None
        for method in methods:
            decision = policy.decide_request(request.pretty_host, request.port, method,
                                             request.path)
            if decision.action is not Action.ALLOW and (
                    worst is None or decision.action is Action.DENY):
                worst = decision
        if worst is None:
            return
        refusal = worst._replace(action=Action.DENY, detail=f"{worst.detail} (the _method form "
                                 "field asks for it; send that request itself)")
        self._refuse(flow, refusal)

    def _refuse(self, flow: http.HTTPFlow, decision: Decision) -> None:
        self.audit.emit("request.decided", **request_fields(flow), **decision_fields(decision),
                        **interception_fields(flow))
        flow.response = blocked_response(decision, flow.request)

    def _cut(self, flow: http.HTTPFlow) -> None:
        request = flow.request
        decision = Decision(Action.DENY, Reason.INVALID_REQUEST, request.pretty_host,
                            request.port, detail="a form body too large to hold carries a "
                                                 "_method field; send that request itself")
        self.audit.emit("request.decided", **request_fields(flow), **decision_fields(decision),
                        **interception_fields(flow))
        flow.kill()


def _is_form(request: http.Request) -> bool:
    content_type = request.headers.get("content-type", "").lower()
    return content_type.startswith(_FORMS)


def _methods(request: http.Request) -> list[str]:
    if request.headers.get("content-type", "").lower().startswith(_FORMS[0]):
        return form_methods(request.get_text(strict=False) or "")
    try:
        fields: Iterable[tuple[bytes, bytes]] = request.multipart_form.items(multi=True)
    except ValueError:
        return ["?"]  # a body that is no valid form: asked about as an unknown method
    return [value.decode("utf-8", "replace").strip().upper()[:32] or "?"
            for name, value in fields if name.strip() == b"_method"]


def _chained(first: object, then: Callable[[bytes], bytes]) -> Callable[[bytes], bytes]:
    if not callable(first):
        return then
    return lambda chunk: then(first(chunk))


def _scanner(cut: Callable[[], None]) -> Callable[[bytes], bytes]:
    """A stream filter that cuts the request when `_method` appears, even across chunks."""
    tail = b""

    def scan(chunk: bytes) -> bytes:
        nonlocal tail
        if b"_method" in tail + chunk:
            cut()
            return b""
        tail = chunk[-7:]
        return chunk

    return scan
