"""An approver's side of a fleet's shared state (`pending`, `approve`, `deny`, `watch` with
`--state redis://...`): the same requests and events as the approval socket's client, answered
by Redis for every proxy on it.

It runs its own event loop in a thread (the state's operations are the proxies' own, in
addons/fleet_state.py); events and replies reach the caller through a queue, with a socket
pair to wake a select() loop like `watch`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import socket
import threading
from collections.abc import Iterator
from typing import Any

import redis.asyncio as aioredis
from agent_egress.addons import fleet_state as state
from agent_egress.addons.pending import ApprovalError

from .approval_client import ApprovalClientError


class StateClient:
    """ApprovalClient's interface (request, send, events, fileno, read_available) on Redis."""

    def __init__(self, url: str, timeout: float | None = 10.0) -> None:
        self.url = url
        self.where = state.display_url(url)
        self._timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._inbox: queue.Queue[dict[str, Any]] = queue.Queue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._subscription: asyncio.Task[None] | None = None
        self._redis: Any = None
        self._user = "default"
        try:
            self._run(self._connect())
        except BaseException:
            self.close()
            raise

    def _run(self, job: Any, timeout: float | None = None) -> Any:
        future = asyncio.run_coroutine_threadsafe(job, self._loop)
        try:
            return future.result(timeout or self._timeout)
        except ApprovalError as exc:
            raise ApprovalClientError(str(exc), exc.code) from None
        except TimeoutError:
            future.cancel()
            raise ApprovalClientError(f"the shared state {self.where} did not answer") from None
        except ApprovalClientError:
            raise
        except Exception as exc:  # redis' connection and authentication errors
            raise ApprovalClientError(f"shared state {self.where}: {exc}") from None

    async def _connect(self) -> None:
        self._redis = aioredis.from_url(self.url, socket_connect_timeout=5, socket_timeout=10,
                                        **state.password_from_environment(self.url))
        await self._redis.ping()
        self._user = await state.acl_user(self._redis)

    @property
    def actor(self) -> str:
        """Who decides: the Redis ACL user (authenticated by Redis) and the local account."""
        return state.actor_of(self._user, state.local_account())

    # -- requests --------------------------------------------------------------------------

    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        if op in ("list", "subscribe"):
            pending = self._run(state.list_pending(self._redis))
            if op == "subscribe":
                self._run(self._subscribe())
            return {"ok": True, "pending": pending, "subscribed": op == "subscribe"}
        if op == "decide":
            result = self._run(state.decide(self._redis, fields["target"], fields["decision"],
                                            fields.get("scope", "once"), self.actor))
            return {"ok": True, **result}
        if op == "ping":
            self._run(self._redis.ping())
            return {"ok": True, "pong": True}
        raise ApprovalClientError(f"{op!r} is answered by a proxy's approval socket, not by "
                                  "the shared state (drop --state)", "unsupported")

    def send(self, message: dict[str, Any]) -> None:
        """A request whose reply arrives with the events (as on the approval socket)."""
        fields = {k: v for k, v in message.items() if k != "op"}
        try:
            reply = self.request(str(message.get("op")), **fields)
        except ApprovalClientError as exc:
            reply = {"ok": False, "error": {"code": exc.code, "message": str(exc)}}
        self._deliver(reply)

    def _deliver(self, message: dict[str, Any]) -> None:
        self._inbox.put(message)
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    async def _subscribe(self) -> None:
        pubsub = self._redis.pubsub()
        await pubsub.subscribe(state.CHANNEL)
        self._subscription = asyncio.create_task(self._follow(pubsub))

    async def _follow(self, pubsub: Any) -> None:
        try:
            async for message in pubsub.listen():
                if message.get("type") != "message":
                    continue
                event = state.loads(message["data"])
                if event is not None and event.get("event") in ("pending.opened",
                                                                "pending.closed"):
                    self._deliver(event)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._deliver({"ok": False, "error": {
                "code": "disconnected", "message": f"lost the shared state {self.where}: {exc}"}})

    # -- reading events (ApprovalClient's interface) ---------------------------------------

    def fileno(self) -> int:
        return self._wake_r.fileno()

    def read_available(self) -> list[dict[str, Any]]:
        with contextlib.suppress(BlockingIOError):
            self._wake_r.recv(4096)
        messages = []
        while True:
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                return [self._checked(m) for m in messages]
            messages.append(message)

    @staticmethod
    def _checked(message: dict[str, Any]) -> dict[str, Any]:
        if message.get("ok") is False and message.get("error", {}).get("code") == "disconnected":
            raise ApprovalClientError(message["error"]["message"], "disconnected")
        return message

    def events(self) -> Iterator[dict[str, Any]]:
        while True:
            yield self._checked(self._inbox.get())

    def close(self) -> None:
        async def shutdown() -> None:
            if self._subscription is not None:
                self._subscription.cancel()
            if self._redis is not None:
                await self._redis.aclose()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> StateClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
