"""Attack review: what still gets through the hardened proxy. Each test is one finding and fails
until it is fixed.

Every test plays the agent against the real `agent-egress serve` with raw sockets. All names
are mapped to loopback origins of the test's own (policy [resolve]), so a wrong "allow" only
ever lands on this machine; metadata and private ranges are never contacted.
"""

from __future__ import annotations

import base64
import contextlib
import os
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from conftest import policy_text
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from proxyproc import ProxyProcess
from rawclient import (
    connect,
    handmade_client_hello,
    open_tunnel,
    read_all,
    read_head,
    record,
    server_name_extension,
)

# -- local origins ---------------------------------------------------------------------------


class RecordingOrigin:
    """A plain TCP origin that records every byte each connection sent it; it answers each
    request head with a small 200 (or never answers, with reply=False)."""

    def __init__(self, host: str = "127.0.0.1", reply: bool = True) -> None:
        self.sock = socket.socket()
        self.sock.bind((host, 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.reply = reply
        self.connections: list[bytearray] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            received = bytearray()
            self.connections.append(received)
            threading.Thread(target=self._serve, args=(conn, received), daemon=True).start()

    def _serve(self, conn: socket.socket, received: bytearray) -> None:
        conn.settimeout(10)
        with contextlib.suppress(OSError), conn:
            while data := conn.recv(65536):
                received += data
                if self.reply and b"\r\n\r\n" in data:
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    def close(self) -> None:
        self.sock.close()


class SniRecordingOrigin:
    """A TLS 1.3 origin (OpenSSL via Python's ssl) that records every SNI it is asked for: its
    servername callback is where an SNI-routing server (nginx, a CDN) picks the site."""

    def __init__(self, ca: trustme.CA) -> None:
        self.names: list[str | None] = []
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ca.issue_cert("allowed.test", "other.test").configure_cert(self.context)
        self.context.sni_callback = lambda _sock, name, _ctx: self.names.append(name)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handshake, args=(conn,), daemon=True).start()

    def _handshake(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        with contextlib.suppress(OSError, ssl.SSLError):
            self.context.wrap_socket(conn, server_side=True).close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def recorder() -> Iterator[RecordingOrigin]:
    origin = RecordingOrigin()
    yield origin
    origin.close()


@pytest.fixture(scope="module")
def deny_proxy(recorder, tmp_path_factory) -> Iterator[ProxyProcess]:
    process = ProxyProcess(tmp_path_factory.mktemp("attack-deny"), policy_text(recorder.port))
    yield process
    process.stop()


# glibc keeps freed memory and heap fragments; with these, RSS tracks what is really held, so
# the memory findings measure retention, not the allocator.
_TRUE_RSS = {"MALLOC_MMAP_THRESHOLD_": "32768", "MALLOC_TRIM_THRESHOLD_": "0"}


@contextlib.contextmanager
def proxy_with(tmp_path: Path, policy: str, name: str = "p") -> Iterator[ProxyProcess]:
    process = ProxyProcess(tmp_path / name, policy, env=_TRUE_RSS)
    try:
        yield process
    finally:
        process.stop()


def rss_mib(process: ProxyProcess) -> float:
    for line in Path(f"/proc/{process.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def decided(process: ProxyProcess, after: int = 0) -> list[dict]:
    return [e for e in process.events()[after:] if e["event"] == "request.decided"]


# -- TLS: the second ClientHello (HelloRetryRequest) -----------------------------------------

_HRR_RANDOM = bytes.fromhex("cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c")


def _extension(kind: int, body: bytes) -> bytes:
    return struct.pack("!HH", kind, len(body)) + body


def _tls13_hello(server_name: bytes, key_shares: bytes, session_id: bytes,
                 random: bytes) -> bytes:
    """A TLS 1.3 ClientHello record offering only P-256: with no key share it makes the server
    answer HelloRetryRequest, as real clients meet whenever they guess the wrong group."""
    extensions = (server_name_extension(server_name)
                  + _extension(0x000A, b"\x00\x02\x00\x17")              # groups: secp256r1
                  + _extension(0x000D, b"\x00\x04\x04\x03\x08\x04")      # signature algorithms
                  + _extension(0x002B, b"\x02\x03\x04")                  # supported_versions 1.3
                  + _extension(0x0033, struct.pack("!H", len(key_shares)) + key_shares))
    body = (b"\x03\x03" + random + bytes([len(session_id)]) + session_id
            + b"\x00\x02\x13\x01" + b"\x01\x00" + struct.pack("!H", len(extensions))
            + extensions)
    return record(0x16, b"\x01" + len(body).to_bytes(3, "big") + body)


def _p256_key_share() -> bytes:
    point = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    return struct.pack("!HH", 0x0017, len(point)) + point


def test_second_client_hello_after_hello_retry_request_cannot_name_another_host(
        ca, tmp_path) -> None:
    """CONNECT allowed.test, first ClientHello for allowed.test (checked), the server asks
    for another key share (HelloRetryRequest), the second ClientHello names other.test: it is
    relayed unchecked and the origin's servername callback selects other.test."""
    origin = SniRecordingOrigin(ca)
    try:
        with proxy_with(tmp_path, policy_text(origin.port)) as proxy:
            sock = open_tunnel(proxy.port, f"allowed.test:{origin.port}")
            session_id, random = os.urandom(32), os.urandom(32)
            sock.sendall(_tls13_hello(b"allowed.test", b"", session_id, random))
            sock.settimeout(5)
            answer = sock.recv(65536)
            assert answer[:1] == b"\x16" and _HRR_RANDOM in answer, answer[:16]  # an HRR
            with contextlib.suppress(OSError):
                sock.sendall(_tls13_hello(b"other.test", _p256_key_share(), session_id,
                                          random))
                sock.recv(65536)
            time.sleep(0.5)
            assert origin.names[:1] == ["allowed.test"]
            assert "other.test" not in origin.names, (
                f"the origin was asked for {origin.names}: the second ClientHello's SNI "
                "was never checked against the CONNECT target")
    finally:
        origin.close()


def test_encrypted_client_hello_is_not_relayed_unnoticed(deny_proxy, recorder) -> None:
    """An outer ClientHello naming allowed.test with an encrypted_client_hello extension: an
    ECH server (Cloudflare's, for one) serves the inner, encrypted name instead. The proxy
    relays it and the audit log has no trace that the real destination went unchecked."""
    before, mark = len(recorder.connections), deny_proxy.mark()
    ech_body = (b"\x00" + b"\x00\x01\x00\x01" + b"\x07" + struct.pack("!H", 32)
                + os.urandom(32) + struct.pack("!H", 128) + os.urandom(128))  # outer ECH
    hello = handmade_client_hello(server_name_extension(b"allowed.test"),
                                  _extension(0xFE0D, ech_body))
    sock = open_tunnel(deny_proxy.port, f"allowed.test:{recorder.port}")
    sock.sendall(record(0x16, hello))
    time.sleep(1)
    relayed = len(recorder.connections) > before
    events = [e for e in deny_proxy.events()[mark:] if e.get("port") == recorder.port]
    flagged = any(e.get("ech") or "ech" in str(e.get("detail", "")).lower() for e in events)
    assert not relayed or flagged, (
        "a ClientHello carrying encrypted_client_hello (0xfe0d) was relayed and no event "
        f"says its real server name was not checked: {events}")
    sock.close()


# -- resource exhaustion ---------------------------------------------------------------------


def test_held_request_does_not_buffer_unbounded_client_data(recorder, tmp_path) -> None:
    """With default = "ask" (the built-in policy), a CONNECT held for approval keeps reading
    whatever the client sends and queues it in memory: one connection, hundreds of MiB."""
    policy = policy_text(recorder.port, default="ask")
    with proxy_with(tmp_path, policy) as proxy:
        sock = connect(proxy.port)
        sock.sendall(f"CONNECT ask.test:{recorder.port} HTTP/1.1\r\n\r\n".encode())
        time.sleep(0.5)
        before = rss_mib(proxy)
        chunk, sent = b"\x16" * 65536, 0
        sock.settimeout(3)
        with contextlib.suppress(OSError):  # a proxy that stops reading makes sendall time out
            while sent < 256 * 2**20:
                sock.sendall(chunk)
                sent += len(chunk)
        time.sleep(1)
        grown = rss_mib(proxy) - before
        assert grown < 64, f"the proxy holds {grown:.0f} MiB more after {sent >> 20} MiB " \
                           "were sent on one held connection"


def test_host_header_padding_does_not_grow_proxy_memory(recorder, tmp_path) -> None:
    """normalize_host is an lru_cache of 65536 entries keyed by the raw text; str.strip() in it
    removes \\x1c-\\x1f, so a refused request's Host header 'other.test' + 60 KB of \\x1f is a
    valid host and its 60 KB key is kept: up to 4 GiB, no allowed destination needed."""
    with proxy_with(tmp_path, policy_text(recorder.port)) as proxy:
        def refused(count: int, start: int) -> None:
            for i in range(start, start + count):
                sock = connect(proxy.port)
                sock.sendall(b"GET http://other.test/ HTTP/1.1\r\nHost: other.test"
                             + b"\x1f" * (60000 + i) + b"\r\n\r\n")
                assert read_head(sock).startswith(b"HTTP/1.1 4")
                sock.close()

        refused(100, 0)  # warm-up: the allocator's own growth is not the finding
        time.sleep(0.5)
        before = rss_mib(proxy)
        refused(300, 100)  # 18 MB of cache keys if they were kept
        time.sleep(0.5)
        grown = rss_mib(proxy) - before
        assert grown < 8, f"300 more refused requests left {grown:.0f} MiB behind"


def test_chunked_framing_lines_of_a_refused_request_are_bounded(recorder, tmp_path) -> None:
    """The head is bounded (64 KiB) but not what follows it: a chunk-size line, a chunk
    extension or a trailer section that never ends is buffered by h11's ChunkedReader (used
    without h11's own size limit), even for a request that was refused, with no timeout."""
    with proxy_with(tmp_path, policy_text(recorder.port)) as proxy:
        sock = connect(proxy.port)
        sock.sendall(b"POST http://other.test/ HTTP/1.1\r\nHost: other.test\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        time.sleep(0.5)
        before = rss_mib(proxy)
        chunk, sent = b"0" * 65536, 0  # one chunk-size line, never finished
        sock.settimeout(3)
        with contextlib.suppress(OSError):
            while sent < 128 * 2**20:
                sock.sendall(chunk)
                sent += len(chunk)
        time.sleep(1)
        grown = rss_mib(proxy) - before
        sock.close()
        assert grown < 32, f"{grown:.0f} MiB buffered for one unfinished chunk-size line " \
                           f"({sent >> 20} MiB sent) of a refused request"


def test_websocket_messages_are_not_kept_for_the_connection_lifetime(tmp_path) -> None:
    """mitmproxy appends every WebSocket message to flow.websocket.messages and nothing here
    drops them: an agent's ws:// connection to an allowed host keeps every byte it ever sent
    in the proxy's memory until it closes."""
    from websockets.sync.server import serve

    def sink(ws) -> None:
        for _ in ws:
            pass

    server = serve(sink, "127.0.0.1", 0, max_size=None)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.socket.getsockname()[1]
    try:
        with proxy_with(tmp_path, policy_text(port)) as proxy:
            sock = connect(proxy.port)
            sock.sendall(f"GET http://ws.example.test:{port}/ HTTP/1.1\r\n"
                         f"Host: ws.example.test:{port}\r\nUpgrade: websocket\r\n"
                         "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                         "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".encode())
            assert read_head(sock).startswith(b"HTTP/1.1 101")
            before = rss_mib(proxy)
            mask = os.urandom(4)
            frame = (b"\x82\xff" + struct.pack("!Q", 2**20) + mask
                     + mask * (2**20 // 4))  # a complete 1 MiB binary message of zeros
            for _ in range(160):
                sock.sendall(frame)
            time.sleep(2)
            grown = rss_mib(proxy) - before
            sock.close()
            assert grown < 32, f"{grown:.0f} MiB kept after 160 complete 1 MiB messages"
    finally:
        server.shutdown()


def test_connection_limit_is_not_per_loopback_source_address(recorder, tmp_path) -> None:
    """max_connections_per_client counts by source address; an agent on the proxy's host can
    bind any of 127.0.0.0/8 and open the limit again from each."""
    policy = policy_text(recorder.port, extra="max_connections_per_client = 3")
    with proxy_with(tmp_path, policy) as proxy:
        held: list[socket.socket] = []

        def opened(source: str) -> bool:
            sock = socket.socket()
            sock.bind((source, 0))
            sock.connect(("127.0.0.1", proxy.port))
            held.append(sock)
            sock.settimeout(1)
            try:
                return not sock.recv(100).startswith(b"HTTP/1.1 429")
            except TimeoutError:
                return True

        assert [opened("127.0.0.1") for _ in range(4)] == [True, True, True, False]
        others = [opened(f"127.0.0.{n}") for n in range(2, 8)]
        for sock in held:
            sock.close()
        assert not any(others), (
            f"{sum(others)} more connections accepted from other loopback addresses of the "
            "same host after the limit of 3 was reached")


def test_pending_limit_per_agent_is_not_reset_by_a_new_agent_name(recorder, tmp_path) -> None:
    """max_pending_per_agent is keyed by the proxy user name the agent picks itself: one
    client renaming itself per request fills the whole queue (starving every other agent)."""
    policy = policy_text(recorder.port, default="ask",
                         extra="[approvals]\nmax_pending_per_agent = 2\ntimeout = 20")
    with proxy_with(tmp_path, policy) as proxy:
        socks = []
        for n, host in enumerate(["ask.test", "ask2.test", "ask3.test", "ask4.test"]):
            sock = connect(proxy.port)
            auth = base64.b64encode(f"agent{n}:x".encode()).decode()
            sock.sendall(f"GET http://{host}:{recorder.port}/ HTTP/1.1\r\nHost: {host}:"
                         f"{recorder.port}\r\nProxy-Authorization: Basic {auth}\r\n\r\n"
                         .encode())
            socks.append(sock)
        time.sleep(1)
        pending = proxy.cli("pending", "--json").stdout
        for sock in socks:
            sock.close()
        held = pending.count('"host"')
        assert held <= 2, f"one client at one address holds {held} pending approvals " \
                          "(max_pending_per_agent = 2)"


# -- in-tunnel HTTP after a keep-alive request ---------------------------------------------


def test_connect_after_a_keep_alive_request_keeps_the_tunnel_checks(recorder, tmp_path) -> None:
    """A plain request to allowed.test pins its address; a CONNECT to allowed.test on the same
    connection reuses that pin, which is not marked as a tunnel. Requests in that tunnel are
    then judged as proxy requests for the bare address: the "must name the tunnel host" check
    is skipped, the event names 127.0.0.1, and an absolute-form request for other.test goes to
    the origin verbatim wherever the address itself is allowed as an IP literal."""
    port = recorder.port
    policy = policy_text(port).replace(
        'allow = ["allowed.test"', 'allow_ip_literals = true\nallow = ["127.0.0.1/32", '
                                   '"allowed.test"')
    before = len(recorder.connections)
    with proxy_with(tmp_path, policy) as proxy:
        sock = connect(proxy.port)
        sock.sendall(f"GET http://allowed.test:{port}/first HTTP/1.1\r\n"
                     f"Host: allowed.test:{port}\r\n\r\n".encode())
        first = read_head(sock)
        while not first.endswith(b"ok"):
            first += sock.recv(100)
        assert first.startswith(b"HTTP/1.1 200"), first
        sock.sendall(f"CONNECT allowed.test:{port} HTTP/1.1\r\n\r\n".encode())
        assert read_head(sock).startswith(b"HTTP/1.1 200")
        sock.sendall(f"GET http://other.test:{port}/secret HTTP/1.1\r\n\r\n".encode())
        answer = read_all(sock, timeout=3)
        time.sleep(0.3)
        upstream = b"".join(bytes(c) for c in recorder.connections[before:])
        assert b"other.test" not in upstream, upstream
        assert answer.startswith(b"HTTP/1.1 403") and b"host_mismatch" in answer, answer[:200]


# -- identity --------------------------------------------------------------------------------


def test_identity_mapping_survives_non_ascii_proxy_credentials(recorder, tmp_path) -> None:
    """[identity] names the agent by its address, which it "cannot choose". A Proxy-Authorization
    header with one non-ASCII byte makes base64 raise ValueError in AgentIdentity (unguarded):
    the request is allowed with no agent on its event, and the header goes upstream."""
    policy = policy_text(recorder.port) + '[identity]\n"127.0.0.0/8" = "mapped-agent"\n'
    with proxy_with(tmp_path, policy) as proxy:
        mark, before = proxy.mark(), len(recorder.connections)
        port = recorder.port
        sock = connect(proxy.port)
        sock.sendall(f"GET http://allowed.test:{port}/who HTTP/1.1\r\nHost: allowed.test:{port}"
                     f"\r\n".encode() + b"Proxy-Authorization: Basic \xff\xfe\r\n\r\n")
        answer = read_all(sock, timeout=3)
        time.sleep(0.3)
        upstream = b"".join(bytes(c) for c in recorder.connections[before:])
        assert b"proxy-authorization" not in upstream.lower(), upstream
        events = [e for e in decided(proxy, mark) if e.get("path") == "/who"]
        assert events and all(e.get("agent") == "mapped-agent" for e in events), (
            answer[:40], events)


# -- HTTP framing the proxy forwards as received ---------------------------------------------


@pytest.mark.parametrize("head", [
    "GET http://allowed.test:{port}/fold HTTP/1.1\r\nX-A: b\r\n Host: other.test\r\n\r\n",
    "GET http://allowed.test:{port}/nohost HTTP/1.1\r\nConnection: close\r\n\r\n",
], ids=["obs-fold", "no-host"])
def test_forwarded_request_names_the_decided_host_unambiguously(deny_proxy, recorder,
                                                                head) -> None:
    """RFC 9112: a proxy must replace obs-fold (or reject it) and must send a Host generated
    from an absolute-form target. The proxy forwards the folded line verbatim, and an HTTP/1.1
    request with no Host at all: the origin picks the vhost (its default, or a lenient
    parser's reading of ' Host: other.test'), not the host the policy decided."""
    before = len(recorder.connections)
    sock = connect(deny_proxy.port)
    sock.sendall(head.format(port=recorder.port).encode())
    answer = read_all(sock, timeout=3)
    time.sleep(0.3)
    forwarded = b"".join(bytes(c) for c in recorder.connections[before:])
    if not forwarded:
        assert answer[:12] in (b"HTTP/1.1 400", b"HTTP/1.1 403"), answer[:100]
        return
    head_lines = forwarded.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]
    assert not any(line[:1] in (b" ", b"\t") for line in head_lines), forwarded
    hosts = [line for line in head_lines if line.lower().startswith(b"host:")]
    assert len(hosts) == 1 and b"allowed.test" in hosts[0], forwarded


# -- managed policy -------------------------------------------------------------------------

_MANAGED = """version = 1
[network]
allow = ["allowed.test"]
deny = ["other.test"]
ports = [80, 443, {port}]
allowed_cidrs = ["127.0.0.0/8"]
{extra}
[resolve]
"allowed.test" = "127.0.0.1"
"other.test" = "127.0.0.1"
"elsewhere.test" = "127.0.0.1"
"""


@pytest.mark.parametrize("managed_extra, user, host", [
    ("", 'version = 1\nmode = "audit"\n', "other.test"),
    ("[requirements]\nallowlist_expansion = false\n",
     'version = 1\n[network]\ndefault = "allow"\n', "elsewhere.test"),
], ids=["audit-mode-vs-managed-deny", "default-allow-vs-allowlist-expansion"])
def test_user_layer_cannot_loosen_a_managed_policy(recorder, tmp_path, managed_extra, user,
                                                   host) -> None:
    """The user file (live-reloaded, writable by an agent running as the user) may only
    tighten the managed one. Unless the administrator wrote `mode` or `default` explicitly,
    `mode = "audit"` lets a managed deny through, and `default = "allow"` opens every host
    despite allowlist_expansion = false; no warning either way."""
    managed = tmp_path / "managed.toml"
    managed.write_text(_MANAGED.format(port=recorder.port, extra=managed_extra))
    process = ProxyProcess(tmp_path / "p", user, "--managed", str(managed))
    try:
        before = len(recorder.connections)
        sock = connect(process.port)
        sock.sendall(f"GET http://{host}:{recorder.port}/exfil HTTP/1.1\r\n"
                     f"Host: {host}:{recorder.port}\r\n\r\n".encode())
        answer = read_all(sock, timeout=3)
        time.sleep(0.3)
        assert len(recorder.connections) == before, f"{host} was reached: {answer[:40]!r}"
        # Refused, or held for a person under the managed default "ask": never let through.
        decision = process.wait_for_event(lambda e: e.get("host") == host)["decision"]
        assert decision in ("deny", "held"), decision
        assert answer.startswith(b"HTTP/1.1 403") or decision == "held", answer[:80]
    finally:
        process.stop()


# -- CIDR deny rules and names -------------------------------------------------------------


def test_deny_cidr_also_refuses_names_that_resolve_into_it(tmp_path) -> None:
    """deny = ["127.0.0.2/32"] refuses http://127.0.0.2/ but not a name resolving there
    (nip.io-style wildcard DNS gives every agent one): deny rules are applied to IP literals
    only, never to the checked address, while block_private is."""
    origin = RecordingOrigin("127.0.0.2")
    port = origin.port
    policy = policy_text(port, default="allow").replace(
        'deny = [', 'deny = ["127.0.0.2/32", ').replace(
        "[resolve]", '[resolve]\n"sneaky.test" = "127.0.0.2"')
    try:
        with proxy_with(tmp_path, policy) as proxy:
            sock = connect(proxy.port)
            sock.sendall(f"GET http://127.0.0.2:{port}/ HTTP/1.1\r\n\r\n".encode())
            assert read_all(sock, timeout=3).startswith(b"HTTP/1.1 403")
            sock = connect(proxy.port)
            sock.sendall(f"GET http://sneaky.test:{port}/ HTTP/1.1\r\n"
                         f"Host: sneaky.test:{port}\r\n\r\n".encode())
            answer = read_all(sock, timeout=3)
            assert not origin.connections, "the denied network was reached by name"
            assert answer.startswith(b"HTTP/1.1 403"), answer[:80]
    finally:
        origin.close()


# -- what the approver sees -----------------------------------------------------------------


def test_pending_line_cannot_be_padded_into_another_question(recorder, tmp_path) -> None:
    """The held request's path is shown as sent: 60 KB of no-break spaces push the real id and
    host off the approver's screen, and the line ends in a question the agent wrote, which the
    proxy's own '  from CLIENT  (1 waiting, ...)' completes."""
    policy = policy_text(recorder.port, default="ask")
    fake = "\u00a0" * 30 + "9f3b2c1a\u00a0\u00a0pypi.org:443\u00a0\u00a0CONNECT"
    path = "/x" + "\u00a0" * 20000 + fake
    with proxy_with(tmp_path, policy) as proxy:
        sock = connect(proxy.port)
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: ask.test:{recorder.port}\r\n\r\n"
                     .encode())
        time.sleep(1)
        lines = [line for line in proxy.cli("pending").stdout.splitlines() if "ask.test" in line]
        sock.close()
        assert lines, "the request was not held"
        line = lines[0]
        assert len(line) < 400 and "\u00a0" not in line, (
            f"the approver's line is {len(line)} characters and ends: {line[-90:]!r}")
