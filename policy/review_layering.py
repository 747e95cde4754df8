"""[approvals.auto_review] under a managed policy: what the user file may set.

The managed file's keys bind where it writes them (its model server, its key). The user may
only narrow: a lower `max_risk`, `once` instead of `session`, fewer `max_denials`. The
requirements `auto_review = "forbidden" | "allowed" | "required"` and `auto_review_max_risk`
bound the rest.
"""

from __future__ import annotations

from collections.abc import Callable

from .engine import AutoReviewPolicy
from .model import AutoReviewSettings
from .source import ParsedFile

Report = Callable[[str, str, str | None], None]  # key, message, requirement
_RISKS = ("low", "medium")
_SCOPES = ("once", "session")
_KEY = "approvals.auto_review"


def _table(parsed: ParsedFile) -> AutoReviewSettings:
    return parsed.model.approvals.auto_review


def _written(parsed: ParsedFile, key: str) -> bool:
    return ("auto_review" in parsed.model.approvals.model_fields_set
            and key in _table(parsed).model_fields_set)


def auto_review_policy(user: ParsedFile, managed: ParsedFile | None, report: Report,
                       approval_scopes: frozenset[str]) -> AutoReviewPolicy:
    mine = _table(user)
    if managed is None:
        return _policy(mine, mine.enabled, mine.max_risk, mine.scope, mine.max_denials,
                       approval_scopes, report)
    theirs = _table(managed)
    required = managed.model.requirements.auto_review if managed.model.requirements else None
    ceiling = managed.model.requirements.auto_review_max_risk if (
        managed.model.requirements) else None

    enabled = mine.enabled if _written(user, "enabled") else theirs.enabled
    if required == "forbidden":
        if mine.enabled:
            report(f"{_KEY}.enabled", "auto-review is forbidden", "auto_review")
        enabled = False
    elif required == "required":
        if _written(user, "enabled") and not mine.enabled:
            report(f"{_KEY}.enabled", "auto-review cannot be turned off", "auto_review")
        enabled = True

    def narrowed(key: str, order: tuple[str, ...], value: str, bound: str) -> str:
        if order.index(value) > order.index(bound):
            report(f"{_KEY}.{key}", f"{key} {value!r} is above the managed {bound!r}", None)
            return bound
        return value

    max_risk = mine.max_risk if _written(user, "max_risk") else theirs.max_risk
    if _written(managed, "max_risk"):
        max_risk = narrowed("max_risk", _RISKS, max_risk, theirs.max_risk)
    if ceiling is not None and _RISKS.index(max_risk) > _RISKS.index(ceiling):
        report(f"{_KEY}.max_risk", f"max_risk {max_risk!r} is above {ceiling!r}",
               "auto_review_max_risk")
        max_risk = ceiling
    scope = mine.scope if _written(user, "scope") else theirs.scope
    if _written(managed, "scope"):
        scope = narrowed("scope", _SCOPES, scope, theirs.scope)
    denials = min(mine.max_denials, theirs.max_denials) if _written(user, "max_denials") else (
        theirs.max_denials)

    merged = {key: getattr(theirs if _written(managed, key) else mine, key)
              for key in ("model_url", "model", "api_key", "timeout")}
    for key in ("model_url", "model", "api_key"):
        if _written(managed, key) and _written(user, key) and getattr(mine, key) != merged[key]:
            report(f"{_KEY}.{key}", f"the managed policy sets {key}", None)
    return _policy(AutoReviewSettings(**merged), enabled, max_risk, scope, denials,
                   approval_scopes, report)


def _policy(table: AutoReviewSettings, enabled: bool, max_risk: str, scope: str,
            max_denials: int, approval_scopes: frozenset[str],
            report: Report) -> AutoReviewPolicy:
    if enabled and scope not in approval_scopes:
        report(f"{_KEY}.scope", f"scope {scope!r} is not among the allowed approval scopes; "
                                "auto-approvals release only the waiting requests",
               "allowed_approval_scopes")
        scope = "once"
    return AutoReviewPolicy(
        enabled=enabled, max_risk=max_risk, scope=scope, model_url=table.model_url,
        model=table.model, api_key=table.api_key, timeout=table.timeout,
        max_denials=max_denials)
