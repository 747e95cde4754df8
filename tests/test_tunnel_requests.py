"""Plain HTTP inside an allowed CONNECT tunnel: every request is decided by its real target.

The attacker opens a tunnel to an allowed host, then speaks HTTP/1 in it naming another host:
in an absolute-form request target (which origins must prefer over Host), in the Host header,
or without any Host at all. Upgrades other than WebSocket must never reach the origin.
"""

from __future__ import annotations

import pytest
from origins import CountingServer
from rawclient import closed_by_peer, connect, open_tunnel, read_all


def _in_tunnel(proxy, origin: CountingServer, request: str) -> bytes:
    sock = open_tunnel(proxy.port, f"allowed.test:{origin.port}")
    sock.sendall(request.encode())
    return read_all(sock, timeout=5)


@pytest.mark.parametrize("request_text", [
    "GET http://other.test:{port}/hello HTTP/1.1\r\nHost: allowed.test:{port}\r\n\r\n",
    "GET http://other.test:{port}/hello HTTP/1.1\r\nHost: other.test:{port}\r\n\r\n",
    "GET http://other.test:{port}/hello HTTP/1.0\r\n\r\n",
    "GET /hello HTTP/1.1\r\nHost: other.test:{port}\r\n\r\n",
    "GET http://allowed.test:1/hello HTTP/1.0\r\n\r\n",
    "GET /hello HTTP/1.1\r\nHost: -bad-.test\r\n\r\n",
], ids=["absolute-form", "absolute-and-host", "http10-no-host", "host-header", "other-port",
        "malformed-host"])
def test_request_in_a_tunnel_naming_another_host_is_refused(proxy, plain_origin,
                                                            request_text) -> None:
    before, mark = len(plain_origin.requests), proxy.mark()
    answer = _in_tunnel(proxy, plain_origin, request_text.format(port=plain_origin.port))
    assert answer.startswith(b"HTTP/1.1 403"), answer[:200]
    assert b"host_mismatch" in answer
    event = proxy.wait_for_event(lambda e: e.get("reason") == "host_mismatch"
                                 and e.get("scheme") == "http", after=mark)
    assert event["host"] == "allowed.test" and event["port"] == plain_origin.port
    assert len(plain_origin.requests) == before


@pytest.mark.parametrize("request_text", [
    "GET /hello HTTP/1.0\r\n\r\n",
    "GET /hello HTTP/1.1\r\nHost: allowed.test:{port}\r\nConnection: close\r\n\r\n",
    "GET http://Allowed.Test.:{port}/hello HTTP/1.1\r\nHost: allowed.test:{port}\r\n"
    "Connection: close\r\n\r\n",
])
def test_request_in_a_tunnel_naming_its_host_is_decided_and_served(proxy, plain_origin,
                                                                   request_text) -> None:
    mark = proxy.mark()
    answer = _in_tunnel(proxy, plain_origin, request_text.format(port=plain_origin.port))
    assert answer.startswith(b"HTTP/1.0 200") or answer.startswith(b"HTTP/1.1 200"), answer
    assert b"hello from plain-origin: /hello" in answer
    event = proxy.wait_for_event(lambda e: e["event"] == "request.decided"
                                 and e.get("scheme") == "http" and e.get("path") == "/hello",
                                 after=mark)
    assert event["decision"] == "allow" and event["host"] == "allowed.test"


def test_connect_inside_a_tunnel_is_refused(proxy, plain_origin, tls_origin) -> None:
    mark = proxy.mark()
    answer = _in_tunnel(proxy, plain_origin,
                        f"CONNECT allowed.test:{tls_origin.port} HTTP/1.1\r\n\r\n")
    assert answer.startswith((b"HTTP/1.1 400", b"HTTP/1.1 403")), answer
    proxy.wait_for_event(lambda e: e.get("reason") == "tunnel_protocol"
                         and "CONNECT inside a tunnel" in e.get("detail", ""), after=mark)


@pytest.mark.parametrize("upgrade", ["h2c", "H2C", "foo", "websocket, h2c", "TLS/1.2"])
@pytest.mark.parametrize("where", ["tunnel", "proxy"])
def test_upgrades_other_than_websocket_never_reach_the_origin(proxy, plain_origin, upgrade,
                                                              where) -> None:
    port = plain_origin.port
    target = "/headers" if where == "tunnel" else f"http://allowed.test:{port}/headers"
    request = (f"GET {target} HTTP/1.1\r\nHost: allowed.test:{port}\r\n"
               f"Connection: Upgrade, HTTP2-Settings, close\r\nUpgrade: {upgrade}\r\n"
               "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n")
    if where == "tunnel":
        answer = _in_tunnel(proxy, plain_origin, request)
    else:
        sock = connect(proxy.port)
        sock.sendall(request.encode())
        answer = read_all(sock, timeout=5)
    assert b" 200 " in answer.split(b"\r\n", 1)[0], answer[:300]
    seen = answer.split(b"\r\n\r\n", 1)[1].decode().lower()
    assert "upgrade:" not in seen and "http2-settings:" not in seen
    assert "connection: close" in seen


def test_websocket_upgrade_header_is_kept(proxy, plain_origin) -> None:
    port = plain_origin.port
    sock = connect(proxy.port)
    sock.sendall(f"GET http://allowed.test:{port}/headers HTTP/1.1\r\nHost: allowed.test:{port}\r\n"
                 "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
                 "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".encode())
    answer = read_all(sock, timeout=5)
    assert b"upgrade: websocket" in answer.lower()  # the origin saw it (and declined)


def test_tunnel_http_keeps_deciding_each_request(proxy, plain_origin) -> None:
    """A keep-alive tunnel: the first request is fine, the second names another host."""
    port = plain_origin.port
    sock = open_tunnel(proxy.port, f"allowed.test:{port}")
    sock.sendall(f"GET /hello HTTP/1.1\r\nHost: allowed.test:{port}\r\n\r\n".encode())
    first = b""
    while not first.endswith(b"\n") or b"hello from" not in first:
        first += sock.recv(65536)
    assert first.startswith(b"HTTP/1.1 200"), first
    sock.sendall(f"GET http://other.test:{port}/hello HTTP/1.1\r\nHost: other.test\r\n\r\n"
                 .encode())
    second = read_all(sock, timeout=5)
    assert second.startswith(b"HTTP/1.1 403") and b"host_mismatch" in second
    assert closed_by_peer(sock, timeout=1)
