"""Plain HTTP (absolute-form) and WebSocket through the proxy."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
from collections.abc import Iterator

import pytest
from websockets.sync.client import connect
from websockets.sync.server import serve


def curl(env, proxy, url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "-i", "--max-time", "20", "-x", proxy.url, *args, url],
                          env=env, capture_output=True, text=True, timeout=30)


def raw_request(proxy, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(request)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            chunks.append(chunk)
            if b"\r\n\r\n" in b"".join(chunks) and b"403" in chunks[0][:20]:
                break
        return b"".join(chunks)


def test_allowed_plain_http_reaches_origin(proxy, plain_origin, client_env) -> None:
    result = curl(client_env, proxy, f"http://allowed.test:{plain_origin.port}/hello")
    assert result.returncode == 0, result.stderr
    assert "HTTP/1.1 200" in result.stdout
    assert f"hello from plain-origin: /hello host=allowed.test:{plain_origin.port}" in result.stdout


def test_post_body_passes_through(proxy, plain_origin, client_env) -> None:
    result = curl(client_env, proxy, f"http://allowed.test:{plain_origin.port}/echo",
                  "--data-binary", "payload-123")
    assert result.stdout.endswith("payload-123")


def test_denied_plain_http_gets_explainable_403(proxy, plain_origin, client_env) -> None:
    before = plain_origin.connections
    result = curl(client_env, proxy, f"http://other.test:{plain_origin.port}/hello?key=secret")
    assert "HTTP/1.1 403" in result.stdout
    assert "x-proxy-error: blocked-by-allowlist" in result.stdout
    assert f"destination: other.test:{plain_origin.port}" in result.stdout
    assert "reason: not_allowlisted" in result.stdout
    assert "agent-egress policy explain" in result.stdout
    assert plain_origin.connections == before
    event = proxy.wait_for_event(lambda e: e.get("host") == "other.test"
                                 and e.get("path") == "/hello")
    assert event["method"] == "GET" and event["scheme"] == "http"
    assert "secret" not in proxy.audit_path.read_text()


def test_host_header_naming_another_host_is_denied(proxy, plain_origin, client_env) -> None:
    before = plain_origin.connections
    result = curl(client_env, proxy, f"http://allowed.test:{plain_origin.port}/hello",
                  "-H", f"Host: other.test:{plain_origin.port}")
    assert "HTTP/1.1 403" in result.stdout
    assert plain_origin.connections == before
    proxy.wait_for_event(lambda e: e.get("reason") == "host_mismatch")


@pytest.mark.parametrize("target", [
    "allowed.test%2e",          # percent-encoded dot
    "allowed%2etest",
    "127.1",                    # IP literal spellings of loopback
    "0x7f000001",
    "[::ffff:127.0.0.1]",
    "allowed.test.evil",        # allowed name as a prefix
    "xn--llowed-6ve.test",      # a homograph of allowed.test in punycode
])
def test_odd_spellings_never_reach_origin(proxy, plain_origin, target) -> None:
    before = plain_origin.connections
    port = plain_origin.port
    request = (f"GET http://{target}:{port}/hello HTTP/1.1\r\nHost: {target}:{port}\r\n"
               "Connection: close\r\n\r\n").encode()
    response = raw_request(proxy, request)
    status = response.split(b" ", 2)[1] if response else b""
    assert status in (b"400", b"403"), response[:200]
    assert plain_origin.connections == before


@pytest.fixture(scope="module")
def ws_origin() -> Iterator[int]:
    def echo(connection) -> None:
        for message in connection:
            connection.send(f"echo:{message}")

    with serve(echo, "127.0.0.1", 0) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        yield server.socket.getsockname()[1]
        server.shutdown()


def _ws_policy_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}


def test_websocket_through_connect_tunnel(proxy, ws_origin, tls_origin, plain_origin) -> None:
    # ws:// with a proxy goes through CONNECT; the upgrade inside the tunnel is checked too.
    # The shared policy's ports list has no room for this port, so use a dedicated proxy.
    from conftest import policy_text
    from proxyproc import ProxyProcess

    process = ProxyProcess(proxy.workdir.parent / "ws-proxy",
                           policy_text(ws_origin, tls_origin.port, plain_origin.port))
    try:
        with connect(f"ws://ws.example.test:{ws_origin}/", proxy=process.url,
                     open_timeout=10) as websocket:
            websocket.send("hi")
            assert websocket.recv(timeout=10) == "echo:hi"
        with pytest.raises(Exception, match="403"):
            connect(f"ws://other.test:{ws_origin}/", proxy=process.url, open_timeout=10)
        upgrade = (f"GET http://ws.example.test:{ws_origin}/ HTTP/1.1\r\n"
                   f"Host: ws.example.test:{ws_origin}\r\nUpgrade: websocket\r\n"
                   "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                   "Sec-WebSocket-Version: 13\r\n\r\n").encode()
        with socket.create_connection(("127.0.0.1", process.port), timeout=10) as sock:
            sock.sendall(upgrade)
            assert sock.recv(4096).startswith(b"HTTP/1.1 101")
            mask = b"\x01\x02\x03\x04"
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(b"plain"))
            sock.sendall(b"\x81\x85" + mask + payload)
            frame = sock.recv(4096)
            assert frame[2:] == b"echo:plain"
        denied = upgrade.replace(b"ws.example.test", b"other.test")
        with socket.create_connection(("127.0.0.1", process.port), timeout=10) as sock:
            sock.sendall(denied)
            assert sock.recv(4096).startswith(b"HTTP/1.1 403")
        events = process.events("request.decided")
        assert any(e.get("websocket") and e["decision"] == "allow" for e in events)
        assert any(e.get("websocket") and e["decision"] == "deny" for e in events)
    finally:
        process.stop()
