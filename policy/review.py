"""Auto-review of held destinations: the rules reviewer and the typed result every reviewer
gives (docs/auto-review.md).

The rules reviewer scores a destination from signals it can name: what the policy and the
presets already allow lowers the risk; services that take data without an account, raw IPs,
random-looking or imitating names, a burst of subdomains, odd ports and writes raise it. It is
built once per policy and decides in microseconds, without the network.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Annotated, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, StringConstraints

from .engine import Action, CompiledPolicy, Rule, RuleIndex
from .patterns import Kind, parse_pattern
from .presets import presets
from .review_signals import (
    LONG_LABEL,
    LONG_NAME,
    KnownLabels,
    generated_looking,
    imitated,
    mixed_scripts,
    random_looking,
    registrable_domain,
    review_data,
    skeleton,
)

RISKS = ("low", "medium", "high", "critical")
Risk = Literal["low", "medium", "high", "critical"]
Outcome = Literal["allow", "deny", "escalate"]
LOOKALIKE_INDEXED = 5000  # allowed names checked for one-letter imitations (~1 KiB each)
SUBDOMAIN_BURST = 5  # distinct unknown names under one domain from one agent: a DNS tunnel
# Presets not counted as known hosts unless the policy allows them: a push to an account the
# agent was handed is the classic way code leaves.
SOURCE_HOSTING = frozenset({"github", "gitlab"})
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE", "PROPPATCH", "MKCOL", "COPY",
                           "MOVE", "LOCK", "UNLOCK"})
_CATEGORY_TEXT = {
    "paste": "a paste site", "file-drop": "a file-drop service",
    "tunnel": "a tunnelling service", "webhook": "a webhook/request-capture service",
    "out-of-band": "an out-of-band interaction (OAST) service",
}


class Signal(NamedTuple):
    name: str  # e.g. "allowed_domain", "risky_service", "random_label"
    effect: Literal["lower", "raise", "critical"]
    text: str  # a phrase for the rationale


class ReviewRequest(NamedTuple):
    """What a reviewer is shown of a held request. ``siblings``: distinct held names under
    the same registrable domain from the same agent in the last minutes, this one included."""

    host: str
    port: int
    agent: str | None = None
    method: str | None = None  # known for plain HTTP and intercepted requests
    path: str | None = None
    siblings: int = 1


@dataclass(frozen=True, slots=True)
class Review:
    """A reviewer's verdict, as recorded (`approval.reviewed`)."""

    reviewer: Literal["rules", "model"]
    risk_level: Risk
    outcome: Outcome
    rationale: str
    signals: tuple[Signal, ...] = ()
    certain: bool = True  # the rules reviewer stands by it; if not, a model may be asked
    model: str | None = None
    proposed: Outcome | None = None  # what the model answered, where a bound changed it


class ReviewAnswer(BaseModel):
    """The JSON a model must answer with, validated strictly: nothing extra, nothing coerced."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    risk_level: Risk
    outcome: Outcome
    rationale: Annotated[str, StringConstraints(min_length=1, max_length=600)]


def risk_at_most(risk: str, ceiling: str) -> bool:
    return RISKS.index(risk) <= RISKS.index(ceiling)


def bound_model_answer(answer: ReviewAnswer, rules: Review, max_risk: str,
                       model: str) -> Review:
    """The model's answer within what a model may do: approve only at or below `max_risk`,
    and only what the rules found unremarkable (medium at most); deny or escalate freely."""
    outcome: Outcome = answer.outcome
    if outcome == "allow" and not (risk_at_most(answer.risk_level, max_risk)
                                   and risk_at_most(rules.risk_level, "medium")):
        outcome = "escalate"
    return Review("model", answer.risk_level, outcome, answer.rationale, rules.signals,
                  model=model, proposed=answer.outcome if outcome != answer.outcome else None)


class RulesReviewer:
    """Scores held destinations; built once per compiled policy (see build)."""

    def __init__(self, allowed_domains: frozenset[str], ecosystem: RuleIndex,
                 known_domains: frozenset[str], risky: dict[str, str]) -> None:
        self.allowed_domains = allowed_domains  # registrable domains the policy allows names in
        self.ecosystem = ecosystem  # every preset's patterns, enabled or not
        self.known_domains = known_domains  # allowed and ecosystem registrable domains
        allowed_labels = {d.split(".", 1)[0] for d in allowed_domains}
        ecosystem_labels = {d.split(".", 1)[0] for d in known_domains - allowed_domains}
        self.known_labels = KnownLabels(allowed_labels | ecosystem_labels, indexed=(
            ecosystem_labels | allowed_labels if len(allowed_labels) <= LOOKALIKE_INDEXED
            else ecosystem_labels))
        self.risky = risky  # domain -> category

    @classmethod
    def build(cls, policy: CompiledPolicy) -> RulesReviewer:
        # A domain counts as allowed when a rule allows the domain itself (pypi.org,
        # **.example.com): allowing one service of a large organisation (developer.mozilla.org,
        # dl.google.com) vouches for that service, not for its paste site or its forms.
        # (Not an in-label glob: `us-*.example.com` vouches for the names it matches only.)
        allowed = {key for layer in policy.layers for rule in layer.allow_rules
                   if rule.pattern.kind in (Kind.EXACT, Kind.SUBTREE, Kind.SUBTREE_AND_SELF)
                   and (key := rule.pattern.key) and registrable_domain(key) == key}
        ecosystem_rules = [
            Rule(parse_pattern(text), Action.ALLOW, f"preset {name!r}", index, "review")
            for name, preset in presets().items() if name not in SOURCE_HOSTING
            for index, text in enumerate(preset.allow)]
        ecosystem = {registrable_domain(rule.pattern.key) for rule in ecosystem_rules}
        risky = {domain: category for category, domains in review_data()["risky"].items()
                 for domain in domains}
        return cls(frozenset(allowed), RuleIndex.build(ecosystem_rules),
                   frozenset(allowed | ecosystem), risky)

    def review(self, request: ReviewRequest, max_risk: str) -> Review:
        signals = self.signals(request)
        if any(s.effect == "critical" for s in signals):
            score = 3
        else:
            score = (0 if any(s.effect == "lower" for s in signals) else 1) + sum(
                s.effect == "raise" for s in signals)
        risk: Risk = RISKS[min(score, 3)]  # type: ignore[assignment]
        # Unsure: medium with nothing known for it. The rules never approve that; a model
        # may be asked, else a person decides.
        certain = risk != "medium" or any(s.effect == "lower" for s in signals)
        if risk == "critical":
            outcome: Outcome = "deny"
        else:
            outcome = "allow" if certain and risk_at_most(risk, max_risk) else "escalate"
        said = "; ".join(s.text for s in signals) or (
            "an unknown destination with nothing known for or against it")
        return Review("rules", risk, outcome, f"{risk} risk: {said}.", tuple(signals),
                      certain=certain)

    def signals(self, request: ReviewRequest) -> list[Signal]:
        host, signals = request.host, []
        if is_ip_literal(host):
            signals.append(Signal("ip_literal", "raise", f"{host} is a raw IP address"))
        else:
            signals.extend(self._name_signals(host, request.siblings))
        if request.port not in (80, 443):
            signals.append(Signal("unusual_port", "raise", f"port {request.port} is not a "
                                                           "web port"))
        if request.method in WRITE_METHODS:
            signals.append(Signal("write_method", "raise", f"{request.method} sends data "
                                                           "(a write)"))
        return signals

    def _name_signals(self, host: str, siblings: int) -> list[Signal]:
        signals = []
        labels = host.split(".")
        for start in range(len(labels)):
            category = self.risky.get(".".join(labels[start:]))
            if category is not None:
                signals.append(Signal("risky_service", "critical", f"{'.'.join(labels[start:])}"
                                      f" is {_CATEGORY_TEXT[category]}"))
                break
        domain = registrable_domain(host)
        owner = domain.split(".", 1)[0]
        lowered = False
        if domain in self.allowed_domains:
            lowered = True
            signals.append(Signal("allowed_domain", "lower", f"{domain} is already allowed"))
        elif (rule := self.ecosystem.match_name(host, 443)) is not None:
            lowered = True
            signals.append(Signal("known_ecosystem", "lower",
                                  f"a known package/docs host ({rule.source})"))
        passes_for = skeleton(host)
        if passes_for is not None and passes_for != host and (
                registrable_domain(passes_for) in self.known_domains):
            signals.append(Signal("homograph", "critical",
                                  f"the Unicode name passes for {passes_for}"))
        elif mixed_scripts(host):
            signals.append(Signal("mixed_script", "raise", "a label mixes Latin letters with "
                                                           "Cyrillic or Greek ones"))
        if any(len(label) > LONG_LABEL for label in labels) or len(host) > LONG_NAME:
            signals.append(Signal("long_label", "raise", "the name is very long, as data "
                                                         "smuggled in a name is"))
        elif any(random_looking(label) for label in labels):
            signals.append(Signal("random_label", "raise", "a label looks random (encoded "
                                                           "data or a generated name)"))
        elif not lowered and generated_looking(owner):
            signals.append(Signal("generated_name", "raise", f"{domain} looks machine-"
                                                             "generated"))
        if not lowered and (imitates := imitated(owner, self.known_labels)) is not None:
            signals.append(Signal("lookalike", "raise", f"{domain} imitates {imitates}"))
        if siblings >= SUBDOMAIN_BURST and host != domain:
            signals.append(Signal("subdomain_burst", "raise", f"{siblings} distinct names "
                                  f"under {domain} from this agent (a DNS-tunnel shape)"))
        return signals


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True
