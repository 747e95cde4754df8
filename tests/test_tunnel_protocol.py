"""A tunnel's first bytes decide what it may carry, however the agent splits or disguises them.

Every case plays the attacker with raw sockets: CONNECT names an allowed host, then the TLS
handshake asks for another one (domain fronting) in a form meant to slip past the SNI check.
A wrong "allow" would still only reach the local test origin, and its connection counter shows
whether anything was relayed.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import subprocess
import time
from collections.abc import Iterator

import pytest
from conftest import policy_text
from origins import CountingServer
from proxyproc import ProxyProcess
from rawclient import (
    TLSClient,
    closed_by_peer,
    handmade_client_hello,
    open_tunnel,
    record,
    send_segments,
    server_name_extension,
)


def _refusal(proxy: ProxyProcess, reason: str, after: int, **fields) -> dict:
    return proxy.wait_for_event(
        lambda e: e["event"] == "request.decided" and e.get("reason") == reason
        and all(e.get(k) == v for k, v in fields.items()), after=after)


@pytest.mark.parametrize("cuts", [(1,), (2,), (1, 2), (3,), (5,), (1, 5, 40)],
                         ids=lambda cuts: "split-" + "-".join(map(str, cuts)))
def test_fragmented_client_hello_for_another_host_is_cut(proxy, tls_origin: CountingServer,
                                                         cuts) -> None:
    before, mark = tls_origin.connections, proxy.mark()
    sock = open_tunnel(proxy.port, f"allowed.test:{tls_origin.port}")
    client = TLSClient("other.test")
    send_segments(sock, client.client_hello(), cuts)
    assert not client.finish(sock)
    assert closed_by_peer(sock)
    event = _refusal(proxy, "sni_mismatch", mark, sni="other.test", port=tls_origin.port)
    assert event["host"] == "allowed.test" and event["decision"] == "deny"
    assert tls_origin.connections == before


def test_client_hello_split_across_tls_records_is_reassembled(proxy, tls_origin) -> None:
    before, mark = tls_origin.connections, proxy.mark()
    hello = TLSClient("other.test").client_hello()
    body = hello[5:]
    sock = open_tunnel(proxy.port, f"allowed.test:{tls_origin.port}")
    pieces = [body[i:i + 7] for i in range(0, len(body), 7)]  # the SNI lands across records
    sock.sendall(b"".join(record(0x16, piece) for piece in pieces))
    assert closed_by_peer(sock)
    _refusal(proxy, "sni_mismatch", mark, sni="other.test", port=tls_origin.port)
    assert tls_origin.connections == before


@pytest.mark.parametrize("cuts", [(), (1,), (2,), (3,)])
def test_matching_sni_still_passes_however_split(proxy, tls_origin, ca_file, cuts) -> None:
    sock = open_tunnel(proxy.port, f"allowed.test:{tls_origin.port}")
    client = TLSClient("allowed.test", str(ca_file))
    send_segments(sock, client.client_hello(), cuts, pause=0.1)
    assert client.finish(sock)
    answer = client.request(sock, "GET /hello HTTP/1.1\r\nHost: allowed.test\r\n"
                                  "Connection: close\r\n\r\n")
    assert b"hello from tls-origin: /hello" in answer


@pytest.mark.parametrize("version", [b"\x03\x04", b"\x03\xff", b"\x02\x00", b"\x7f\x1c"])
def test_unknown_record_version_is_cut_not_relayed(proxy, tls_origin, version) -> None:
    before, mark = tls_origin.connections, proxy.mark()
    hello = TLSClient("other.test").client_hello()
    sock = open_tunnel(proxy.port, f"allowed.test:{tls_origin.port}")
    sock.sendall(hello[:1] + version + hello[3:])
    assert closed_by_peer(sock)
    event = _refusal(proxy, "tunnel_protocol", mark, port=tls_origin.port)
    assert "unknown version" in event["detail"]
    assert tls_origin.connections == before


@pytest.mark.parametrize("first, why", [
    (record(0x15, b"\x02\x28", b"\x03\x03"), "alert"),
    (record(0x14, b"\x01", b"\x03\x03"), "change_cipher_spec"),
    (record(0x17, b"x" * 40, b"\x03\x03"), "application_data"),
    (record(0x16, b"\x02\x00\x00\x02\x03\x03", b"\x03\x03"), "type 2"),  # a ServerHello
    (b"\x80\x2e\x01\x00\x02\x00\x15\x00\x00\x00\x10" + b"\x00" * 37, "SSLv2"),
])
def test_tls_that_is_not_a_client_hello_is_cut(proxy, tls_origin, first, why) -> None:
    before, mark = tls_origin.connections, proxy.mark()
    sock = open_tunnel(proxy.port, f"allowed.test:{tls_origin.port}")
    sock.sendall(first)
    assert closed_by_peer(sock)
    event = _refusal(proxy, "tunnel_protocol", mark, port=tls_origin.port)
    assert why in event["detail"]
    assert tls_origin.connections == before


@pytest.mark.parametrize("extensions, why", [
    ((server_name_extension(b"allowed.test"), server_name_extension(b"other.test")),
     "more than one server_name extension"),
    ((server_name_extension(b"allowed.test", b"other.test"),), "2 names"),
    ((server_name_extension(b"other.test", b"allowed.test"),), "2 names"),
])
def test_ambiguous_server_names_are_cut(proxy, tls_origin, extensions, why) -> None:
    before, mark = tls_origin.connections, proxy.mark()
    sock = open_tunnel(proxy.port, f"allowed.test:{tls_origin.port}")
    sock.sendall(record(0x16, handmade_client_hello(*extensions)))
    assert closed_by_peer(sock)
    event = _refusal(proxy, "tunnel_protocol", mark, port=tls_origin.port)
    assert why in event["detail"]
    assert tls_origin.connections == before


def test_malformed_client_hello_is_cut_with_an_event(proxy, tls_origin) -> None:
    before, mark = tls_origin.connections, proxy.mark()
    sock = open_tunnel(proxy.port, f"allowed.test:{tls_origin.port}")
    garbage = b"\x01" + (40).to_bytes(3, "big") + b"\xff" * 40
    sock.sendall(record(0x16, garbage))
    assert closed_by_peer(sock)
    event = _refusal(proxy, "tunnel_protocol", mark, port=tls_origin.port)
    assert "malformed" in event["detail"]
    assert tls_origin.connections == before


@pytest.mark.parametrize("payload", [b"hello\n", b"SSH-2.0-OpenSSH_9.2p1\r\n", b"\x00\x01\x02",
                                     b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"])
def test_raw_tcp_in_a_tunnel_is_cut_by_default(proxy, tls_origin, payload) -> None:
    before, mark = tls_origin.connections, proxy.mark()
    sock = open_tunnel(proxy.port, f"allowed.test:{tls_origin.port}")
    sock.sendall(payload)
    assert closed_by_peer(sock)
    event = _refusal(proxy, "tunnel_protocol", mark, port=tls_origin.port)
    assert "network.raw_tcp" in event["detail"]
    assert tls_origin.connections == before


@pytest.fixture(scope="module")
def raw_tcp_proxy(tls_origin, plain_origin, tmp_path_factory):
    text = policy_text(tls_origin.port, plain_origin.port).replace(
        "[resolve]", f'raw_tcp = ["allowed.test:{tls_origin.port}"]\nheader_timeout = 1\n'
                     "[resolve]")
    process = ProxyProcess(tmp_path_factory.mktemp("raw-tcp"), text)
    yield process
    process.stop()


def test_raw_tcp_is_relayed_where_network_raw_tcp_lists_it(raw_tcp_proxy, tls_origin) -> None:
    before, mark = tls_origin.connections, raw_tcp_proxy.mark()
    sock = open_tunnel(raw_tcp_proxy.port, f"allowed.test:{tls_origin.port}")
    sock.sendall(b"SSH-2.0-OpenSSH_9.2p1\r\n")
    closed_by_peer(sock, timeout=5)  # the TLS origin gives up on the non-TLS bytes
    event = raw_tcp_proxy.wait_for_event(lambda e: e["event"] == "tunnel.closed"
                                         and e.get("port") == tls_origin.port, after=mark)
    assert event["protocol"] == "tcp" and event["bytes_up"] == len(b"SSH-2.0-OpenSSH_9.2p1\r\n")
    assert tls_origin.connections == before + 1


def test_raw_tcp_rule_does_not_widen_the_domain_rules(raw_tcp_proxy, tls_origin) -> None:
    sock = socket.create_connection(("127.0.0.1", raw_tcp_proxy.port), timeout=5)
    sock.sendall(f"CONNECT other.test:{tls_origin.port} HTTP/1.1\r\n\r\n".encode())
    assert sock.recv(100).startswith(b"HTTP/1.1 403")


@pytest.mark.parametrize("first_bytes", [b"", b"\x16", b"\x16\x03\x01", b"GET / HT"])
def test_a_tunnel_that_never_completes_its_first_bytes_is_cut(raw_tcp_proxy, tls_origin,
                                                              plain_origin, first_bytes) -> None:
    before, mark = tls_origin.connections, raw_tcp_proxy.mark()
    # plain_origin's port is not in raw_tcp: only TLS or HTTP may go there.
    sock = open_tunnel(raw_tcp_proxy.port, f"allowed.test:{plain_origin.port}")
    sock.sendall(first_bytes)
    assert closed_by_peer(sock, timeout=5)
    event = raw_tcp_proxy.wait_for_event(
        lambda e: e.get("reason") == "tunnel_protocol" and e.get("port") == plain_origin.port
        and "within 1 s" in e.get("detail", ""), after=mark)
    assert event["host"] == "allowed.test"
    assert tls_origin.connections == before


def test_oversized_client_hello_is_cut(proxy, tls_origin) -> None:
    before, mark = tls_origin.connections, proxy.mark()
    sock = open_tunnel(proxy.port, f"allowed.test:{tls_origin.port}")
    header = b"\x01" + (70 * 1024).to_bytes(3, "big")
    sock.sendall(record(0x16, header + b"\x00" * 100))
    assert closed_by_peer(sock)
    event = _refusal(proxy, "tunnel_protocol", mark, port=tls_origin.port)
    assert "larger than" in event["detail"]
    assert tls_origin.connections == before


def test_record_larger_than_tls_allows_is_cut(proxy, tls_origin) -> None:
    mark = proxy.mark()
    sock = open_tunnel(proxy.port, f"allowed.test:{tls_origin.port}")
    sock.sendall(b"\x16\x03\x01" + struct.pack("!H", 0xFFFF))
    assert closed_by_peer(sock)
    _refusal(proxy, "tunnel_protocol", mark, port=tls_origin.port)


@pytest.fixture
def hrr_origin(ca, tmp_path) -> Iterator[int]:
    """OpenSSL's s_server that accepts only P-256: a client guessing X25519 first gets a
    HelloRetryRequest, as real clients do whenever they guess the wrong group."""
    cert = ca.issue_cert("allowed.test")
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        ["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-cert", str(tmp_path / "cert.pem"),
         "-key", str(tmp_path / "key.pem"), "-groups", "P-256", "-tls1_3", "-www", "-quiet"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(50):
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            break
        time.sleep(0.1)
    yield port
    server.kill()
    server.wait()


def test_hello_retry_request_with_the_same_name_completes(tmp_path, tls_origin,
                                                         plain_origin, hrr_origin) -> None:
    text = policy_text(tls_origin.port, plain_origin.port, hrr_origin)
    process = ProxyProcess(tmp_path / "p", text)
    try:
        result = subprocess.run(
            ["openssl", "s_client", "-proxy", f"127.0.0.1:{process.port}", "-connect",
             f"allowed.test:{hrr_origin}", "-servername", "allowed.test",
             "-groups", "X25519:P-256", "-tls1_3", "-msg", "-ign_eof"],
            input="GET / HTTP/1.0\r\n\r\n", capture_output=True, text=True, timeout=30)
        assert result.stdout.count("ServerHello") == 2, result.stdout[-2000:]  # HRR, then SH
        assert "HTTP/1.0 200 ok" in result.stdout
    finally:
        process.stop()
    assert not [e for e in process.events("request.decided") if e["decision"] == "deny"]
