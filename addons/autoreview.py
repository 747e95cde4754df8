"""Auto-review: a reviewer that may answer a held request before a person does.

The rules reviewer (policy/review.py) looks first, synchronously: a low-risk destination is
released at once (with the configured scope), a critical one refused with its rationale, the
rest wait for a person with the rationale beside them. Where the rules are unsure and a model
is configured, the request is held as usual while the model is asked; the model's answer,
bounded (policy.review.bound_model_answer), decides the pending approval unless a person did
first. Any failure of the model leaves the request to a person. Every review is an
`approval.reviewed` event. Ask request rules are never auto-reviewed: whoever wrote one asked
for a person.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from agent_egress.policy import Action, CompiledPolicy, Decision
from agent_egress.policy.engine import AutoReviewPolicy
from agent_egress.policy.review import (
    Review,
    ReviewAnswer,
    ReviewRequest,
    RulesReviewer,
    is_ip_literal,
)
from agent_egress.policy.review import bound_model_answer as bounded
from agent_egress.policy.review_prompt import review_data
from agent_egress.policy.review_signals import registrable_domain
from mitmproxy import http

from .approvals import Approvals
from .auditlog import AuditLog
from .connections import client_text
from .events import logged_path
from .pending import ApprovalError, Verdict, owners_of
from .review_state import Breaker, Pause, Recent, Siblings

logger = logging.getLogger(__name__)


class ModelReviewer(Protocol):
    model: str

    async def review(self, data: dict[str, Any]) -> ReviewAnswer: ...
    async def close(self) -> None: ...


ModelFactory = Callable[[AutoReviewPolicy], ModelReviewer]  # raises with a message on failure


def note(review: Review | None, state: str, rationale: str = "") -> dict[str, Any]:
    """What `pending` and `watch` show of a review beside the held request."""
    if review is None:
        return {"state": state, "rationale": rationale}
    return {"state": state, "reviewer": review.reviewer, "risk_level": review.risk_level,
            "rationale": review.rationale}


class AutoReview:
    def __init__(self, audit: AuditLog, approvals: Approvals,
                 model_factory: ModelFactory | None = None) -> None:
        self.audit = audit
        self.approvals = approvals
        self.model_factory = model_factory
        self.breaker = Breaker()
        self.siblings = Siblings()
        self.recent = Recent()
        self._rules: tuple[CompiledPolicy, RulesReviewer] | None = None
        self._model: tuple[AutoReviewPolicy, ModelReviewer | None, str] | None = None
        # What the model is to be asked about the pending approval about to open: first_look
        # and the hold that opens it run with no await between, so one slot is enough (and a
        # request refused by the queue limits leaves nothing behind but this slot).
        self._consult_next: tuple[tuple[str, int], tuple[Any, ...]] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        approvals.subscribe(self._pending_event)
        audit.add_sink(self._event)

    # -- the first look, before anything is held --------------------------------------------

    def first_look(self, policy: CompiledPolicy, flow: http.HTTPFlow, held: Decision,
                   agent: str | None) -> tuple[Verdict | None, dict[str, Any] | None]:
        """A verdict the rules reviewer gives at once, or None with what to show a person."""
        settings = policy.settings.auto_review
        self._consult_next = None
        if not settings.enabled:
            return None, None
        owners = owners_of(flow, agent)
        if (pause := self.breaker.paused_for(owners)) is not None:
            return None, note(None, "paused", f"auto-review is paused for {pause.owner} after "
                                              f"{pause.denials} auto-denials")
        reviewer = self._rules_for(policy)
        request = flow.request
        connect = request.method == "CONNECT"
        siblings = 1 if is_ip_literal(held.host) else self.siblings.seen(
            owners, registrable_domain(held.host), held.host)
        asked = ReviewRequest(held.host, held.port, agent, None if connect else request.method,
                              None if connect else logged_path(request.path), siblings)
        started = time.perf_counter()
        review = reviewer.review(asked, settings.max_risk)
        latency = (time.perf_counter() - started) * 1000
        if not review.certain and settings.model_url:
            self._record(review, asked, latency, consulting="model")
            who = agent or (client_text(flow.client_conn) or "").rpartition(":")[0]
            self._consult_next = ((held.host, held.port), (asked, review, settings, owners, who))
            return None, note(review, "reviewing")
        self._record(review, asked, latency)
        if review.outcome == "escalate":
            return None, note(review, "escalated")
        actor = "auto-review:rules"
        if review.outcome == "allow":
            verdict = Verdict(Action.ALLOW, settings.scope, actor, detail=review.rationale)
            if settings.scope == "session":
                self.approvals.grant(held.host, held.port, verdict)
        else:
            verdict = Verdict(Action.DENY, "once", actor, detail=review.rationale)
            self._denied(owners, agent, settings)
        self.audit.emit("approval.decided", host=held.host, port=held.port,
                        decision=verdict.action.value, scope=verdict.scope, actor=actor,
                        released=1, agent=agent, wait_ms=round(latency, 3))
        return verdict, None

    def _rules_for(self, policy: CompiledPolicy) -> RulesReviewer:
        if self._rules is None or self._rules[0] is not policy:
            self._rules = (policy, RulesReviewer.build(policy))
        return self._rules[1]

    # -- the model, while the request is held -----------------------------------------------

    def _pending_event(self, message: dict[str, Any]) -> None:
        pending = message.get("pending", {})
        if message.get("event") != "pending.opened" or pending.get("request_rule"):
            return
        if self._consult_next is None or self._consult_next[0] != (pending["host"],
                                                                   pending["port"]):
            return
        consult = self._consult_next[1]
        self._consult_next = None
        task = asyncio.get_running_loop().create_task(self._consult(pending["id"], *consult))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _consult(self, approval_id: str, asked: ReviewRequest, rules: Review,
                       settings: AutoReviewPolicy, owners: tuple[str, ...], who: str) -> None:
        started = time.perf_counter()
        error = None
        model, name = self._model_for(settings)
        try:
            if model is None:
                raise RuntimeError(name)
            answer = await model.review(review_data(asked, rules, self.recent.of(who)))
            review = bounded(answer, rules, settings.max_risk, model.model)
        except Exception as exc:  # every failure leaves the request to a person
            error = getattr(exc, "code", "unavailable")
            review = Review("model", rules.risk_level, "escalate",
                            f"the model reviewer gave no usable answer ({error}: {exc}); a "
                            "person decides", rules.signals, model=settings.model)
        latency = (time.perf_counter() - started) * 1000
        self._record(review, asked, latency, approval_id=approval_id, error=error)
        actor = "auto-review:model"
        try:
            if review.outcome == "allow":
                self.approvals.decide(approval_id, "allow", settings.scope, actor,
                                      detail=review.rationale)
            elif review.outcome == "deny":
                self.approvals.decide(approval_id, "deny", "once", actor,
                                      detail=review.rationale)
                self._denied(owners, asked.agent, settings)
            else:
                self.approvals.annotate(approval_id, note(review, "escalated"))
        except ApprovalError:
            pass  # a person (or the deadline) decided first

    def _model_for(self, settings: AutoReviewPolicy) -> tuple[ModelReviewer | None, str]:
        """The model client for these settings, made once per change of them."""
        if self._model is not None and self._model[0] == settings:
            return self._model[1], self._model[2]
        if self._model is not None and self._model[1] is not None:
            self._spawn(self._model[1].close())
        model, problem = None, ""
        try:
            if self.model_factory is None:
                raise RuntimeError("this proxy has no model client")
            model = self.model_factory(settings)
        except Exception as exc:
            problem = f"the model reviewer cannot be set up: {exc}"
            self.audit.emit("auto_review.model_unavailable", model_url=settings.model_url,
                            reason=str(exc))
        self._model = (settings, model, problem)
        return model, problem

    # -- the record and the circuit breaker -------------------------------------------------

    def _record(self, review: Review, asked: ReviewRequest, latency_ms: float,
                approval_id: str | None = None, **extra: Any) -> None:
        self.audit.emit("approval.reviewed", approval_id=approval_id, host=asked.host,
                        port=asked.port, agent=asked.agent, method=asked.method,
                        path=asked.path, reviewer=review.reviewer, model=review.model,
                        risk_level=review.risk_level, outcome=review.outcome,
                        proposed=review.proposed, rationale=review.rationale,
                        latency_ms=round(latency_ms, 3),
                        signals=[s.name for s in review.signals] or None,
                        **{k: v for k, v in extra.items() if v is not None})

    def _denied(self, owners: tuple[str, ...], agent: str | None,
                settings: AutoReviewPolicy) -> None:
        for pause in self.breaker.denied(owners, agent, settings.max_denials):
            self.audit.emit("auto_review.paused", owner=pause.owner, agent=agent,
                            denials=pause.denials, limit=settings.max_denials)
            self.approvals.broadcast({"event": "auto_review.paused", **_pause_fields(pause)})

    def resume(self, agent: str, actor: str) -> list[dict[str, Any]]:
        """A person resumes auto-review for an agent ("*": everyone); what was resumed."""
        resumed = [_pause_fields(p) for p in self.breaker.resume(agent)]
        self.audit.emit("auto_review.resumed", agent=agent, actor=actor,
                        owners=[p["owner"] for p in resumed])
        return resumed

    def paused(self) -> list[dict[str, Any]]:
        return [_pause_fields(p) for p in self.breaker.paused.values()]

    def _event(self, event: str, fields: dict[str, Any]) -> None:
        if event != "request.decided":
            return
        who = fields.get("agent") or str(fields.get("client") or "").rpartition(":")[0]
        if who:
            self.recent.add(who, {key: fields.get(key) for key in (
                "host", "port", "method", "decision", "reason")})

    def _spawn(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def done(self) -> None:
        if self._model is not None and self._model[1] is not None:
            await self._model[1].close()


def _pause_fields(pause: Pause) -> dict[str, Any]:
    return {"owner": pause.owner, "denials": pause.denials, "agents": sorted(pause.agents)}
