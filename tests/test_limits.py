"""What one agent cannot push past: head size and count, head time, open connections, and a
refused upload that must still get its 403 without being buffered."""

from __future__ import annotations

import contextlib
import subprocess
import time

import pytest
from conftest import policy_text
from proxyproc import ProxyProcess
from rawclient import closed_by_peer, connect, read_all, read_head


@pytest.fixture(scope="module")
def limited_proxy(tls_origin, plain_origin, tmp_path_factory):
    text = policy_text(tls_origin.port, plain_origin.port).replace(
        "[resolve]", "header_timeout = 2\nmax_connections_per_client = 4\n[resolve]")
    process = ProxyProcess(tmp_path_factory.mktemp("limits"), text)
    yield process
    process.stop()


def _refused(proxy: ProxyProcess, reason: str, after: int) -> dict:
    return proxy.wait_for_event(lambda e: e.get("reason") == reason, after=after, timeout=10)


@pytest.mark.parametrize("head", [
    "GET http://allowed.test:{port}/hello HTTP/1.1\r\nHost: allowed.test:{port}\r\n"
    "X-Big: " + "a" * 70_000 + "\r\n\r\n",
    "CONNECT allowed.test:{port} HTTP/1.1\r\n" + "X-Pad: " + "b" * 40_000 + "\r\n"
    + "X-Pad2: " + "c" * 40_000 + "\r\n\r\n",
    "GET http://allowed.test:{port}/hello HTTP/1.1\r\n" + "X-Never-Ends: " + "d" * 200_000,
    "GET http://allowed.test:{port}/hello HTTP/1.1\r\nHost: allowed.test:{port}\r\n"
    + "".join(f"X-H{i}: v\r\n" for i in range(201)) + "\r\n",
], ids=["one-huge-header", "connect-headers", "never-ending", "201-headers"])
def test_oversized_request_heads_get_431_and_are_closed(proxy, plain_origin, head) -> None:
    before, mark = len(plain_origin.requests), proxy.mark()
    sock = connect(proxy.port)
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        sock.sendall(head.format(port=plain_origin.port).encode())  # may be closed early
    answer = read_all(sock, timeout=5)
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    event = _refused(proxy, "request_head_too_large", mark)
    assert event["event"] == "connection.refused"
    assert len(plain_origin.requests) == before


def test_two_hundred_headers_are_fine(proxy, plain_origin) -> None:
    sock = connect(proxy.port)
    port = plain_origin.port
    sock.sendall((f"GET http://allowed.test:{port}/hello HTTP/1.1\r\nHost: allowed.test:{port}\r\n"
                  + "".join(f"X-H{i}: v\r\n" for i in range(198))
                  + "Connection: close\r\n\r\n").encode())
    answer = read_all(sock, timeout=5)
    # Passed on: the origin answers (Python's server itself stops at 100 headers).
    assert b"Server: SimpleHTTP" in answer and b"agent-egress" not in answer, answer[:300]


@pytest.mark.parametrize("chunked", [False, True])
def test_refused_large_upload_still_gets_its_403(proxy, plain_origin, tmp_path, client_env,
                                                 chunked) -> None:
    body = tmp_path / "upload.bin"
    body.write_bytes(b"x" * (5 * 1024 * 1024))  # above the 1 MiB streaming threshold
    args = ["curl", "-sS", "-i", "--max-time", "30", "-x", proxy.url,
            "--data-binary", f"@{body}", f"http://other.test:{plain_origin.port}/upload"]
    if chunked:
        args[1:1] = ["-H", "Transfer-Encoding: chunked"]
    before = len(plain_origin.requests)
    result = subprocess.run(args, env=client_env, capture_output=True, text=True, timeout=60)
    assert result.stdout.startswith("HTTP/1.1 403"), (result.stdout[:300], result.stderr)
    assert "reason: not_allowlisted" in result.stdout
    assert len(plain_origin.requests) == before


def test_allowed_large_upload_is_streamed_through(proxy, plain_origin, tmp_path,
                                                  client_env) -> None:
    body = tmp_path / "upload.bin"
    body.write_bytes(b"y" * (3 * 1024 * 1024))
    result = subprocess.run(
        ["curl", "-sS", "--max-time", "30", "-x", proxy.url, "--data-binary", f"@{body}",
         "-o", str(tmp_path / "echo.bin"), "-w", "%{http_code}",
         f"http://allowed.test:{plain_origin.port}/echo"],
        env=client_env, capture_output=True, text=True, timeout=60)
    assert result.stdout == "200", result.stderr
    assert (tmp_path / "echo.bin").read_bytes() == body.read_bytes()


@pytest.mark.parametrize("partial", [b"", b"CONNECT allowed",
                                     b"GET http://allowed.test/ HTTP/1.1\r\n",
                                     b"GET http://allowed.test/ HTTP/1.1\r\nHost: a"])
def test_a_head_that_never_completes_is_closed(limited_proxy, partial) -> None:
    mark = limited_proxy.mark()
    sock = connect(limited_proxy.port)
    sock.sendall(partial)
    started = time.monotonic()
    answer = read_all(sock, timeout=10)
    assert time.monotonic() - started < 8
    assert answer.startswith(b"HTTP/1.1 408"), answer
    event = _refused(limited_proxy, "header_timeout", mark)
    assert "within 2 s" in event["detail"]


def test_slow_trickle_does_not_extend_the_head_deadline(limited_proxy) -> None:
    sock = connect(limited_proxy.port)
    started = time.monotonic()
    with pytest.raises(OSError):
        for byte in b"GET http://allowed.test/ HTTP/1.1\r\nX-Slow: " + b"a" * 100:
            sock.send(bytes([byte]))
            time.sleep(0.1)
    assert time.monotonic() - started < 8


def test_idle_keep_alive_connection_is_closed_after_the_timeout(limited_proxy,
                                                                plain_origin) -> None:
    mark = limited_proxy.mark()
    sock = connect(limited_proxy.port)
    port = plain_origin.port
    sock.sendall(f"GET http://allowed.test:{port}/hello HTTP/1.1\r\nHost: allowed.test:{port}"
                 "\r\n\r\n".encode())
    assert read_head(sock).startswith(b"HTTP/1.1 200")
    assert closed_by_peer(sock, timeout=8)
    _refused(limited_proxy, "header_timeout", mark)


def test_connections_per_client_are_bounded(limited_proxy, plain_origin) -> None:
    mark = limited_proxy.mark()
    held = [connect(limited_proxy.port) for _ in range(4)]
    time.sleep(0.2)
    extra = connect(limited_proxy.port)
    answer = read_all(extra, timeout=5)
    assert answer.startswith(b"HTTP/1.1 429"), answer
    assert b"network.max_connections_per_client" in answer
    event = _refused(limited_proxy, "too_many_connections", mark)
    assert event["event"] == "connection.refused"
    held.pop().close()
    time.sleep(0.3)
    again = connect(limited_proxy.port)
    port = plain_origin.port
    again.sendall(f"GET http://allowed.test:{port}/hello HTTP/1.1\r\nHost: allowed.test:{port}"
                  "\r\nConnection: close\r\n\r\n".encode())
    assert read_all(again, timeout=5).startswith(b"HTTP/1.1 200")
    for sock in held:
        sock.close()


def test_a_request_held_for_a_person_outlives_the_head_deadline(tls_origin, plain_origin,
                                                                tmp_path, client_env) -> None:
    text = policy_text(tls_origin.port, plain_origin.port, default="ask").replace(
        "[resolve]", "header_timeout = 1\n[resolve]")
    process = ProxyProcess(tmp_path / "p", text)
    try:
        curl = subprocess.Popen(["curl", "-sS", "--max-time", "30", "-x", process.url,
                                 f"https://ask.test:{tls_origin.port}/hello"],
                                env=client_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        held = process.wait_for_event(lambda e: e.get("decision") == "held", timeout=10)
        time.sleep(2.5)  # well past header_timeout
        assert curl.poll() is None
        assert process.cli("approve", f"ask.test:{held['port']}").returncode == 0
        out, err = curl.communicate(timeout=30)
        assert out.startswith("hello from tls-origin"), err
    finally:
        process.stop()
