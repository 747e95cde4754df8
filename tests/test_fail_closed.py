"""Every error path refuses, with an event: never a 200, never a relay, never a silent 502.

Malformed input is fed to each entry point (CONNECT, plain HTTP, a request in a tunnel,
WebSocket, the ClientHello, the proxy port itself); a fault inside a decision is played by an
enforcer that has no policy loaded.
"""

from __future__ import annotations

import asyncio
import base64
import subprocess

import pytest
from agent_egress.addons.approvals import Approvals
from agent_egress.addons.enforce import Enforcer
from agent_egress.addons.failclosed import FailClosed
from agent_egress.addons.pinning import UpstreamPinning
from mitmproxy.test import taddons, tflow
from proxyproc import ProxyProcess
from rawclient import TLSClient, closed_by_peer, connect, read_all


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict]] = []

    def emit(self, event: str, **fields) -> None:
        self.events.append((event, fields))


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/") else 0


@pytest.mark.parametrize("target", ["-a.test:443", "1.2.3.4.5:443", "08.1.1.1:443",
                                    "a..b.test:443", "allowed.test:²", "allowed.test:0",
                                    "[::1:443", "%2e%2e:443", "allowed.test:443:443"])
def test_malformed_connect_is_refused_with_an_event(proxy, tls_origin, target) -> None:
    before, mark = tls_origin.connections, proxy.mark()
    sock = connect(proxy.port)
    sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    answer = read_all(sock, timeout=5)
    assert _status(answer) in (400, 403), answer[:200]
    event = proxy.wait_for_event(lambda e: e["event"] == "request.decided", after=mark)
    assert event["decision"] == "deny"
    assert event["reason"] in ("invalid_host", "invalid_request"), event
    assert tls_origin.connections == before


@pytest.mark.parametrize("host_header", ["allowed.test:²", "allowed.test:٤٤٣", "-x-.test",
                                         "allowed.test:99999", "allowed.test:{port}x"])
def test_malformed_host_header_is_refused_with_an_event(proxy, plain_origin,
                                                        host_header) -> None:
    before, mark = len(plain_origin.requests), proxy.mark()
    port = plain_origin.port
    sock = connect(proxy.port)
    sock.sendall(f"GET http://allowed.test:{port}/hello HTTP/1.1\r\n"
                 f"Host: {host_header.format(port=port)}\r\n\r\n".encode())
    answer = read_all(sock, timeout=5)
    assert _status(answer) in (400, 403), answer[:200]
    event = proxy.wait_for_event(lambda e: e["event"] == "request.decided", after=mark)
    assert event["decision"] == "deny"
    assert len(plain_origin.requests) == before


@pytest.mark.parametrize("target", ["http://-bad-.test/ws", "http://1.2.3.4.5/ws",
                                    "http://allowed.test:²/ws"])
def test_malformed_websocket_upgrade_is_refused_with_an_event(proxy, target) -> None:
    mark = proxy.mark()
    sock = connect(proxy.port)
    sock.sendall(f"GET {target} HTTP/1.1\r\nHost: allowed.test\r\nConnection: Upgrade\r\n"
                 "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
                 "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".encode())
    answer = read_all(sock, timeout=5)
    assert _status(answer) in (400, 403), answer[:200]
    event = proxy.wait_for_event(lambda e: e["event"] == "request.decided", after=mark)
    assert event["decision"] == "deny"


def test_tls_to_the_proxy_port_is_refused(proxy) -> None:
    mark = proxy.mark()
    sock = connect(proxy.port)
    sock.sendall(TLSClient("allowed.test").client_hello())
    assert closed_by_peer(sock)
    event = proxy.wait_for_event(lambda e: e["event"] == "connection.refused", after=mark)
    assert event["reason"] == "proxy_protocol" and "TLS" in event["detail"]


def test_https_proxy_url_fails_without_a_handshake(proxy, tls_origin, client_env) -> None:
    result = subprocess.run(
        ["curl", "-sS", "--max-time", "10", "--proxy-insecure", "-x",
         f"https://127.0.0.1:{proxy.port}", f"https://allowed.test:{tls_origin.port}/hello"],
        env=client_env, capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert "hello from" not in result.stdout


@pytest.mark.parametrize("user", [b"bad\x1b[2Jname", b"a\nb", b"has space", b"x" * 65,
                                  "\u202eevil".encode(), b"semi;colon", b"a\rX-Forged: 1"])
@pytest.mark.parametrize("method", ["CONNECT", "GET"])
def test_invalid_agent_names_get_407(proxy, plain_origin, user, method) -> None:
    # curl refuses such proxy URLs itself (and then goes direct!): the header is sent by hand.
    mark, before = proxy.mark(), len(plain_origin.requests)
    target = (f"allowed.test:{plain_origin.port}" if method == "CONNECT" else
              f"http://allowed.test:{plain_origin.port}/hello")
    credentials = base64.b64encode(user + b":pw").decode()
    sock = connect(proxy.port)
    sock.sendall(f"{method} {target} HTTP/1.1\r\nHost: allowed.test:{plain_origin.port}\r\n"
                 f"Proxy-Authorization: Basic {credentials}\r\n\r\n".encode())
    answer = read_all(sock, timeout=5).decode("utf-8", "replace")
    assert answer.startswith("HTTP/1.1 407"), answer[:300]
    assert "letters, digits and . _ @ + - only, at most 64 characters" in answer
    assert "\x1b" not in answer and "\u202e" not in answer
    event = proxy.wait_for_event(lambda e: e.get("reason") == "invalid_agent", after=mark)
    assert event["decision"] == "deny" and "agent" not in event
    assert len(plain_origin.requests) == before


def test_valid_agent_names_pass(proxy, plain_origin, client_env) -> None:
    mark = proxy.mark()
    result = subprocess.run(
        ["curl", "-sS", "--max-time", "10", "-x",
         f"http://codex-1.run_2%40ci+x@127.0.0.1:{proxy.port}",
         f"http://allowed.test:{plain_origin.port}/hello"],
        env=client_env, capture_output=True, text=True, timeout=30)
    assert result.stdout.startswith("hello from"), result.stdout
    event = proxy.wait_for_event(lambda e: e["event"] == "request.decided", after=mark)
    assert event["agent"] == "codex-1.run_2@ci+x"


def test_refusal_names_the_rule_and_file_never_a_path(proxy, tls_origin, client_env) -> None:
    result = subprocess.run(
        ["curl", "-sS", "-i", "--max-time", "10", "-x", proxy.url,
         f"http://denied.evil.test:{tls_origin.port}/"],
        env=client_env, capture_output=True, text=True, timeout=30)
    assert result.stdout.startswith("HTTP/1.1 403")
    assert "policy.toml (user): network.deny[0]" in result.stdout
    assert str(proxy.workdir) not in result.stdout
    event = proxy.wait_for_event(lambda e: e.get("host") == "denied.evil.test")
    assert str(proxy.workdir) in event["rule_origin"]  # the administrator keeps the path


def test_no_mitmproxy_ca_is_ever_written(tmp_path, tls_origin, plain_origin, client_env,
                                         ca_file) -> None:
    from conftest import policy_text

    home = tmp_path / "home"
    home.mkdir()
    process = ProxyProcess(tmp_path / "proxy", policy_text(tls_origin.port, plain_origin.port),
                           env={"HOME": str(home)})
    try:
        sock = connect(process.port)
        sock.sendall(TLSClient("allowed.test").client_hello())  # TLS to the port itself
        closed_by_peer(sock)
        ok = subprocess.run(["curl", "-sS", "--max-time", "10", "-x", process.url,
                             f"https://allowed.test:{tls_origin.port}/hello"],
                            env=client_env, capture_output=True, text=True, timeout=30)
        assert ok.stdout.startswith("hello from"), ok.stderr
    finally:
        process.stop()
    assert not (home / ".mitmproxy").exists()
    assert list(home.iterdir()) == []


def test_a_fault_in_the_decision_refuses_with_internal_error() -> None:
    audit = Recorder()
    enforcer = Enforcer(audit, UpstreamPinning(), Approvals(audit))  # type: ignore[arg-type]
    with taddons.context(enforcer):
        flow = tflow.tflow()
        flow.request.method = "CONNECT"
        asyncio.run(enforcer.http_connect(flow))  # no policy loaded: an assertion fails inside
    assert flow.response is not None and flow.response.status_code == 403
    ((name, fields),) = audit.events
    assert fields["reason"] == "internal_error" and "AssertionError" in fields["detail"]


@pytest.mark.parametrize("method", ["CONNECT", "GET"])
def test_fail_closed_refuses_what_nothing_decided(method: str) -> None:
    audit = Recorder()
    flow = tflow.tflow()
    flow.request.method = method
    FailClosed(audit).requestheaders(flow)  # type: ignore[arg-type]
    assert flow.response is not None and flow.response.status_code == 403
    assert audit.events[0][1]["reason"] == "internal_error"
