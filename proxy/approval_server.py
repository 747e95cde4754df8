"""The approval socket: newline-delimited JSON over a Unix socket, for people (not agents).

Only approvers may connect: the directory is 0700, the socket 0600, and the peer's uid
(SO_PEERCRED) must be an allowed approver. The agent must never be able to approve its own
requests, so in production it runs as another user or in another container.
See docs/approval-protocol.md.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import struct
import sys
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

from agent_egress.addons.approvals import Approvals
from agent_egress.addons.auditlog import AuditLog
from agent_egress.addons.autoreview import AutoReview
from agent_egress.addons.pending import ApprovalError
from agent_egress.policy import InvalidHost
from agent_egress.policy.model import AGENT_NAME

from .approval_client import PROTOCOL_VERSION
from .approval_socket import (
    Identity,
    SocketSetupError,
    bind_socket,
    clear_stale_socket,
    prepare_directory,
    release_socket,
)

__all__ = ["ApprovalServer", "SocketSetupError", "peer_uid"]  # SocketSetupError: for serve

logger = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024
# Events an approver has not read yet; past this it is dropped, not buffered for without end.
MAX_SUBSCRIBER_BUFFER = 1024 * 1024
# The socket file is ours to remove, and only while it still is the one we bound (3.13+ would
# otherwise remove it at close by its inode alone).
_KEEP_SOCKET_FILE: dict[str, Any] = {"cleanup_socket": False} if sys.version_info >= (3, 13) \
    else {}


def peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def _reply(ok: bool = True, **fields: Any) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "ok": ok, **fields}


def _error(code: str, message: str) -> dict[str, Any]:
    return _reply(False, error={"code": code, "message": message})


def separation(approvers: set[int], agent_uid: int | None) -> str:
    """Whether the agent can approve its own requests, in words for the banner and health."""
    uids = ", ".join(str(uid) for uid in sorted(approvers))
    if agent_uid is None:
        return (f"NOT SEPARATED unless the agent runs as another user: the approval socket "
                f"admits uids {uids}, and an agent running as one of them can approve its own "
                "requests (run it as another user: agent-egress run --agent-user USER)")
    if agent_uid in approvers:
        return (f"NOT SEPARATED: the agent runs as uid {agent_uid}, which the approval socket "
                "admits, so it can approve its own requests")
    return (f"separated: the agent runs as uid {agent_uid}, which the approval socket refuses "
            f"(approvers: uids {uids})")


class ApprovalServer:
    def __init__(self, approvals: Approvals, audit: AuditLog, path: Path,
                 approver_uids: Iterable[int] = (),
                 status: Callable[[], dict[str, Any]] | None = None,
                 agent_uid: int | None = None,
                 explain: Callable[[str], Awaitable[dict[str, Any]]] | None = None,
                 review: AutoReview | None = None,
                 fleet_decide: Callable[[str, str, str, str], Awaitable[dict[str, Any]]]
                 | None = None) -> None:
        self.approvals = approvals
        self.fleet_decide = fleet_decide  # serve --state: decisions go to every proxy
        self.review = review
        self.status = status
        self.audit = audit
        self.path = path
        self.approver_uids = {os.getuid(), 0, *approver_uids}
        self.agent_uid = agent_uid
        self.explain = explain
        self._server: asyncio.Server | None = None
        self._identity: Identity | None = None

    async def _explain(self, target: object) -> dict[str, Any]:
        if not isinstance(target, str):
            return _error("bad_request", "explain needs a string field target (HOST[:PORT])")
        if self.explain is None:
            return _error("unsupported", "this proxy cannot explain decisions")
        try:
            return _reply(explanation=await self.explain(target))
        except InvalidHost as exc:
            return _error("bad_target", str(exc))

    def full_status(self) -> dict[str, Any]:
        """The proxy's status (policy, reloads, file warnings) and who may approve."""
        return {**(self.status() if self.status else {}),
                "approvers": sorted(self.approver_uids),
                "agent_uid": self.agent_uid,
                "approval_separation": separation(self.approver_uids, self.agent_uid)}

    async def start(self) -> None:
        """Raises SocketSetupError (SocketInUseError if a live proxy answers on the path)."""
        prepare_directory(self.path.parent)
        await clear_stale_socket(self.path)
        sock, identity = bind_socket(self.path)
        try:
            self._server = await asyncio.start_unix_server(
                self._serve_client, sock=sock, limit=MAX_MESSAGE_BYTES, **_KEEP_SOCKET_FILE)
        except BaseException:
            sock.close()
            release_socket(self.path, identity)
            raise
        self._identity = identity

    async def stop(self) -> bool:
        """Stop answering; False if the path no longer is our socket (then it is left alone)."""
        if self._server is None or self._identity is None:
            return True
        self._server.close()
        return release_socket(self.path, self._identity)

    async def _serve_client(self, reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter) -> None:
        uid = peer_uid(writer.get_extra_info("socket"))
        if uid not in self.approver_uids:
            self.audit.emit("approval.peer_refused", uid=uid)
            await self._send(writer, _error(
                "forbidden", f"uid {uid} may not approve requests on this proxy"))
            writer.close()
            return
        subscription = None
        try:
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    await self._send(writer, _error(
                        "too_large", f"messages are limited to {MAX_MESSAGE_BYTES} bytes"))
                    break
                if not line:
                    break
                try:
                    response, subscribe = await self._handle(line, uid)
                except Exception as exc:  # a bug must not take the socket down with it
                    logger.exception("approval request failed")
                    response, subscribe = _error("internal", f"internal error: {exc!r}"), False
                if subscribe and subscription is None:
                    subscription = self._subscription(writer, uid)
                    self.approvals.subscribe(subscription)
                await self._send(writer, response)
        except (ConnectionError, OSError):
            pass
        finally:
            if subscription is not None:
                self.approvals.unsubscribe(subscription)
            writer.close()

    def _subscription(self, writer: asyncio.StreamWriter,
                      uid: int) -> Callable[[dict[str, Any]], None]:
        """Events for one approver, written without waiting: an approver that stops reading
        must not hold up the proxy, nor make it buffer without limit, so past
        MAX_SUBSCRIBER_BUFFER unread bytes it is dropped (it can reconnect and `list`)."""
        transport = writer.transport

        def send(event: dict[str, Any]) -> None:
            if transport.is_closing():
                return
            writer.write(json.dumps({"v": PROTOCOL_VERSION, **event}).encode() + b"\n")
            buffered = transport.get_write_buffer_size()
            if buffered <= MAX_SUBSCRIBER_BUFFER:
                return
            self.approvals.unsubscribe(send)
            self.audit.emit("approval.subscriber_dropped", uid=uid, buffered=buffered,
                            limit=MAX_SUBSCRIBER_BUFFER)
            transport.abort()  # discards what it holds; the reader loop sees the end

        return send

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
        writer.write(json.dumps(message).encode() + b"\n")
        await writer.drain()

    async def _handle(self, line: bytes, uid: int) -> tuple[dict[str, Any], bool]:
        try:
            request = json.loads(line)
        except ValueError as exc:
            return _error("bad_json", f"not a JSON object: {exc}"), False
        if not isinstance(request, dict):
            return _error("bad_request", "each message must be a JSON object"), False
        if request.get("v") != PROTOCOL_VERSION:
            return _error("bad_version", f"this proxy speaks protocol version "
                                         f"{PROTOCOL_VERSION}; send \"v\": 1"), False
        op = request.get("op")
        if op == "ping":
            return _reply(pong=True), False
        if op == "status":
            return _reply(status=self.full_status()), False
        if op == "explain":
            return await self._explain(request.get("target")), False
        paused = {"auto_review_paused": halted} if self.review and (
            halted := self.review.paused()) else {}
        if op == "list":
            return _reply(pending=self.approvals.snapshot(), **paused), False
        if op == "subscribe":
            return _reply(pending=self.approvals.snapshot(), subscribed=True, **paused), True
        if op == "resume_auto":
            agent = request.get("agent")
            if not isinstance(agent, str) or not (agent == "*" or AGENT_NAME.fullmatch(agent)):
                return _error("bad_request", "resume_auto needs a field agent: an agent name, "
                                             "or \"*\" for every agent"), False
            if self.review is None:
                return _error("unsupported", "this proxy has no auto-review"), False
            return _reply(resumed=self.review.resume(agent, actor=f"uid:{uid}")), False
        if op == "decide":
            target, decision = request.get("target"), request.get("decision")
            scope = request.get("scope", "once")
            if not all(isinstance(x, str) for x in (target, decision, scope)):
                return _error("bad_request",
                              "decide needs string fields target, decision and scope"), False
            try:
                if self.fleet_decide is not None:  # for every proxy on the shared state
                    result = await self.fleet_decide(target, decision, scope, f"uid:{uid}")
                else:
                    result = self.approvals.decide(target, decision, scope, actor=f"uid:{uid}")
            except ApprovalError as exc:
                return _error(exc.code, str(exc)), False
            return _reply(**result), False
        return _error("unknown_op", f"unknown op {op!r}; valid: ping, status, list, subscribe, "
                                    "decide, explain, resume_auto"), False
