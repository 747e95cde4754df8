"""OpenTelemetry setup: providers and OTLP exporters from the standard OTEL_* environment
variables and the policy files' `[telemetry]` tables (explicit keys win; managed over user).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from dataclasses import dataclass, field
from importlib.metadata import version
from typing import Any

from agent_egress.policy.engine import TelemetryPolicy

# The SDK, its exporters and requests are imported where a Telemetry is built: a proxy with
# export off never loads them (several MiB of resident memory it would carry for nothing).

SHUTDOWN_SECONDS = 3.0


class TelemetryConfigError(Exception):
    """Telemetry is required but cannot be set up; the message says what to configure."""


@dataclass
class TelemetryConfig:
    enabled: bool
    endpoint: str | None
    protocol: str
    headers: dict[str, str] = field(default_factory=dict)
    resource_attributes: dict[str, str] = field(default_factory=dict)
    required: bool = False


def _env_headers() -> dict[str, str]:
    # The SDK's own parser: comma-separated key=value pairs, URL-decoded as the spec says.
    from opentelemetry.util.re import parse_env_headers

    return dict(parse_env_headers(os.environ.get("OTEL_EXPORTER_OTLP_HEADERS", ""),
                                  liberal=True))


def telemetry_config(files: TelemetryPolicy, required: bool) -> TelemetryConfig:
    """The export's settings: what the policy files say (already layered), else the
    environment. A managed `enabled` and `telemetry_required` are final."""
    endpoint = files.endpoint or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    protocol = files.protocol or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    env_disabled = os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"
    enabled = files.enabled if files.enabled is not None else bool(endpoint) and not (
        env_disabled)
    if required:
        enabled = True  # a user (or OTEL_SDK_DISABLED) cannot turn it off
        if not endpoint:
            raise TelemetryConfigError(
                "the managed policy requires telemetry (telemetry_required) but no OTLP "
                "endpoint is configured: set OTEL_EXPORTER_OTLP_ENDPOINT or "
                "[telemetry] endpoint")
    if protocol not in ("http/protobuf", "grpc"):
        raise TelemetryConfigError(f"OTLP protocol {protocol!r} is not supported; use "
                                   "http/protobuf or grpc")
    return TelemetryConfig(bool(enabled), endpoint, protocol,
                           {**_env_headers(), **files.headers},
                           dict(files.resource_attributes), required)


def counting_batch_processor(exporter: Any, on_drop: Any, **kwargs: Any) -> Any:
    """The SDK's batch processor, bounded, counting what it drops and warning once."""
    from opentelemetry.sdk._logs.export import BatchLogRecordProcessor

    class CountingBatchProcessor(BatchLogRecordProcessor):
        _warned = False

        def on_emit(self, log_record: Any) -> None:
            batch = getattr(self, "_batch_processor", None)
            queue = getattr(batch, "_queue", None)
            limit = getattr(batch, "_max_queue_size", None)
            if queue is not None and limit is not None and len(queue) >= limit:
                on_drop(1)
                if not self._warned:
                    self._warned = True
                    logging.getLogger(__name__).warning(
                        "telemetry queue full (collector slow or unreachable): dropping log "
                        "records; the audit log still has every event")
                return
            super().on_emit(log_record)

    return CountingBatchProcessor(exporter, **kwargs)


class Telemetry:
    """The OTel providers for one proxy run."""

    def __init__(self, config: TelemetryConfig, agent: str | None = None) -> None:
        from opentelemetry.sdk._logs import LoggerProvider
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
        from opentelemetry.sdk.resources import OTELResourceDetector, Resource

        self.config = config
        if config.required:
            # The SDK obeys OTEL_SDK_DISABLED on its own; a managed requirement outranks it.
            os.environ.pop("OTEL_SDK_DISABLED", None)
        attributes = {"service.name": "agent-egress", "service.version": version("agent-egress"),
                      "host.name": socket.gethostname()}
        if agent:
            attributes["agent_egress.agent"] = agent
        detected = OTELResourceDetector().detect()  # OTEL_RESOURCE_ATTRIBUTES, OTEL_SERVICE_NAME
        self.resource = Resource.create(attributes).merge(detected).merge(
            Resource(config.resource_attributes))
        self.dropped = 0
        # Our own bounded shutdown replaces the SDK's exit hooks (which wait up to 30 s).
        self.logger_provider = LoggerProvider(resource=self.resource, shutdown_on_exit=False)
        self.meter_provider: MeterProvider | None = None
        if not config.enabled:
            return
        log_exporter, metric_exporter = self._exporters()
        self.logger_provider.add_log_record_processor(counting_batch_processor(
            log_exporter, self._count_drop, max_queue_size=2048, schedule_delay_millis=1000))
        interval = int(os.environ.get("OTEL_METRIC_EXPORT_INTERVAL", "10000"))
        reader = PeriodicExportingMetricReader(metric_exporter, export_interval_millis=interval)
        self.meter_provider = MeterProvider(resource=self.resource, metric_readers=[reader],
                                            shutdown_on_exit=False)

    def _count_drop(self, count: int) -> None:
        self.dropped += count

    def _exporters(self) -> tuple[Any, Any]:
        endpoint = self.config.endpoint
        headers = self.config.headers or None
        if self.config.protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
                OTLPMetricExporter,
            )

            insecure = bool(endpoint and endpoint.startswith("http://"))
            return (OTLPLogExporter(endpoint=endpoint, headers=headers, insecure=insecure),
                    OTLPMetricExporter(endpoint=endpoint, headers=headers, insecure=insecure))
        import requests
        from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

        base = (endpoint or "http://localhost:4318").rstrip("/")
        # The collector is reached directly, never through an HTTP(S)_PROXY in our environment.
        session = requests.Session()
        session.trust_env = False
        return (OTLPLogExporter(endpoint=f"{base}/v1/logs", headers=headers, session=session),
                OTLPMetricExporter(endpoint=f"{base}/v1/metrics", headers=headers,
                                   session=session))

    def shutdown(self) -> None:
        """Flush what can be flushed within SHUTDOWN_SECONDS, then let go."""
        budget_ms = int(SHUTDOWN_SECONDS * 1000)

        def close() -> None:
            self.logger_provider.force_flush(budget_ms)
            if self.meter_provider is not None:
                self.meter_provider.shutdown(timeout_millis=budget_ms)
            self.logger_provider.shutdown()

        worker = threading.Thread(target=close, name="telemetry-shutdown", daemon=True)
        worker.start()
        worker.join(SHUTDOWN_SECONDS)  # what is not out by then is dropped (daemon threads)
