"""Decide every CONNECT and every plain HTTP request (WebSocket upgrades included) by policy.

A refused request is answered with a 403 the agent can relay to its user; nothing is sent
upstream. An allowed one has its upstream resolved, checked and pinned before any connection.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from agent_egress.policy import (
    Action,
    CompiledPolicy,
    Decision,
    PolicyError,
    Reason,
    default_user_policy_path,
    load_policy,
)
from agent_egress.policy.files import files_signature
from mitmproxy import ctx, exceptions, http

from .approvals import Approvals
from .auditlog import AuditLog
from .autoreview import AutoReview, FirstLook
from .events import decision_fields, interception_fields, logged_path, request_fields
from .httpchecks import (
    host_header_mismatch,
    implied_requests,
    invalid_request,
    name_decided_host,
    strip_upgrade,
    tunnel_target_mismatch,
)
from .identity import agent_of
from .managed_url import ManagedLayer, managed_fields
from .pending import Verdict, verdict_decision, verdict_fields
from .pinning import UpstreamPinning
from .refusals import blocked_response
from .upstream import ParentProxy

logger = logging.getLogger(__name__)

DECIDED = "agent_egress_decided"  # flow metadata: the policy let this request through
REFUSAL = "agent_egress_refusal"  # flow metadata: the Decision a refused request was answered by
_STRICTNESS = (Action.ALLOW, Action.ASK, Action.DENY)


class Enforcer:
    """Applies the compiled policy at CONNECT and at request headers.

    Every decision path is guarded: an exception refuses the request with `internal_error`,
    it never lets it through (mitmproxy would log the error and carry on with a 200).
    """

    def __init__(self, audit: AuditLog, pinning: UpstreamPinning, approvals: Approvals,
                 discard_body: Callable[[http.Request], None] = lambda request: None,
                 review: AutoReview | None = None, parent: ParentProxy | None = None,
                 managed: Callable[[], ManagedLayer] | None = None,
                 shared_rules: Callable[[], Sequence[tuple[str, str]]] = tuple) -> None:
        self.audit = audit
        self.managed = managed  # the verified managed layer from a URL (ManagedURLPolicy)
        self.shared_rules = shared_rules  # a fleet's `always` decisions, joining the user layer
        self.parent = parent  # the corporate proxy allowed requests leave through (the name)
        self.pinning, self.approvals = pinning, approvals
        self.review = review  # answers held destinations before a person, when enabled
        self.discard_body = discard_body  # a refused request's body is read and dropped
        self.policy: CompiledPolicy | None = None
        self.loaded_from: tuple[Any, ...] = ()  # the policy files' signature when read
        self._written: str | None = None  # the user policy file write_rule last wrote

    def load(self, loader: Any) -> None:
        loader.add_option("policy_file", str, "",
                          "Policy file (TOML); empty for the built-in default policy.")
        loader.add_option("managed_policy_file", str, "",
                          "Managed (admin-owned) policy file layered above the user policy.")
        loader.add_option("resolve_overrides", Sequence[str], [],
                          "Static HOST=ADDR overrides, like curl --resolve.")

    def configure(self, updated: set[str]) -> None:
        if updated & {"policy_file", "managed_policy_file", "resolve_overrides"}:
            try:
                self.reload()
            except PolicyError as exc:
                raise exceptions.OptionsError(str(exc)) from exc

    def reload(self) -> CompiledPolicy:
        """Load the policy files afresh; on error the policy in force stays (PolicyError)."""
        # Which versions of the files are read: taken before, so a later change is seen later.
        signature = files_signature((ctx.options.policy_file, ctx.options.managed_policy_file))
        managed = self.managed() if self.managed else ctx.options.managed_policy_file or None
        policy = load_policy(ctx.options.policy_file or None,
                             resolve=ctx.options.resolve_overrides, managed=managed,
                             shared=self.shared_rules())
        self.policy = policy
        self.loaded_from = signature
        self.audit.emit("policy.loaded", policy=ctx.options.policy_file or "built-in",
                        **managed_fields(managed), mode=policy.settings.mode,
                        rules=policy.allow_count + policy.deny_count,
                        violations=list(policy.problems) or None)
        self.approvals.policy_changed(policy)
        return policy

    def write_rule(self, action: Action, host: str, port: int | None) -> str:
        """Write an `always` decision to the user policy file: its path (or PolicyError)."""
        from agent_egress.policy.writer import add_rule_to_file, rule_pattern  # tomlkit

        assert self.policy is not None
        path = Path(ctx.options.policy_file or default_user_policy_path())
        in_ports = port is None or port in self.policy.settings.ports
        add_rule_to_file(path, action, rule_pattern(host, None if in_ports else port),
                         may_create=not ctx.options.policy_file)
        self._written = str(path)
        return str(path)

    def load_written(self) -> None:
        """Load the user file `write_rule` wrote (the first turns the built-in policy into it)."""
        if self._written and ctx.options.policy_file != self._written:
            ctx.options.update(policy_file=self._written)
        else:
            self.reload()

    async def http_connect(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None:
            return  # already answered (an invalid agent name)
        await self._guarded(flow, self._connect(flow))

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.error is not None:  # mitmproxy refuses it itself, with a 400: recorded
            refusal = invalid_request(flow, self.pinning.tunnel(flow.client_conn))
            self.audit.emit("request.decided", **request_fields(flow), **decision_fields(refusal))
            return
        if flow.response is not None:
            return
        await self._guarded(flow, self._request(flow))

    async def _guarded(self, flow: http.HTTPFlow, deciding: Awaitable[None]) -> None:
        try:
            await deciding
        except Exception as exc:
            logger.exception("decision failed; the request is refused")
            request = flow.request
            self._refuse(flow, Decision(Action.DENY, Reason.INTERNAL_ERROR, request.pretty_host,
                                        request.port, detail=f"internal error "
                                        f"({type(exc).__name__}); the request was refused"))

    async def _connect(self, flow: http.HTTPFlow) -> None:
        request = flow.request
        if (tunnel := self.pinning.tunnel(flow.client_conn)) is not None:
            self._refuse(flow, Decision(Action.DENY, Reason.TUNNEL_PROTOCOL, tunnel.name,
                                        tunnel.port, detail="a CONNECT inside a tunnel"))
            return
        await self._enforce(flow, request.host, request.port, tunnel=True)

    async def _request(self, flow: http.HTTPFlow) -> None:
        request = flow.request
        strip_upgrade(request)
        tunnel = self.pinning.tunnel(flow.client_conn)
        if tunnel is not None:
            mismatch = tunnel_target_mismatch(request, tunnel)
            # mitmproxy points a request in a tunnel at the tunnel's checked address; it is
            # decided by the tunnel's name, afresh (the policy may have changed since), and
            # goes upstream in origin form: the origin sees exactly the target judged here.
            request.data.host, request.data.port = tunnel.name, tunnel.port
            request.authority = ""
        else:
            mismatch = host_header_mismatch(request)
        if mismatch is not None:
            self._refuse(flow, mismatch)
            if not self.auditing:
                return
            flow.response = None  # audit mode: logged, then decided as usual
        named = request.host
        await self._enforce(flow, named, request.port)
        if flow.response is None and flow.error is None and request.host_header is None:
            name_decided_host(request, named)

    async def _ask(self, flow: http.HTTPFlow, held: Decision,
                   request: str = "") -> tuple[Decision, Verdict] | None:
        """The verdict on a held destination (or ask request rule); None if the client left."""
        assert self.policy is not None
        settings = self.policy.settings
        agent = agent_of(flow)
        verdict = self.approvals.session_verdict(held.host, held.port, request,
                                                 connect=flow.request.method == "CONNECT")
        look = FirstLook()
        if verdict is None and self.review is not None and not request and (
                (held.host, held.port, "") not in self.approvals.pending):  # not joining one
            look = self.review.first_look(self.policy, flow, held, agent)
            verdict = look.verdict
        verdict = verdict or self.approvals.admit(
            flow, held, agent, settings.max_pending, settings.max_pending_per_agent, request)
        if verdict is None:
            self.audit.emit("request.decided", **request_fields(flow),
                            **{**decision_fields(held), "decision": "held"},
                            **interception_fields(flow))
            verdict = await self.approvals.hold(flow, held, settings.approval_timeout,
                                                agent=agent, asked=request, review=look.note,
                                                opened=look.consult)
            if verdict is None:
                flow.kill()
                return None
        return verdict_decision(held, verdict, settings.approval_timeout), verdict

    async def _enforce(self, flow: http.HTTPFlow, host: str, port: int,
                       tunnel: bool = False) -> None:
        assert self.policy is not None
        decision = self.policy.decide(host, port)
        verdict: Verdict | None = None
        if decision.action is Action.ASK and not self.auditing:
            answer = await self._ask(flow, decision)
            if answer is None:
                return
            decision, verdict = answer
            if verdict.scope == "reload":  # the reloaded policy has a rule for it now
                await self._enforce(flow, host, port, tunnel)
                return
        refusal = decision if decision.action is not Action.ALLOW else None
        if decision.reason is Reason.INVALID_HOST:
            self._refuse(flow, decision)  # nothing to resolve or pin, not even in audit mode
            return
        address = self.pinning.pinned(flow.client_conn, host, port)
        if address is not None and tunnel:
            # A CONNECT after plain requests on the same connection: what follows is the
            # tunnel, judged by its host, so it gets its own tunnel pin (same checked address).
            self.pinning.pin(flow.client_conn, host, port, address, tunnel=True)
        if address is None and (refusal is None or self.auditing):
            resolution = await self.pinning.resolve(self.policy, decision.host, port)
            if resolution.denial is not None and refusal is None:
                refusal = resolution.denial
            elif resolution.refusal and refusal is None:
                reason = Reason.DNS_ERROR if resolution.dns_failed else Reason.PRIVATE_ADDRESS
                refusal = Decision(Action.DENY, reason, decision.host, port, decision.rule,
                                   resolution.refusal, decision.layer)
            if resolution.addresses:
                # One string per address, however many requests and idle tunnels hold it.
                address = sys.intern(str(resolution.addresses[0]))
                self.pinning.pin(flow.client_conn, host, port, address, tunnel=tunnel)
        plain = not tunnel and self.pinning.tunnel(flow.client_conn) is None
        # (Audit mode routes a would-be refusal as an allowed request: the same way out.)
        if address is not None and not (self.parent is not None
                                        and self.parent.route(flow, decision.host, port, plain)):
            # Connect to exactly the checked address: no second lookup for rebinding to use.
            # (Setting .data.host leaves the Host header as the client sent it.)
            flow.request.data.host = address
        if refusal is not None:
            self._refuse(flow, refusal, verdict)
            if self.auditing and address is not None:
                flow.response = None  # logged as refused; audit mode lets it through
                flow.metadata[DECIDED] = True
            return
        if not tunnel and self.policy.restricts(decision.host, port):
            await self._enforce_request(flow, decision, address, verdict)
            return
        flow.metadata[DECIDED] = True
        self.audit.emit("request.decided", **request_fields(flow), **decision_fields(decision),
                        address=address, **verdict_fields(verdict))

    async def _enforce_request(self, flow: http.HTTPFlow, allowed: Decision, address: str | None,
                               verdict: Verdict | None) -> None:
        """Request rules and `read_only`, for a request to a host they cover (in an
        intercepted tunnel, or plain HTTP): its method and path, after the host was allowed."""
        assert self.policy is not None
        request = flow.request
        decision = self.policy.decide_request(allowed.host, allowed.port, request.method,
                                              request.path)
        asked = f"{request.method} {logged_path(request.path)}"
        for method, target, why in implied_requests(request):  # the strictest one decides
            then = self.policy.decide_request(allowed.host, allowed.port, method, target)
            if _STRICTNESS.index(then.action) > _STRICTNESS.index(decision.action):
                asked, decision = f"{method} {logged_path(target)}", then._replace(
                    detail=f"{then.detail} ({why})")
        if decision.action is Action.ASK and not self.auditing:
            answer = await self._ask(flow, decision, asked)
            if answer is None:
                return
            decision, verdict = answer
            if verdict.scope == "reload":  # re-decided by the reloaded policy
                await self._enforce_request(flow, allowed, address, None)
                return
        if decision.reason is Reason.UNRESTRICTED:
            decision = allowed  # no request rule applies: the host's own rule is the reason
        if not decision.allowed:
            self._refuse(flow, decision, verdict)
            if self.auditing:
                flow.response = None
                flow.metadata[DECIDED] = True
            return
        flow.metadata[DECIDED] = True
        self.audit.emit("request.decided", **request_fields(flow), **decision_fields(decision),
                        address=address, **verdict_fields(verdict),
                        **interception_fields(flow))

    @property
    def auditing(self) -> bool:
        """Audit mode: every decision is logged as it would be, but traffic flows."""
        return self.policy is not None and self.policy.settings.mode == "audit"

    def _refuse(self, flow: http.HTTPFlow, decision: Decision,
                verdict: Verdict | None = None) -> None:
        fields = {**decision_fields(decision)}
        if self.auditing:
            fields.update(mode="audit", enforced=False)
            if decision.action is Action.ASK:
                fields["decision"] = "held"
        self.audit.emit("request.decided", **request_fields(flow), **fields,
                        **verdict_fields(verdict), **interception_fields(flow))
        flow.response = blocked_response(decision, flow.request)
        flow.metadata[REFUSAL] = decision
        request = flow.request
        if request.method != "CONNECT":
            # mitmproxy decided to stream a large body before this hook ran; a refused
            # request is answered instead, and its body is read and dropped, never buffered.
            request.stream = False
            request.headers.pop("expect", None)  # no "100 Continue" invitation to upload
            self.discard_body(request)
