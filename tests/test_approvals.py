"""Holding unknown destinations for a person's approval, end to end over the real socket."""

from __future__ import annotations

import json
import os
import pty
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from holding import ask_policy, start_curl, wait_pending
from proxyproc import ProxyProcess


@pytest.fixture
def ask_proxy(tmp_path, tls_origin, plain_origin):
    process = ProxyProcess(tmp_path / "proxy", ask_policy(tls_origin.port, plain_origin.port))
    yield process
    process.stop()


def test_curl_waits_until_approved_then_reaches_origin(ask_proxy, tls_origin, client_env):
    url = f"https://ask.test:{tls_origin.port}/hello"
    curl = start_curl(client_env, ask_proxy, url)
    pending = wait_pending(ask_proxy, lambda p: p["host"] == "ask.test")
    assert pending["port"] == tls_origin.port and pending["scheme"] == "connect"
    assert pending["waiting"] == 1 and not pending["clients_gone"]
    time.sleep(0.5)
    assert curl.poll() is None  # still held
    listing = ask_proxy.cli("pending")
    assert f"{pending['id']}  ask.test:{tls_origin.port}  CONNECT" in listing.stdout
    result = ask_proxy.cli("approve", pending["id"])
    assert result.returncode == 0, result.stderr
    assert "released 1 waiting request" in result.stdout
    out, err = curl.communicate(timeout=30)
    assert curl.returncode == 0, err
    assert "hello from tls-origin" in out
    decided = ask_proxy.wait_for_event(lambda e: e["event"] == "approval.decided")
    assert decided["actor"] == f"uid:{os.getuid()}" and decided["scope"] == "once"
    allowed = ask_proxy.wait_for_event(lambda e: e.get("reason") == "approved")
    assert allowed["approval_id"] == pending["id"]
    held = ask_proxy.events("request.decided")[0]
    assert held["decision"] == "held" and held["reason"] == "needs_approval"
    # `once` does not carry over to the next request.
    second = start_curl(client_env, ask_proxy, url, "-v")
    wait_pending(ask_proxy, lambda p: p["host"] == "ask.test")
    assert ask_proxy.cli("deny", "ask.test").returncode == 0
    assert "< HTTP/1.1 403" in second.communicate(timeout=30)[1]


def test_deny_gives_403_and_origin_sees_nothing(ask_proxy, plain_origin, client_env):
    before = plain_origin.connections
    curl = start_curl(client_env, ask_proxy, f"http://ask.test:{plain_origin.port}/hello?t=x")
    pending = wait_pending(ask_proxy)
    assert (pending["method"], pending["path"]) == ("GET", "/hello")
    assert ask_proxy.cli("deny", f"ask.test:{plain_origin.port}").returncode == 0
    out, _ = curl.communicate(timeout=30)
    assert out.startswith("HTTP/1.1 403")
    assert "x-proxy-error: blocked-by-denylist" in out
    assert f"denied by uid:{os.getuid()} (once)" in out
    assert plain_origin.connections == before


def test_timeout_gives_403(tmp_path, plain_origin, tls_origin, client_env):
    process = ProxyProcess(tmp_path / "p", ask_policy(plain_origin.port, tls_origin.port,
                                                      timeout=1))
    try:
        started = time.monotonic()
        result = subprocess.run(["curl", "-sS", "-i", "-x", process.url,
                                 f"http://ask.test:{plain_origin.port}/"], env=client_env,
                                capture_output=True, text=True, timeout=30)
        assert 0.9 < time.monotonic() - started < 10
        assert result.stdout.startswith("HTTP/1.1 403")
        assert "reason: approval_timeout" in result.stdout
        assert "agent-egress approve ask.test" in result.stdout
        event = process.wait_for_event(lambda e: e["event"] == "approval.decided")
        assert event["actor"] == "timeout"
        assert json.loads(process.cli("pending", "--json").stdout) == []
    finally:
        process.stop()


def test_concurrent_requests_share_one_pending_and_one_decision(ask_proxy, tls_origin,
                                                                client_env):
    url = f"https://ask2.test:{tls_origin.port}/hello"
    curls = [start_curl(client_env, ask_proxy, url) for _ in range(4)]
    pending = wait_pending(ask_proxy, lambda p: p["waiting"] == 4)
    assert len(json.loads(ask_proxy.cli("pending", "--json").stdout)) == 1
    result = ask_proxy.cli("approve", pending["id"])
    assert "released 4 waiting requests" in result.stdout
    for curl in curls:
        out, err = curl.communicate(timeout=30)
        assert "hello from tls-origin" in out, err
    requested = ask_proxy.events("approval.requested")
    assert len(requested) == 1


def test_session_decision_applies_to_retry_after_client_gave_up(ask_proxy, plain_origin,
                                                                client_env):
    url = f"http://ask3.test:{plain_origin.port}/hello"
    # Like pip's 15 s default, but shorter: the client gives up before anyone answers.
    impatient = subprocess.run(["curl", "-sS", "-x", ask_proxy.url, "--max-time", "1", url],
                               env=client_env, capture_output=True, text=True, timeout=30)
    assert impatient.returncode == 28  # curl: operation timed out
    pending = wait_pending(ask_proxy, lambda p: p["clients_gone"])
    assert pending["waiting"] == 0 and "client gone" in ask_proxy.cli("pending").stdout
    result = ask_proxy.cli("approve", "ask3.test", "--scope", "session")
    assert result.returncode == 0, result.stderr
    assert json.loads(ask_proxy.cli("pending", "--json").stdout) == []
    retry = subprocess.run(["curl", "-sS", "-x", ask_proxy.url, "--max-time", "10", url],
                           env=client_env, capture_output=True, text=True, timeout=30)
    assert retry.stdout.startswith("hello from plain-origin"), retry.stderr
    event = ask_proxy.wait_for_event(lambda e: e.get("reason") == "approved")
    assert event["approval_scope"] == "session"


def test_session_decision_ahead_of_any_request(ask_proxy, plain_origin, client_env):
    assert ask_proxy.cli("deny", "ask4.test", "--scope", "session").returncode == 0
    result = subprocess.run(["curl", "-sS", "-i", "-x", ask_proxy.url, "--max-time", "10",
                             f"http://ask4.test:{plain_origin.port}/"], env=client_env,
                            capture_output=True, text=True, timeout=30)
    assert result.stdout.startswith("HTTP/1.1 403")
    assert ask_proxy.cli("approve", "nothing.test").returncode == 1  # once: nothing waits


def test_always_is_written_to_the_policy_file_and_survives_restart(
        tmp_path, tls_origin, plain_origin, client_env):
    workdir = tmp_path / "p"
    process = ProxyProcess(workdir, ask_policy(tls_origin.port, plain_origin.port))
    url = f"https://ask.test:{tls_origin.port}/hello"
    try:
        curl = start_curl(client_env, process, url)
        pending = wait_pending(process)
        result = process.cli("approve", pending["id"], "--scope", "always")
        assert result.returncode == 0, result.stderr
        assert "hello from tls-origin" in curl.communicate(timeout=30)[0]
        text = process.policy_path.read_text()
        assert '"ask.test",' in text or '"ask.test"' in text
        assert "# Hosts agents may always reach" in text  # comments kept
    finally:
        process.stop()
    restarted = ProxyProcess(workdir, None, "--config", str(process.policy_path))
    try:
        result = subprocess.run(["curl", "-sS", "-x", restarted.url, "--max-time", "10", url],
                                env=client_env, capture_output=True, text=True, timeout=30)
        assert result.stdout.startswith("hello from tls-origin"), result.stderr
        event = restarted.wait_for_event(lambda e: e.get("host") == "ask.test"
                                         and e.get("reason") == "allowlist")
        assert event["rule"] == "ask.test"
        assert len(restarted.events("approval.requested")) == 1  # only before the restart
    finally:
        restarted.stop()


def _list_as_nobody(socket_path: Path) -> str:
    """Ask the socket for the pending list from a forked child running as uid nobody."""
    from agent_egress.proxy.approval_client import ApprovalClient, ApprovalClientError

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.setgid(65534)
            os.setuid(65534)
            try:
                with ApprovalClient(socket_path) as client:
                    message = f"ok {client.request('list')}"
            except ApprovalClientError as exc:
                message = f"error {exc}"
            except Exception as exc:  # shown by the assertion in the parent
                message = f"crash {exc!r}"
            os.write(write_end, message.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    with os.fdopen(read_end) as pipe:
        return pipe.read()


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run a client as another user")
@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")
def test_socket_refuses_other_uids(tls_origin, plain_origin, tmp_path):
    base = Path(tempfile.mkdtemp(prefix="egress-sock-"))
    os.chmod(base, 0o711)
    socket_path = base / "run" / "approvals.sock"
    process = ProxyProcess(tmp_path / "p", ask_policy(tls_origin.port, plain_origin.port),
                           "--approval-socket", str(socket_path))
    try:
        assert (socket_path.parent.stat().st_mode & 0o777) == 0o700
        assert (socket_path.stat().st_mode & 0o777) == 0o600
        assert "error permission denied" in _list_as_nobody(socket_path)
        # Even if the file permissions are opened up by mistake, the uid check holds.
        os.chmod(socket_path.parent, 0o711)
        os.chmod(socket_path, 0o666)
        refused = _list_as_nobody(socket_path)
        assert refused == "error uid 65534 may not approve requests on this proxy"
        event = process.wait_for_event(lambda e: e["event"] == "approval.peer_refused")
        assert event["uid"] == 65534
    finally:
        process.stop()


def _socket_exchange(path: Path, payload: bytes) -> list[dict]:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return [json.loads(line) for line in data.splitlines()]


def test_malformed_socket_input_gets_errors_and_proxy_keeps_working(ask_proxy, plain_origin,
                                                                      client_env):
    path = ask_proxy.socket_path
    replies = _socket_exchange(path, b'not json\n[1]\n{"v": 2}\n{"v": 1, "op": "fly"}\n'
                                     b'{"v": 1, "op": "decide", "target": 5}\n'
                                     b'{"v": 1, "op": "ping"}\n')
    codes = [r.get("error", {}).get("code") for r in replies]
    assert codes == ["bad_json", "bad_request", "bad_version", "unknown_op", "bad_request", None]
    assert replies[-1] == {"v": 1, "ok": True, "pong": True}
    (too_large,) = _socket_exchange(path, b"x" * 100_000 + b"\n")
    assert too_large["error"]["code"] == "too_large"
    assert _socket_exchange(path, b'{"v": 1, "op": "list"}\n') == [
        {"v": 1, "ok": True, "pending": []}]
    result = subprocess.run(["curl", "-sS", "-x", ask_proxy.url,
                             f"http://allowed.test:{plain_origin.port}/hello"],
                            env=client_env, capture_output=True, text=True, timeout=30)
    assert result.stdout.startswith("hello from plain-origin")


def test_200_held_requests_do_not_delay_allowed_traffic(ask_proxy, tls_origin, plain_origin,
                                                        client_env):
    hosts = ["ask.test", "ask2.test", "ask3.test", "ask4.test"]
    sockets = []
    for index in range(200):
        sock = socket.create_connection(("127.0.0.1", ask_proxy.port), timeout=30)
        host = hosts[index % 4]
        sock.sendall(f"CONNECT {host}:{tls_origin.port} HTTP/1.1\r\n"
                     f"Host: {host}:{tls_origin.port}\r\n\r\n".encode())
        sockets.append(sock)
    try:
        wait_pending(ask_proxy, lambda p: p["waiting"] == 50 and p["host"] == "ask4.test",
                     timeout=30)
        timings = []
        for _ in range(10):
            started = time.monotonic()
            result = subprocess.run(["curl", "-sS", "-x", ask_proxy.url,
                                     f"https://allowed.test:{tls_origin.port}/hello"],
                                    env=client_env, capture_output=True, text=True, timeout=30)
            timings.append(time.monotonic() - started)
            assert result.stdout.startswith("hello from tls-origin"), result.stderr
        assert max(timings) < 5  # generous: a held request never blocks the event loop
        pending = json.loads(ask_proxy.cli("pending", "--json").stdout)
        assert sorted(p["host"] for p in pending) == hosts
        assert all(p["waiting"] == 50 for p in pending)
        for host in hosts:
            assert "released 50 waiting requests" in ask_proxy.cli("approve", host).stdout
        for sock in sockets:
            assert sock.recv(1024).startswith(b"HTTP/1.1 200")
    finally:
        for sock in sockets:
            sock.close()
    assert json.loads(ask_proxy.cli("pending", "--json").stdout) == []


def test_watch_without_terminal_prints_and_exits(ask_proxy, plain_origin, client_env):
    curl = start_curl(client_env, ask_proxy, f"http://ask.test:{plain_origin.port}/")
    pending = wait_pending(ask_proxy)
    result = ask_proxy.cli("watch")
    assert result.returncode == 0
    assert result.stdout.startswith(f"{pending['id']}  ask.test:{plain_origin.port}  HTTP GET /")
    assert "standard input is not a terminal" in result.stderr
    ask_proxy.cli("deny", pending["id"])
    curl.communicate(timeout=30)


@pytest.mark.filterwarnings("ignore:.*forkpty.*:DeprecationWarning")
def test_watch_in_a_terminal_takes_one_key_answers(ask_proxy, tls_origin, client_env):
    pid, fd = pty.fork()
    if pid == 0:  # the child: agent-egress watch on a real terminal
        os.execve(sys.executable, [sys.executable, "-m", "agent_egress.proxy", "watch",
                                   "--approval-socket", str(ask_proxy.socket_path)],
                  ask_proxy.env())
    output = bytearray()

    def read_until(marker: bytes, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while marker not in output:
            remaining = deadline - time.monotonic()
            assert remaining > 0, bytes(output)
            if select.select([fd], [], [], remaining)[0]:
                output.extend(os.read(fd, 4096))

    reader_ready = threading.Event()
    try:
        read_until(b"watching")
        reader_ready.set()
        curl = start_curl(client_env, ask_proxy, f"https://ask.test:{tls_origin.port}/hello")
        read_until(b"[q]uit?")
        assert b"ask.test:%d  CONNECT" % tls_origin.port in output
        os.write(fd, b"s")
        out, err = curl.communicate(timeout=30)
        assert "hello from tls-origin" in out, err
        read_until(b"-> allow")
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
    event = ask_proxy.wait_for_event(lambda e: e["event"] == "approval.decided")
    assert event["scope"] == "session"


def test_socket_in_an_existing_shared_directory_leaves_it_alone(tmp_path, tls_origin,
                                                                plain_origin):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)  # like /tmp
    process = ProxyProcess(tmp_path / "p", ask_policy(tls_origin.port, plain_origin.port),
                           "--approval-socket", str(shared / "a.sock"))
    try:
        assert (shared.stat().st_mode & 0o7777) == 0o1777
        assert ((shared / "a.sock").stat().st_mode & 0o777) == 0o600
    finally:
        process.stop()
    unsafe = tmp_path / "unsafe"
    unsafe.mkdir()
    os.chmod(unsafe, 0o777)
    result = subprocess.run([sys.executable, "-m", "agent_egress.proxy", "serve", "--listen",
                             "127.0.0.1:0", "--approval-socket", str(unsafe / "a.sock")],
                            capture_output=True, text=True, timeout=30, env=process.env())
    assert result.returncode == 2
    assert "is writable by other users (mode 0777)" in result.stderr
