"""The SOCKS5 port: decided by the same policy as a CONNECT, refused with RFC 1928 codes.

Real curl (--socks5-hostname and --socks5) where a client does the talking; raw sockets where
the test plays an attacker or checks the exact reply bytes. Every name resolves (in the
proxy's own [resolve] table) to a loopback origin of the test, so a wrong "allow" still lands
on this machine, where the origin's connection counter shows it.
"""

from __future__ import annotations

import contextlib
import json
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
import socksclient
from conftest import TLS_NAMES
from holding import wait_pending
from proxyproc import ProxyProcess
from rawclient import TLSClient, closed_by_peer, read_all


class EchoServer(socketserver.ThreadingTCPServer):
    """A raw TCP origin that echoes a line back (SSH, a database, any non-HTTP protocol)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        self.connections = 0
        super().__init__(("127.0.0.1", 0), _Echo)


class _Echo(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        self.server.connections += 1  # type: ignore[attr-defined]
        line = self.rfile.readline(1024)
        self.wfile.write(b"echo: " + line)


@pytest.fixture(scope="module")
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def socks_policy(*ports: int, raw_port: int) -> str:
    names = [*TLS_NAMES, "raw.test"]
    resolve = "\n".join(f'"{name}" = "127.0.0.1"' for name in names)
    return f"""version = 1
[network]
default = "ask"
allow = ["allowed.test", "raw.test:{raw_port}", "127.0.0.1/32"]
deny = ["denied.evil.test"]
ports = [80, 443, {", ".join(str(port) for port in ports)}]
allow_ip_literals = true
allowed_cidrs = ["127.0.0.1/32"]
header_timeout = 2

[approvals]
timeout = 30

[resolve]
{resolve}
"""


@pytest.fixture(scope="module")
def unanswered() -> Iterator[int]:
    """A loopback port whose SYNs get no answer: its accept queue is full."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(0)
    port = silent.getsockname()[1]
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(("127.0.0.1", port))
        fillers.append(filler)
    yield port
    for filler in fillers:
        filler.close()
    silent.close()


@pytest.fixture(scope="module")
def socks(tls_origin, plain_origin, echo, unanswered, tmp_path_factory) -> Iterator[ProxyProcess]:
    policy = socks_policy(tls_origin.port, plain_origin.port, echo.server_address[1],
                          unanswered, raw_port=echo.server_address[1])
    process = ProxyProcess(tmp_path_factory.mktemp("socks"), policy,
                           "--socks-listen", "127.0.0.1:0")
    assert process.socks_port is not None
    yield process
    process.stop()


def curl(socks: ProxyProcess, client_env: dict[str, str], url: str, *args: str,
         option: str = "--socks5-hostname", user: str = "") -> subprocess.CompletedProcess:
    proxy = f"{user}@127.0.0.1:{socks.socks_port}" if user else f"127.0.0.1:{socks.socks_port}"
    return subprocess.run(["curl", "-sS", "--max-time", "20", option, proxy, *args, url],
                          env=client_env, capture_output=True, text=True, timeout=30)


def _decided(socks: ProxyProcess, mark: int, **fields) -> dict:
    return socks.wait_for_event(
        lambda e: e["event"] == "request.decided" and e.get("scheme") == "socks5"
        and all(e.get(key) == value for key, value in fields.items()), after=mark)


def test_allowed_host_by_name_with_the_agent_named_by_the_socks_user(
        socks, plain_origin, client_env) -> None:
    mark, before = socks.mark(), plain_origin.connections
    result = curl(socks, client_env, f"http://allowed.test:{plain_origin.port}/hello",
                  user="codex-7:hunter2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("hello from plain-origin: /hello")
    assert plain_origin.connections == before + 1
    decided = _decided(socks, mark, host="allowed.test", port=plain_origin.port)
    assert decided["decision"] == "allow" and decided["agent"] == "codex-7"
    assert decided["reason"] == "allowlist" and decided["rule"] == "allowed.test"
    closed = socks.wait_for_event(lambda e: e["event"] == "tunnel.closed"
                                  and e.get("port") == plain_origin.port, after=mark)
    assert closed["scheme"] == "socks5" and closed["agent"] == "codex-7"
    assert closed["protocol"] == "http"  # its requests are decided (and recorded) one by one
    inside = socks.wait_for_event(lambda e: e["event"] == "request.decided"
                                  and e.get("path") == "/hello", after=mark)
    assert inside["scheme"] == "http" and inside["agent"] == "codex-7"
    assert "hunter2" not in socks.audit_path.read_text()  # the password is never recorded


def test_https_through_socks_is_passed_through_after_the_sni_check(
        socks, tls_origin, client_env) -> None:
    mark = socks.mark()
    result = curl(socks, client_env, f"https://allowed.test:{tls_origin.port}/hello")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("hello from tls-origin")
    closed = socks.wait_for_event(lambda e: e["event"] == "tunnel.closed"
                                  and e.get("port") == tls_origin.port, after=mark)
    assert closed["protocol"] == "tls" and closed["bytes_down"] > 1000


def test_denied_host_is_refused_with_code_2_and_never_reached(
        socks, tls_origin, client_env) -> None:
    mark, before = socks.mark(), tls_origin.connections
    result = curl(socks, client_env, f"https://denied.evil.test:{tls_origin.port}/")
    assert result.returncode == 97, result.stderr  # curl: proxy handshake error
    assert "(2)" in result.stderr  # RFC 1928: connection not allowed by ruleset
    decided = _decided(socks, mark, host="denied.evil.test")
    assert decided["decision"] == "deny" and decided["reason"] == "denylist"
    assert tls_origin.connections == before


def test_a_port_no_rule_allows_is_refused(socks, client_env) -> None:
    mark = socks.mark()
    result = curl(socks, client_env, "http://allowed.test:2222/")
    assert result.returncode == 97 and "(2)" in result.stderr
    assert _decided(socks, mark, port=2222)["reason"] == "port_not_allowed"


@pytest.mark.parametrize(("address", "allowed"), [("127.0.0.1", True), ("127.0.0.3", False)])
def test_client_side_dns_is_decided_as_an_ip_literal(socks, plain_origin, client_env,
                                                     address, allowed) -> None:
    """socks5:// (not socks5h://): curl resolves the name and sends an address, which only a
    CIDR rule can allow (here 127.0.0.1/32)."""
    mark, before = socks.mark(), plain_origin.connections
    port = plain_origin.port
    result = curl(socks, client_env, f"http://allowed.test:{port}/hello",
                  "--resolve", f"allowed.test:{port}:{address}", option="--socks5")
    decided = _decided(socks, mark, host=address)
    if allowed:
        assert result.returncode == 0, result.stderr
        assert decided["decision"] == "allow" and decided["rule"] == "127.0.0.1/32"
    else:
        assert result.returncode == 97 and "(2)" in result.stderr
        assert decided["decision"] == "deny"
        assert plain_origin.connections == before


@pytest.mark.parametrize(("sent", "answer", "detail"), [
    (b"\x04\x01\x00\x50\x7f\x00\x00\x01\x00", b"\x00\x5b" + b"\x00" * 6, "SOCKS4"),
    (b"\x04\x01\x00\x50\x00\x00\x00\x01\x00allowed.test\x00", b"\x00\x5b" + b"\x00" * 6,
     "SOCKS4"),
    (b"\x05\x01\x01", b"\x05\xff", "neither no authentication"),  # GSSAPI only
    (b"GET / HTTP/1.1\r\nHost: allowed.test\r\n\r\n", b"", "not a SOCKS5 greeting"),
], ids=["socks4", "socks4a", "gssapi-only", "http"])
def test_what_is_not_socks5_is_refused_with_its_reply(socks, sent, answer, detail) -> None:
    mark = socks.mark()
    sock = socket.create_connection(("127.0.0.1", socks.socks_port), timeout=10)
    sock.sendall(sent)
    assert read_all(sock) == answer
    event = socks.wait_for_event(lambda e: e["event"] == "connection.refused"
                                 and e.get("scheme") == "socks5", after=mark)
    assert event["reason"] == "proxy_protocol" and detail in event["detail"]


@pytest.mark.parametrize(("command", "name"), [(socksclient.BIND, "BIND"),
                                               (socksclient.UDP_ASSOCIATE, "UDP ASSOCIATE"),
                                               (9, "command 9")])
def test_commands_other_than_connect_get_0x07(socks, plain_origin, command, name) -> None:
    mark = socks.mark()
    sock = socksclient.greet(socks.socks_port)
    sock.sendall(socksclient.request("allowed.test", plain_origin.port, command))
    assert socksclient.recv_exactly(sock, 10)[:2] == b"\x05\x07"
    assert closed_by_peer(sock)
    decided = _decided(socks, mark, host="allowed.test")
    assert decided["decision"] == "deny" and decided["reason"] == "proxy_protocol"
    assert name in decided["detail"]


def test_an_unknown_address_type_gets_0x08(socks) -> None:
    mark = socks.mark()
    sock = socksclient.greet(socks.socks_port)
    sock.sendall(b"\x05\x01\x00\x05allowed.test\x00\x50")
    assert socksclient.recv_exactly(sock, 10)[:2] == b"\x05\x08"
    event = socks.wait_for_event(lambda e: e["event"] == "connection.refused"
                                 and e.get("scheme") == "socks5", after=mark)
    assert "address type 5" in event["detail"]


def test_ipv6_address_is_an_ip_literal_no_rule_covers(socks, plain_origin) -> None:
    mark = socks.mark()
    sock, code = socksclient.open_tunnel(socks.socks_port, "::1", plain_origin.port,
                                         address_type=socksclient.IPV6)
    assert code == 2
    assert _decided(socks, mark, host="::1")["decision"] == "deny"


@pytest.mark.parametrize("user", [b"two words", b"\xff\xfe", b"a" * 65, b"codex:spoofed"],
                         ids=["space", "not-utf8", "too-long", "colon"])
def test_an_invalid_agent_name_is_refused(socks, plain_origin, user) -> None:
    mark, before = socks.mark(), plain_origin.connections
    sock, code = socksclient.open_tunnel(socks.socks_port, "allowed.test", plain_origin.port,
                                         user=user)
    assert code == 2
    assert _decided(socks, mark, host="allowed.test")["reason"] == "invalid_agent"
    assert plain_origin.connections == before


def test_tls_for_another_host_in_an_allowed_tunnel_is_cut(socks, tls_origin) -> None:
    mark, before = socks.mark(), tls_origin.connections
    sock, code = socksclient.open_tunnel(socks.socks_port, "allowed.test", tls_origin.port)
    assert code == 0
    client = TLSClient("other.test")
    sock.sendall(client.client_hello())
    assert closed_by_peer(sock)
    decided = _decided(socks, mark, reason="sni_mismatch")
    assert decided["host"] == "allowed.test" and decided["sni"] == "other.test"
    assert tls_origin.connections == before


def test_raw_tcp_needs_a_rule_that_names_the_port(socks, tls_origin, echo) -> None:
    mark, before = socks.mark(), tls_origin.connections
    sock, code = socksclient.open_tunnel(socks.socks_port, "allowed.test", tls_origin.port)
    assert code == 0  # allowed for TLS and HTTP; raw TCP needs allowed.test:PORT
    sock.sendall(b"SSH-2.0-OpenSSH_9.2p1\r\n")
    assert closed_by_peer(sock)
    decided = _decided(socks, mark, reason="tunnel_protocol")
    assert "allowed.test:" in decided["detail"] and "names the port" in decided["detail"]
    assert tls_origin.connections == before

    before = echo.connections
    sock, code = socksclient.open_tunnel(socks.socks_port, "raw.test", echo.server_address[1])
    assert code == 0
    sock.sendall(b"SSH-2.0-OpenSSH_9.2p1\r\n")
    assert read_all(sock) == b"echo: SSH-2.0-OpenSSH_9.2p1\r\n"
    sock.close()
    assert echo.connections == before + 1
    closed = socks.wait_for_event(lambda e: e["event"] == "tunnel.closed"
                                  and e.get("host") == "raw.test", after=mark)
    assert closed["protocol"] == "tcp" and closed["bytes_up"] == 23 and closed["bytes_down"] == 29


def test_a_silent_socks_client_is_closed_after_header_timeout(socks) -> None:
    mark = socks.mark()
    sock = socket.create_connection(("127.0.0.1", socks.socks_port), timeout=10)
    sock.sendall(b"\x05\x01\x00")
    assert socksclient.recv_exactly(sock, 2) == b"\x05\x00"
    started = time.monotonic()
    assert read_all(sock) == b""  # no HTTP 408 for a SOCKS client: just closed
    assert time.monotonic() - started < 8
    event = socks.wait_for_event(lambda e: e["event"] == "connection.refused"
                                 and e.get("reason") == "header_timeout", after=mark)
    assert "SOCKS5 request" in event["detail"]


def test_an_unknown_host_is_held_and_released_by_a_person(socks, plain_origin) -> None:
    mark = socks.mark()
    result: dict[str, int | None] = {}

    def ask() -> None:
        sock, result["code"] = socksclient.open_tunnel(socks.socks_port, "other.test",
                                                       plain_origin.port, user=b"held-agent")
        result["sock"] = sock  # type: ignore[assignment]

    asking = threading.Thread(target=ask)
    asking.start()
    pending = wait_pending(socks, lambda p: p["host"] == "other.test")
    assert pending["scheme"] == "socks5" and pending["agent"] == "held-agent"
    assert socks.cli("approve", pending["id"]).returncode == 0
    asking.join(10)
    assert result["code"] == 0
    decided = _decided(socks, mark, host="other.test", decision="allow")
    assert decided["reason"] == "approved"


def test_connect_relays_stdio_through_the_socks_port(socks, echo, client_env) -> None:
    env = {**client_env, "ALL_PROXY": f"socks5h://relay-agent@127.0.0.1:{socks.socks_port}"}
    mark, before = socks.mark(), echo.connections
    result = subprocess.run([sys.executable, "-m", "agent_egress.proxy", "connect",
                             "raw.test", str(echo.server_address[1])], input=b"ping\n", env=env,
                            capture_output=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"echo: ping\n"
    assert echo.connections == before + 1
    assert _decided(socks, mark, host="raw.test")["agent"] == "relay-agent"


def test_connect_says_why_the_proxy_refused(socks, client_env) -> None:
    env = {**client_env, "ALL_PROXY": f"socks5h://127.0.0.1:{socks.socks_port}"}
    result = subprocess.run([sys.executable, "-m", "agent_egress.proxy", "connect",
                             "denied.evil.test", "22"], env=env, capture_output=True, text=True,
                            timeout=30, stdin=subprocess.DEVNULL)
    assert result.returncode == 1
    assert "refused denied.evil.test:22: the policy does not allow" in result.stderr


def test_connect_without_a_socks_proxy_is_a_usage_error(client_env) -> None:
    result = subprocess.run([sys.executable, "-m", "agent_egress.proxy", "connect",
                             "allowed.test", "22", "--proxy", "http://127.0.0.1:8080"],
                            env=client_env, capture_output=True, text=True, timeout=30,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 2 and "not a SOCKS5 URL" in result.stderr


def test_status_and_env_name_the_socks_port(socks) -> None:
    status = json.loads(socks.cli("policy", "show", "--json").stdout or "{}")
    shown = json.dumps(status)
    assert f"127.0.0.1:{socks.socks_port}" in shown
    shown = socks.cli("policy", "show").stdout + socks.cli("health").stdout
    assert shown.count(f"127.0.0.1:{socks.socks_port}") == 2
    env = socks.cli("env", "--shell", "dotenv", "--no-check")
    assert f"ALL_PROXY=socks5h://127.0.0.1:{socks.socks_port}" in env.stdout
    assert "GIT_SSH_COMMAND=ssh -o 'ProxyCommand=" in env.stdout


def test_the_http_port_does_not_speak_socks(socks) -> None:
    sock = socket.create_connection(("127.0.0.1", socks.port), timeout=10)
    sock.sendall(b"\x05\x01\x00")
    assert read_all(sock) == b""


def test_a_tunnel_open_when_the_proxy_stops_is_recorded(tls_origin, plain_origin, echo,
                                                        tmp_path) -> None:
    policy = socks_policy(tls_origin.port, plain_origin.port, echo.server_address[1],
                          raw_port=echo.server_address[1])
    process = ProxyProcess(tmp_path, policy, "--socks-listen", "127.0.0.1:0")
    try:
        sock, code = socksclient.open_tunnel(process.socks_port, "allowed.test",
                                             tls_origin.port)
        assert code == 0
        process.wait_for_event(lambda e: e["event"] == "request.decided")
    finally:
        assert process.stop() == 0
    events = process.events()
    closed = next(e for e in events if e["event"] == "tunnel.closed")
    assert closed["proxy_stopped"] is True and closed["scheme"] == "socks5"
    assert events[-1]["event"] == "proxy.stopped"  # and nothing is written after the stop
    sock.close()


def test_a_client_is_not_read_while_its_upstream_connection_opens(socks, unanswered) -> None:
    """An allowed host that never answers the SYN: whatever the client sends meanwhile waits in
    the kernel's buffers, not in the proxy's memory (it was queued without bound)."""
    sock, code = socksclient.open_tunnel(socks.socks_port, "allowed.test", unanswered)
    assert code == 0
    sock.sendall(TLSClient("allowed.test").client_hello())  # judged; the relay connects
    time.sleep(0.3)
    sock.setblocking(False)
    chunk, sent, started = (b"\x17\x03\x03\x40\x00" + b"A" * 16384) * 16, 0, time.monotonic()
    while time.monotonic() - started < 3:
        try:
            sent += sock.send(chunk)
        except BlockingIOError:
            time.sleep(0.01)
    sock.close()
    assert sent < 32 * 2**20, f"{sent >> 20} MiB taken in while connecting"


def test_a_held_client_that_sent_more_and_left_is_seen_gone(socks, plain_origin) -> None:
    """The end of the stream behind unread bytes (sent while held) still counts as gone."""
    sock = socksclient.greet(socks.socks_port, user=b"leaving-agent")
    sock.sendall(socksclient.request("ask3.test", plain_origin.port))
    wait_pending(socks, lambda p: p["host"] == "ask3.test")
    sock.sendall(b"GET /after-leaving HTTP/1.1\r\nHost: ask3.test\r\n\r\n")
    sock.close()
    gone = wait_pending(socks, lambda p: p["host"] == "ask3.test" and p["clients_gone"])
    assert gone["waiting"] == 0


def test_an_idle_http_connection_in_a_socks_tunnel_is_timed_out_as_such(socks,
                                                                       plain_origin) -> None:
    sock, code = socksclient.open_tunnel(socks.socks_port, "allowed.test", plain_origin.port)
    assert code == 0
    mark = socks.mark()
    sock.sendall(b"GET /hello HTTP/1.1\r\nHost: allowed.test\r\n\r\n")
    assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    event = socks.wait_for_event(lambda e: e["event"] == "connection.refused"
                                 and e.get("reason") == "header_timeout", after=mark,
                                 timeout=8)
    assert "no complete request head" in event["detail"]  # the SOCKS5 request was long done
    sock.close()
