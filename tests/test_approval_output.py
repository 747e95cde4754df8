"""What `pending` and `watch` show an approver: agent-chosen text escaped, floods summarised."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import socket
import struct
import sys
import termios
import time

import pytest
from agent_egress.proxy.approval_cli import describe
from conftest import TLS_NAMES
from proxyproc import ProxyProcess

RAW_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e"
                          "\u2066-\u2069]")


def pending(**fields) -> dict:
    item = {"id": "3f9c01ab", "host": "ask.test", "port": 443, "scheme": "connect",
            "method": None, "path": None, "client": "127.0.0.1:5000", "agent": None,
            "clients_gone": False, "waiting": 1, "expires_in": 97.4}
    return {**item, **fields}


HTTP = {"scheme": "http", "method": "GET"}


@pytest.mark.parametrize(("fields", "shown"), [
    ({}, "3f9c01ab  ask.test:443  CONNECT  from 127.0.0.1:5000  (1 waiting, 97s left)"),
    ({"agent": "\x1b[2J\x1b[H"}, "from 127.0.0.1:5000 agent=\\x1b[2J\\x1b[H  ("),
    ({"agent": "\x1b]0;pwned\x07"}, "agent=\\x1b]0;pwned\\x07  ("),
    ({**HTTP, "path": "/ok\r3f9c01ab  good.test:443  CONNECT"},
     "HTTP GET /ok\\x0d3f9c01ab  good.test:443  CONNECT  from"),
    ({**HTTP, "path": "/a\nb"}, "HTTP GET /a\\x0ab  from"),
    ({**HTTP, "path": "/\u202etxt.exe"}, "HTTP GET /\\u202etxt.exe  from"),
    ({"agent": "csi\x9b2J"}, "agent=csi\\x9b2J  ("),
    ({**HTTP, "path": "/nul\x00del\x7f"}, "HTTP GET /nul\\x00del\\x7f  from"),
    ({"agent": "back\\x1b"}, "agent=back\\\\x1b  ("),
    ({**HTTP, "path": "/a\tb"}, "HTTP GET /a\\x09b  from"),
    ({"host": "xn--80ak6aa92e.com"}, "3f9c01ab  xn--80ak6aa92e.com:443 (аррӏе.com)  CONNECT"),
    ({"host": "evil\x1b[2J.test"}, "3f9c01ab  evil\\x1b[2J.test:443  CONNECT"),
    ({"client": "127.0.0.1:1\x1b[1A"}, "from 127.0.0.1:1\\x1b[1A  ("),
    ({"method": "GET\x1b", "scheme": "http"}, "HTTP GET\\x1b  from"),
    ({"clients_gone": True}, "(client gone, 97s left)"),
])
def test_describe_escapes_agent_text(fields: dict, shown: str) -> None:
    line = describe(pending(**fields))
    assert shown in line
    assert not RAW_CONTROLS.search(line)


def test_describe_leaves_no_control_of_any_kind() -> None:
    every = "".join(chr(c) for c in range(0x3000))
    line = describe(pending(agent=every, path=every, method="GET", scheme="http"))
    assert not RAW_CONTROLS.search(line) and "\n" not in line and "\t" not in line


def test_pending_lists_hostile_requests_escaped_and_json_exact(tmp_path, plain_origin):
    from holding import ask_policy

    proxy = ProxyProcess(tmp_path / "p", ask_policy(plain_origin.port))
    # Hostile agent names are refused at the proxy (407, see test_fail_closed.py), and so are
    # control bytes in a request target (400): neither is ever put before a person.
    escape = socket.create_connection(("127.0.0.1", proxy.port), timeout=30)
    sockets = [escape]
    try:
        escape.sendall(f"GET http://ask.test:{plain_origin.port}/a\x1b[2J\x1b[H HTTP/1.1\r\n"
                       f"Host: ask.test:{plain_origin.port}\r\n\r\n".encode())
        assert escape.recv(4096).startswith(b"HTTP/1.1 400")
        event = proxy.wait_for_event(lambda e: e.get("reason") == "invalid_request")
        assert "control character" in event["detail"]
        sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=30)
        sock.sendall(b"CONNECT xn--80ak6aa92e.com:443 HTTP/1.1\r\n"
                     b"Host: xn--80ak6aa92e.com:443\r\n\r\n")
        sockets.append(sock)
        deadline = time.monotonic() + 15
        while len(items := json.loads(proxy.cli("pending", "--json").stdout)) < 1:
            assert time.monotonic() < deadline, items
            time.sleep(0.1)
        # --json is data: exactly what the agent sent.
        assert [item["host"] for item in items] == ["xn--80ak6aa92e.com"]
        listing = proxy.cli("pending")
        assert listing.returncode == 0, listing.stderr
        assert not RAW_CONTROLS.search(listing.stdout)
        assert len(listing.stdout.splitlines()) == 1
        assert "xn--80ak6aa92e.com:443 (аррӏе.com)  CONNECT" in listing.stdout
        for item in items:
            assert proxy.cli("deny", item["id"]).returncode == 0
    finally:
        for sock in sockets:
            sock.close()
        proxy.stop()


def flood_policy(port: int) -> str:
    resolve = "\n".join(f'"{name}" = "127.0.0.1"' for name in TLS_NAMES)
    return f"""version = 1
[network]
default = "ask"
allow = ["allowed.test"]
ports = [80, 443, {port}]
allowed_cidrs = ["127.0.0.0/8"]

[approvals]
timeout = 90
max_pending = 1000
max_pending_per_agent = 1000

[resolve]
{resolve}
"""


def hold(proxy: ProxyProcess, host: str, port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=30)
    sock.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
    return sock


@pytest.mark.filterwarnings("ignore:.*forkpty.*:DeprecationWarning")
def test_watch_summarises_a_flood_and_still_answers(tmp_path, tls_origin):
    proxy = ProxyProcess(tmp_path / "p", flood_policy(tls_origin.port))
    pid, fd = pty.fork()
    if pid == 0:  # the child: agent-egress watch on a real terminal
        os.execve(sys.executable, [sys.executable, "-m", "agent_egress.proxy", "watch",
                                   "--approval-socket", str(proxy.socket_path)], proxy.env())
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    output = bytearray()

    def read_until(marker: bytes, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while marker not in output:
            remaining = deadline - time.monotonic()
            assert remaining > 0, bytes(output[-3000:])
            if select.select([fd], [], [], remaining)[0]:
                output.extend(os.read(fd, 65536))

    def read_for(seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            if select.select([fd], [], [], remaining)[0]:
                output.extend(os.read(fd, 65536))

    sockets: list[socket.socket] = []
    try:
        read_until(b"watching")
        first = hold(proxy, "ask.test", tls_origin.port)
        sockets.append(first)
        read_until(b"[q]uit?")
        question_at, question_time = len(output), time.monotonic()
        flood = [hold(proxy, f"h{i}.flood.test", 443) for i in range(60)]
        sockets += flood
        deadline = time.monotonic() + 30
        while len(json.loads(proxy.cli("pending", "--json").stdout)) < 61:
            assert time.monotonic() < deadline
            read_for(0.1)
        read_until(b"(60 more waiting: h0.flood.test, h1.flood.test, ")
        read_for(2.5)  # the screen settles: no line per request
        during = bytes(output[question_at:])
        # At most a status line a second (before: two lines per request, 120 here).
        assert during.count(b"\n") <= 3 + (time.monotonic() - question_time), during
        assert len(during) < 4000, during
        assert b"also waiting" not in during
        assert b"\x1b[1A" in during  # redrawn in place, not appended
        for status in re.findall(rb"\(\d+ more waiting: [^\r\n]*\)", during):
            assert len(status.decode()) <= 99  # one terminal row: it can be redrawn

        os.write(fd, b"o")  # the question on screen is still the first one
        assert first.recv(1024).startswith(b"HTTP/1.1 200")
        read_until(b"-> allow")
        read_until(b"h0.flood.test:443  CONNECT")  # then the queue, in arrival order
        read_until(b"[q]uit?")
        os.write(fd, b"d")
        assert flood[0].recv(1024).startswith(b"HTTP/1.1 403")
        read_until(b"-> deny")
        read_until(b"h1.flood.test:443  CONNECT")
        read_until(b"(58 more waiting: h2.flood.test, ")
        os.write(fd, b"q")
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        try:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(fd)
        for sock in sockets:
            sock.close()
        proxy.stop()
