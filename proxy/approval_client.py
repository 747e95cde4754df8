"""Client side of the approval socket, for the CLI (blocking, one connection per command)."""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .paths import default_socket_path

PROTOCOL_VERSION = 1


class ApprovalClientError(Exception):
    """The proxy could not be asked, or refused; the message says what to do."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code  # the proxy's error code, when it refused


class ApprovalClient:
    def __init__(self, path: Path, timeout: float | None = 10.0) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(str(path))
        except FileNotFoundError:
            raise ApprovalClientError(
                f"no approval socket at {path}: is 'agent-egress serve' running? "
                "(use --approval-socket PATH if it listens elsewhere)") from None
        except PermissionError:
            raise ApprovalClientError(
                f"permission denied on {path}: only the user running the proxy (and root) "
                "may approve requests") from None
        except OSError as exc:
            raise ApprovalClientError(f"cannot connect to {path}: {exc}") from None
        self._buffer = b""

    def fileno(self) -> int:
        return self._sock.fileno()

    def send(self, message: dict[str, Any]) -> None:
        self._sock.sendall(json.dumps({"v": PROTOCOL_VERSION, **message}).encode() + b"\n")

    def read_available(self) -> list[dict[str, Any]]:
        """One read from the socket (call when it is readable); the complete messages."""
        chunk = self._sock.recv(65536)
        if not chunk:
            raise ApprovalClientError("the proxy closed the approval connection")
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        return [self._parse(line) for line in lines if line.strip()]

    def receive(self) -> dict[str, Any]:
        while b"\n" not in self._buffer:
            try:
                chunk = self._sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                raise ApprovalClientError("the proxy closed the approval connection")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return self._parse(line)

    @staticmethod
    def _parse(line: bytes) -> dict[str, Any]:
        message = json.loads(line)
        if message.get("ok") is False:
            error = message.get("error", {})
            raise ApprovalClientError(error.get("message", "request refused"),
                                      error.get("code"))
        return message

    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        # The proxy may refuse us before reading; its reply, already sent, says why.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.send({"op": op, **fields})
        while True:
            message = self.receive()
            if "event" not in message:  # replies and events share the stream
                return message

    def events(self) -> Iterator[dict[str, Any]]:
        while True:
            yield self.receive()

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> ApprovalClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _answers(path: Path) -> bool:
    try:
        with ApprovalClient(path, timeout=2) as client:
            client.request("ping")
    except (ApprovalClientError, OSError, ValueError):
        return False
    return True


def find_socket(explicit: Path | None) -> Path:
    """The approval socket a command talks to: the one given; else the default one when a
    proxy answers there; else the one proxy `agent-egress run` started, if exactly one answers
    (its socket sits beside the default one). Several: the error lists them."""
    if explicit is not None:
        return explicit
    default = default_socket_path()
    if _answers(default):
        return default
    try:
        candidates = sorted(default.parent.glob("run-*.sock"))
    except OSError:
        return default
    live = [path for path in candidates if _answers(path)]
    if len(live) > 1:
        listed = ", ".join(str(path) for path in live)
        raise ApprovalClientError(f"several proxies started by 'agent-egress run' answer: "
                                  f"{listed}; choose one with --approval-socket PATH")
    return live[0] if live else default
