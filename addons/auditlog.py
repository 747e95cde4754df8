"""The local audit log: one JSON object per line per event, written before the answer goes out.

Other sinks (OpenTelemetry) hang off the same ``emit`` so every sink sees the same event.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import IO, Any

import structlog
from agent_egress.policy.files import UnsafePath, open_append
from mitmproxy import ctx, exceptions

from .connections import listen_addresses

EVENT_SCHEMA_VERSION = 1
logger = logging.getLogger(__name__)


def _time_and_name_first(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
    return {"time": event.pop("time"), "event": event.pop("event"), **event}


def default_audit_log_path() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(state) / "agent-egress" / "audit.jsonl"


class AuditLog:
    """Writes events as JSON lines through structlog, flushed per line."""

    def __init__(self) -> None:
        self._file: IO[str] | None = None
        self._logger: Any = None
        self._sinks: list[Callable[[str, dict[str, Any]], None]] = []
        self._last_words: list[Callable[[], None]] = []

    def before_stop(self, last_words: Callable[[], None]) -> None:
        """Something to record when the proxy stops, before the log closes: mitmproxy calls
        `done` in addon order, and this addon comes first (it must be configured first)."""
        self._last_words.append(last_words)

    def add_sink(self, sink: Callable[[str, dict[str, Any]], None]) -> None:
        """Another receiver of every event (OpenTelemetry); it must never block."""
        self._sinks.append(sink)

    def load(self, loader: Any) -> None:
        loader.add_option(
            "audit_log", str, "",
            "Audit log file (JSON lines). '-' writes to standard output.",
        )

    def configure(self, updated: set[str]) -> None:
        if "audit_log" in updated:
            self.open(ctx.options.audit_log)

    def open(self, target: str) -> None:
        """Point the log at a file ('' = the default path, '-' = stdout)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if target == "-":
            stream: IO[str] = sys.stdout
        else:
            path = Path(target) if target else default_audit_log_path()
            try:
                # Never through a link, never a file or directory others could replace: an
                # agent that planted one would have the proxy append to any file it can write.
                stream = open_append(path, "--audit-log")
            except (OSError, UnsafePath) as exc:
                raise exceptions.OptionsError(f"cannot open the audit log: {exc}") from exc
            self._file = stream
        self._logger = structlog.wrap_logger(
            structlog.WriteLogger(stream),
            processors=[
                structlog.processors.TimeStamper(fmt="iso", utc=True, key="time"),
                _time_and_name_first,
                structlog.processors.JSONRenderer(sort_keys=False),
            ],
        )

    def emit(self, event: str, **fields: Any) -> None:
        """Record one event; fields that are None are left out."""
        if self._logger is None:
            return  # not configured yet, or already shut down
        present = {key: value for key, value in fields.items() if value is not None}
        # The local record first: written and flushed before the answer goes out.
        self._logger.msg(event, schema=EVENT_SCHEMA_VERSION, **present)
        for sink in self._sinks:
            try:
                sink(event, present)
            except Exception:  # a telemetry failure must never break proxying
                logger.exception("telemetry sink failed for %s", event)

    def running(self) -> None:
        self.emit("proxy.started", version=version("agent-egress"),
                  listen=listen_addresses(), socks=listen_addresses(socks=True) or None,
                  policy=ctx.options.policy_file or "built-in default policy")

    def done(self) -> None:
        for last_words in self._last_words:
            try:
                last_words()
            except Exception:  # the rest of the record, and the stop itself, still go out
                logger.exception("recording what was open at the stop failed")
        self.emit("proxy.stopped")
        if self._file is not None:
            self._file.close()
            self._file = None
        self._logger = None
