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
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

from agent_egress.policy import Action, CompiledPolicy, Decision
from agent_egress.policy.engine import AutoReviewPolicy
from agent_egress.policy.paths import display_path
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
from .pending import ApprovalError, Verdict, owners_of
from .review_state import Breaker, Pause, Recent, Siblings

logger = logging.getLogger(__name__)
MODEL_CALLS = 4  # at most this many questions to the model at once
MODEL_QUEUE = 64  # and at most this many waiting for one; beyond, a person decides at once


class ModelBusy(Exception):
    code = "busy"


class ModelReviewer(Protocol):
    model: str

    async def review(self, data: dict[str, Any]) -> ReviewAnswer: ...
    async def close(self) -> None: ...


ModelFactory = Callable[[AutoReviewPolicy], ModelReviewer]  # raises with a message on failure


def shortened_path(target: str) -> str:
    """A request's path as the reviewer (and a model) sees it: no query, at most 256
    characters."""
    path = display_path(target, limit=None)
    return path if len(path) <= 256 else f"{path[:256]}..."


def note(review: Review | None, state: str, rationale: str = "") -> dict[str, Any]:
    """What `pending` and `watch` show of a review beside the held request."""
    if review is None:
        return {"state": state, "rationale": rationale}
    return {"state": state, "reviewer": review.reviewer, "risk_level": review.risk_level,
            "rationale": review.rationale}


class FirstLook(NamedTuple):
    """What the rules reviewer made of a held request before anything is held."""

    verdict: Verdict | None = None  # decided at once
    note: dict[str, Any] | None = None  # else: what pending/watch show beside it
    consult: Callable[[str], None] | None = None  # the model to ask once it is held (by id)


class AutoReview:
    def __init__(self, audit: AuditLog, approvals: Approvals,
                 policy: Callable[[], CompiledPolicy | None],
                 model_factory: ModelFactory | None = None) -> None:
        self.audit = audit
        self.approvals = approvals
        self.policy = policy  # the policy in force, which a late model answer is checked against
        self.model_factory = model_factory
        self.breaker = Breaker()
        self.siblings = Siblings()
        self.recent = Recent()
        self._rules: tuple[CompiledPolicy, RulesReviewer] | None = None
        self._model: tuple[AutoReviewPolicy, ModelReviewer | None, str] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._model_calls = asyncio.Semaphore(MODEL_CALLS)
        self._queued = 0
        audit.add_sink(self._event)

    # -- the first look, before anything is held --------------------------------------------

    def first_look(self, policy: CompiledPolicy, flow: http.HTTPFlow, held: Decision,
                   agent: str | None) -> FirstLook:
        """A verdict the rules reviewer gives at once, or what to show a person (and, when
        the rules are unsure and a model is configured, the consult to start once held)."""
        settings = policy.settings.auto_review
        if not settings.enabled:
            return FirstLook()
        owners = owners_of(flow, agent)
        if (pause := self.breaker.paused_for(owners)) is not None:
            return FirstLook(note=note(None, "paused", f"auto-review is paused for "
                                                       f"{pause.owner} after {pause.denials} "
                                                       "auto-denials"))
        reviewer = self._rules_for(policy)
        request = flow.request
        connect = request.method == "CONNECT"
        siblings = 1 if is_ip_literal(held.host) else self.siblings.seen(
            owners, registrable_domain(held.host), held.host)
        asked = ReviewRequest(held.host, held.port, agent, None if connect else request.method,
                              None if connect else shortened_path(request.path), siblings)
        # An approval seen with its method (plain HTTP) is for that request alone: a read
        # approved for the session would let the next request, a write, through unreviewed.
        scope = "once" if asked.method else settings.scope
        started = time.perf_counter()
        review = reviewer.review(asked, settings.max_risk)
        latency = (time.perf_counter() - started) * 1000
        if not review.certain and settings.model_url:
            self._record(review, asked, latency, consulting="model")
            who = agent or (client_text(flow.client_conn) or "").rpartition(":")[0]
            return FirstLook(note=note(review, "reviewing"), consult=lambda approval_id: (
                self._spawn(self._consult(approval_id, asked, review, settings, scope, owners,
                                          who))))
        self._record(review, asked, latency)
        if review.outcome == "escalate":
            return FirstLook(note=note(review, "escalated"))
        actor = "auto-review:rules"
        if review.outcome == "allow":
            verdict = Verdict(Action.ALLOW, scope, actor, detail=review.rationale,
                              connect_only=connect)
            if scope == "session":
                self.approvals.grant(held.host, held.port, verdict)
        else:
            verdict = Verdict(Action.DENY, "once", actor, detail=review.rationale)
            self._denied(owners, agent, settings)
        self.audit.emit("approval.decided", host=held.host, port=held.port,
                        decision=verdict.action.value, scope=verdict.scope, actor=actor,
                        released=1, agent=agent, wait_ms=round(latency, 3))
        return FirstLook(verdict=verdict)

    def _rules_for(self, policy: CompiledPolicy) -> RulesReviewer:
        if self._rules is None or self._rules[0] is not policy:
            self._rules = (policy, RulesReviewer.build(policy))
        return self._rules[1]

    # -- the model, while the request is held -----------------------------------------------

    async def _consult(self, approval_id: str, asked: ReviewRequest, rules: Review,
                       settings: AutoReviewPolicy, scope: str, owners: tuple[str, ...],
                       who: str) -> None:
        """Ask the model; whatever goes wrong, the pending approval ends up before a person."""
        try:
            review = await self._ask_model(approval_id, asked, rules, settings, owners, who)
            if review is not None:
                self._apply(approval_id, review, asked, settings, scope, owners)
        except Exception:
            logger.exception("auto-review failed; the request goes to a person")
            with contextlib.suppress(ApprovalError):
                self.approvals.annotate(approval_id, note(
                    None, "escalated", "auto-review failed; a person decides"))

    async def _ask_model(self, approval_id: str, asked: ReviewRequest, rules: Review,
                         settings: AutoReviewPolicy, owners: tuple[str, ...],
                         who: str) -> Review | None:
        started = time.perf_counter()
        error = None
        model, problem = self._model_for(settings)
        try:
            if model is None:
                raise RuntimeError(problem)
            if self._queued >= MODEL_QUEUE:
                raise ModelBusy(f"{self._queued} reviews already wait for the model")
            self._queued += 1
            try:
                async with self._model_calls:  # a flood of held names queues, not of calls
                    if self.approvals.get(approval_id) is None:
                        return None  # decided (or expired) while it waited: nothing to ask
                    answer = await model.review(review_data(asked, rules, self.recent.of(who)))
            finally:
                self._queued -= 1
            review = bounded(answer, rules, settings.max_risk, model.model)
        except Exception as exc:  # every failure leaves the request to a person
            error = getattr(exc, "code", "unavailable")
            review = Review("model", rules.risk_level, "escalate",
                            f"the model reviewer gave no usable answer ({error}: {exc}); a "
                            "person decides", rules.signals, model=settings.model)
        if review.outcome == "allow" and (why := self._allow_withdrawn(settings, owners)):
            review = dataclasses.replace(review, outcome="escalate", proposed="allow",
                                         rationale=f"{review.rationale} (not applied: {why})")
        self._record(review, asked, (time.perf_counter() - started) * 1000,
                     approval_id=approval_id, error=error)
        return review

    def _allow_withdrawn(self, settings: AutoReviewPolicy,
                         owners: tuple[str, ...]) -> str | None:
        """Why a model's allow may no longer apply: the answer came after a change."""
        if (pause := self.breaker.paused_for(owners)) is not None:
            return f"auto-review paused for {pause.owner} meanwhile"
        policy = self.policy()
        if policy is None or policy.settings.auto_review != settings:
            return "the auto-review settings changed meanwhile"
        return None

    def _apply(self, approval_id: str, review: Review, asked: ReviewRequest,
               settings: AutoReviewPolicy, scope: str, owners: tuple[str, ...]) -> None:
        actor = "auto-review:model"
        try:
            # Released: only the requests like the one reviewed (a CONNECT, or a request with
            # its method); a write that joined a read is decided afresh.
            release = asked.method or "CONNECT"
            if review.outcome == "allow":
                self.approvals.decide(approval_id, "allow", scope, actor,
                                      detail=review.rationale, release=release,
                                      connect_only=asked.method is None)
            elif review.outcome == "deny":
                self.approvals.decide(approval_id, "deny", "once", actor,
                                      detail=review.rationale, release=release)
                self._denied(owners, asked.agent, settings)
            else:
                self.approvals.annotate(approval_id, note(review, "escalated"))
        except ApprovalError as exc:
            if exc.code != "unknown_id":  # not already decided by a person or the deadline
                raise

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
        """Each agent's decisions, kept for the model's context: only while one is used."""
        if event != "request.decided" or not self._model_in_use():
            return
        who = fields.get("agent") or str(fields.get("client") or "").rpartition(":")[0]
        if who:
            self.recent.add(who, fields)

    def _model_in_use(self) -> bool:
        policy = self.policy()
        return policy is not None and bool(policy.settings.auto_review.enabled
                                           and policy.settings.auto_review.model_url)

    def _spawn(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def done(self) -> None:
        if self._model is not None and self._model[1] is not None:
            await self._model[1].close()


def _pause_fields(pause: Pause) -> dict[str, Any]:
    return {"owner": pause.owner, "denials": pause.denials, "agents": sorted(pause.agents)}
