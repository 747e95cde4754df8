"""Approvals cannot be flooded: bounded pending approvals, and approvers that stop reading
are dropped rather than buffered for without limit. Raw sockets throughout, so nothing a
client library does (pooling, retries) hides what the proxy answers."""

from __future__ import annotations

import base64
import json
import select
import socket
import threading
import time
from pathlib import Path

import pytest
from holding import ask_policy, wait_pending
from proxyproc import ProxyProcess

MIB = 1024 * 1024


def limited_policy(*ports: int, total: int, per_agent: int) -> str:
    return ask_policy(*ports).replace(
        "[approvals]\n",
        f"[approvals]\nmax_pending = {total}\nmax_pending_per_agent = {per_agent}\n")


def send_connect(proxy: ProxyProcess, host: str, port: int, source: str = "127.0.0.1",
                 agent: str | None = None) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=30,
                                    source_address=(source, 0))
    auth = ""
    if agent is not None:
        token = base64.b64encode(f"{agent}:x".encode()).decode()
        auth = f"Proxy-Authorization: Basic {token}\r\n"
    sock.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n{auth}\r\n".encode())
    return sock


def answered(sockets: list[socket.socket], expect: int = 0,
             wait: float = 1.0) -> dict[socket.socket, bytes]:
    """The complete answers (the proxy closes after a 403) within `wait` seconds, returning as
    soon as `expect` are in; held requests are not answered."""
    data = {sock: b"" for sock in sockets}
    done: dict[socket.socket, bytes] = {}
    deadline = time.monotonic() + wait
    while (remaining := deadline - time.monotonic()) > 0 and (not expect or len(done) < expect):
        waiting = [s for s in sockets if s not in done]
        for sock in select.select(waiting, [], [], remaining)[0]:
            chunk = sock.recv(65536)
            if chunk:
                data[sock] += chunk
            else:
                done[sock] = data[sock]
    return done


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def pending_list(proxy: ProxyProcess) -> list[dict]:
    result = proxy.cli("pending", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


class Subscriber:
    """A raw `subscribe` connection; reads (and keeps) every line, or never reads at all."""

    def __init__(self, path: Path, reading: bool = True) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        if not reading:  # the smallest buffers the kernel allows: the proxy's own fills first
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
        self.sock.connect(str(path))
        self.sock.sendall(b'{"v": 1, "op": "subscribe"}\n')
        self.messages: list[dict] = []
        if reading:
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        with self.sock.makefile("rb") as stream:
            for line in stream:
                self.messages.append(json.loads(line))

    def events(self, name: str) -> list[dict]:
        return [m for m in list(self.messages) if m.get("event") == name]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def limited(tmp_path, tls_origin, plain_origin):
    process = ProxyProcess(tmp_path / "p", limited_policy(tls_origin.port, plain_origin.port,
                                                          total=6, per_agent=3),
                           env={"HOME": str(tmp_path)})
    yield process
    process.stop()


def test_pending_approvals_are_bounded_per_client_and_agent(limited, tls_origin):
    port = tls_origin.port
    watcher = Subscriber(limited.socket_path)
    held: list[socket.socket] = []
    try:
        # One client, no agent name: three destinations are held, the rest refused.
        flood = [send_connect(limited, f"flood-{i}.test", port, "127.0.0.2") for i in range(10)]
        replies = answered(flood, expect=7, wait=10)
        assert len(replies) == 7
        for reply in replies.values():
            assert reply.startswith(b"HTTP/1.1 403"), reply
            assert b"reason: approval_queue_full" in reply
            assert b"approvals.max_pending_per_agent = 3" in reply
        held += [s for s in flood if s not in replies]
        mine = pending_list(limited)
        assert len(mine) == 3 and {p["client"].split(":")[0] for p in mine} == {"127.0.0.2"}
        # A request for a destination already pending joins it, even with the client at its
        # limit.
        joined = send_connect(limited, mine[0]["host"], port, "127.0.0.2")
        held.append(joined)
        assert answered([joined]) == {}
        wait_pending(limited, lambda p: p["id"] == mine[0]["id"] and p["waiting"] == 2)
        # A new agent name, or another loopback address, is still the same local client: a
        # local agent cannot reset its count by renaming itself or binding 127.0.0.3.
        dodges = [send_connect(limited, "named.test", port, "127.0.0.2", agent="alpha"),
                  send_connect(limited, "other.test", port, "127.0.0.3")]
        replies = answered(dodges, expect=2, wait=10)
        assert len(replies) == 2
        assert all(b"client loopback already has 3" in r for r in replies.values())
        # Nothing refused was announced to approvers, held, or asked about.
        assert len(limited.events("approval.requested")) == 3
        wait_until(lambda: len(watcher.events("pending.opened")) == 3)
        time.sleep(0.3)
        assert len(watcher.events("pending.opened")) == 3
        refusals = [e for e in limited.events("request.decided")
                    if e.get("reason") == "approval_queue_full"]
        assert len(refusals) == 9 and all(e["decision"] == "deny" for e in refusals)
        # Once a person decides one, there is room again.
        assert limited.cli("deny", mine[1]["id"]).returncode == 0
        again = send_connect(limited, "again.test", port, "127.0.0.3")
        held.append(again)
        assert answered([again]) == {}
        wait_pending(limited, lambda p: p["host"] == "again.test")
    finally:
        watcher.close()
        for sock in held:
            sock.close()


def test_admission_counts_clients_agents_and_the_total() -> None:
    """Clients on other hosts (addresses a loopback test cannot have) and the total bound."""
    import asyncio

    from agent_egress.addons.approvals import Approvals
    from agent_egress.policy import Action, Decision, Reason
    from mitmproxy.test import tflow

    class Audit:
        def emit(self, *args, **kwargs) -> None:
            pass

    def flow(address: str):
        made = tflow.tflow()
        made.client_conn.peername = (address, 40000)
        return made

    async def scenario() -> list[str | None]:
        approvals = Approvals(Audit())  # type: ignore[arg-type]
        outcomes = []
        for index, (address, agent) in enumerate([
                ("10.0.0.1", None), ("10.0.0.1", None), ("10.0.0.1", "x"),  # client full at 2
                ("10.0.0.2", "a"), ("10.0.0.3", "a"), ("10.0.0.4", "a"),  # agent a full at 2
                ("10.0.0.5", None), ("10.0.0.6", None)]):                  # total full at 5
            held = Decision(Action.ASK, Reason.NEEDS_APPROVAL, f"h{index}.test", 443)
            verdict = approvals.admit(flow(address), held, agent, 5, 2)
            outcomes.append(verdict.detail if verdict else None)
            if verdict is None:
                asyncio.ensure_future(approvals.hold(flow(address), held, 60, agent))
                await asyncio.sleep(0)
        approvals.done()
        return outcomes

    outcomes = asyncio.run(scenario())
    assert outcomes[:2] == [None, None]
    assert "client 10.0.0.1 already has 2" in outcomes[2]
    assert outcomes[3:5] == [None, None] and "agent a already has 2" in outcomes[5]
    assert outcomes[6] is None
    assert "approvals.max_pending = 5" in outcomes[7]


def test_one_agent_flooding_1000_destinations_holds_20(tmp_path, tls_origin, plain_origin):
    """The defaults (100 in all, 20 per agent): one agent's flood reaches approvers as 20."""
    process = ProxyProcess(tmp_path / "p", ask_policy(tls_origin.port, plain_origin.port),
                           env={"HOME": str(tmp_path)})
    watcher = Subscriber(process.socket_path)
    sockets: list[socket.socket] = []
    try:
        # Several source addresses (fewer connections each), one agent name.
        for index in range(1000):
            sockets.append(send_connect(process, f"flood-{index}.test", tls_origin.port,
                                        f"127.0.1.{index % 5 + 1}", agent="flooder"))
            if index % 50 == 49:
                # Paced below the listen backlog (asyncio's 100): on a loaded 2-core machine a
                # burst of 1,000 connects overflows it and the kernel resets some, which is
                # not what this test is about.
                time.sleep(0.1)
        replies = answered(sockets, expect=980, wait=60)
        assert len(replies) == 980
        assert all(b"approval_queue_full" in r for r in replies.values())
        assert len(pending_list(process)) == 20
        time.sleep(0.5)
        assert len(watcher.events("pending.opened")) == 20
        assert len(process.events("approval.requested")) == 20
    finally:
        watcher.close()
        for sock in sockets:
            sock.close()
        process.stop()


def test_subscriber_that_stops_reading_is_dropped(tmp_path, tls_origin, plain_origin):
    process = ProxyProcess(tmp_path / "p", ask_policy(tls_origin.port, plain_origin.port),
                           env={"HOME": str(tmp_path)})
    slow = Subscriber(process.socket_path, reading=False)
    reader = Subscriber(process.socket_path)
    held: list[socket.socket] = []
    try:
        # Each request joining the pending approval sends every subscriber the approval, with
        # the first request's long path: 150 x 16 KiB = 2.4 MiB of events.
        path = "/" + "p" * 16 * 1024
        for _ in range(150):
            sock = socket.create_connection(("127.0.0.1", process.port), timeout=30)
            sock.sendall(f"GET http://ask.test:{plain_origin.port}{path} HTTP/1.1\r\n"
                         f"Host: ask.test:{plain_origin.port}\r\n\r\n".encode())
            held.append(sock)
        wait_pending(process, lambda p: p["waiting"] == 150, timeout=30)
        dropped = process.wait_for_event(
            lambda e: e["event"] == "approval.subscriber_dropped", timeout=10)
        assert MIB < dropped["buffered"] < 2 * MIB
        assert len(process.events("approval.subscriber_dropped")) == 1  # the reader stays
        # The slow subscriber gets what was buffered, then the end of the connection.
        received = 0
        slow.sock.settimeout(10)
        while True:
            try:
                chunk = slow.sock.recv(MIB)
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += len(chunk)
        assert received < 2 * MIB
        # The reading subscriber saw every request arrive, and the proxy answers as before.
        wait_until(lambda: len(reader.events("pending.updated")) == 149)
        assert "released 150 waiting requests" in process.cli("approve", "ask.test").stdout
    finally:
        slow.close()
        reader.close()
        for sock in held:
            sock.close()
        process.stop()
