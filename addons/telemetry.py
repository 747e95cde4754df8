"""Every audit event, also as an OpenTelemetry log record; decisions also as metrics.

Attribute names follow the OTel semantic conventions where they exist (server.address,
url.path, ...) and the `agent_egress.*` namespace for the rest. The sink never blocks the
proxy: records go to a bounded batch queue exported from another thread.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Protocol

from opentelemetry._logs import SeverityNumber
from opentelemetry.metrics import CallbackOptions, Observation

_SEMCONV = {
    "host": "server.address",
    "port": "server.port",
    "scheme": "url.scheme",
    "method": "http.request.method",
    "path": "url.path",
    "decision": "agent_egress.decision",
    "rule": "agent_egress.rule",
    "rule_origin": "agent_egress.rule.origin",
    "layer": "agent_egress.layer",
    "reason": "agent_egress.reason",
    "approval_id": "agent_egress.approval.id",
    "actor": "agent_egress.approval.actor",
    "approval_actor": "agent_egress.approval.actor",
    "scope": "agent_egress.approval.scope",
    "approval_scope": "agent_egress.approval.scope",
    "agent": "agent_egress.agent",
}
_SKIPPED = {"time", "schema"}


def otel_attributes(fields: dict[str, Any]) -> dict[str, Any]:
    """Audit-log fields as OTel attributes."""
    attributes: dict[str, Any] = {}
    for key, value in fields.items():
        if key in _SKIPPED or value is None:
            continue
        if key == "client" and isinstance(value, str):
            address, _, port = value.rpartition(":")
            attributes["client.address"] = address.strip("[]")
            if port.isdigit():
                attributes["client.port"] = int(port)
            continue
        name = _SEMCONV.get(key, f"agent_egress.{key}")
        if isinstance(value, dict):
            value = json.dumps(value, sort_keys=True)
        elif isinstance(value, list):
            value = [str(item) for item in value]
        attributes[name] = value
    if fields.get("scheme") in ("http", "https", "connect"):
        attributes["network.protocol.name"] = "http"
    elif fields.get("scheme") == "socks5":
        attributes["network.protocol.name"] = "socks"
    return attributes


_CODEX_PROTOCOL = {"http": "http", "https": "http", "connect": "https_connect",
                   "socks5": "socks5_tcp"}


def codex_attributes(fields: dict[str, Any]) -> dict[str, Any]:
    """A decision's attributes under the names Codex's network proxy gives its policy decision
    events, so that dashboards built for those read ours (both sets are sent)."""
    decision = fields.get("decision")
    person_or_reviewer = fields.get("approval_actor") not in (None, "timeout", "limit")
    return {
        "network.policy.scope": "domain_rule",
        "network.policy.decision": "ask" if decision == "held" else decision,
        "network.policy.reason": fields.get("reason"),
        "network.policy.source": "decider" if person_or_reviewer else "baseline_policy",
        "network.transport.protocol": _CODEX_PROTOCOL.get(fields.get("scheme") or "", "http"),
        "http.request.method": fields.get("method") or "none",
    }


def _body(event: str, fields: dict[str, Any]) -> str:
    if event == "request.decided":
        return (f"{fields.get('decision')} {fields.get('host')}:{fields.get('port')} "
                f"({fields.get('reason')})")
    if event == "approval.reviewed":
        return (f"{fields.get('reviewer')} review of {fields.get('host')}:{fields.get('port')}"
                f": {fields.get('risk_level')} risk, {fields.get('outcome')}")
    return event


class Providers(Protocol):
    """The OTel providers the sink writes to (proxy/telemetry.py's Telemetry): the SDK's types,
    which are imported only when export is on."""

    logger_provider: Any
    meter_provider: Any


class TelemetrySink:
    """Receives every event from the audit log and hands it to the OTel SDK."""

    def __init__(self, telemetry: Providers, open_tunnels: Callable[[], int],
                 pending_approvals: Callable[[], int]) -> None:
        self.telemetry = telemetry
        self._logger = telemetry.logger_provider.get_logger("agent_egress")
        self._decisions = self._wait = self._reviews = None
        provider = telemetry.meter_provider
        if provider is None:
            return
        meter = provider.get_meter("agent_egress")
        self._decisions = meter.create_counter(
            "agent_egress.decisions", unit="{decision}",
            description="Requests decided, by decision, layer and reason")
        self._wait = meter.create_histogram(
            "agent_egress.approval.wait_time", unit="s",
            description="Time from a held request to a person's (or the timeout's) decision")

        self._reviews = meter.create_counter(
            "agent_egress.auto_review.reviews", unit="{review}",
            description="Held destinations reviewed by auto-review, by reviewer, risk, outcome")

        def gauge(read: Callable[[], int]) -> Callable[[CallbackOptions], list[Observation]]:
            return lambda options: [Observation(read())]

        meter.create_observable_gauge("agent_egress.tunnels.open", [gauge(open_tunnels)],
                                      unit="{tunnel}", description="Open CONNECT tunnels")
        meter.create_observable_gauge("agent_egress.approvals.pending",
                                      [gauge(pending_approvals)], unit="{approval}",
                                      description="Pending approvals")
        meter.create_observable_counter(
            "agent_egress.telemetry.dropped", [gauge(lambda: telemetry.dropped)],
            unit="{record}", description="Log records dropped because the export queue was full")

    def on_event(self, event: str, fields: dict[str, Any]) -> None:
        attributes = otel_attributes(fields)
        if event == "request.decided":
            attributes.update({key: value for key, value in codex_attributes(fields).items()
                               if value is not None})
        severity = (SeverityNumber.ERROR if fields.get("severity") == "high" else
                    SeverityNumber.WARN if fields.get("decision") == "deny" else
                    SeverityNumber.INFO)  # high: a credential sent where it may not go
        self._logger.emit(
            event_name=f"agent_egress.{event}", body=_body(event, fields),
            severity_number=severity, severity_text=severity.name, attributes=attributes)
        if event == "request.decided" and self._decisions is not None:
            self._decisions.add(1, {
                "agent_egress.decision": str(fields.get("decision")),
                "agent_egress.layer": str(fields.get("layer") or "none"),
                "agent_egress.reason": str(fields.get("reason")),
            })
        elif event == "approval.reviewed" and self._reviews is not None:
            self._reviews.add(1, {
                "agent_egress.reviewer": str(fields.get("reviewer")),
                "agent_egress.risk_level": str(fields.get("risk_level")),
                "agent_egress.outcome": str(fields.get("outcome")),
            })
        elif event == "approval.decided" and self._wait is not None and "wait_ms" in fields:
            self._wait.record(fields["wait_ms"] / 1000, {
                "agent_egress.decision": str(fields.get("decision")),
                "agent_egress.approval.scope": str(fields.get("scope")),
            })
