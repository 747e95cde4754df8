"""HTTPS through CONNECT: decided at CONNECT, SNI checked, bytes passed through untouched."""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path

import httpx
import pytest
from origins import CountingServer
from proxyproc import ProxyProcess


def curl(env: dict[str, str], proxy: ProxyProcess, url: str,
         *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["curl", "-sS", "--max-time", "20", "-x", proxy.url, *args, url],
        env=env, capture_output=True, text=True, timeout=30,
    )


def test_curl_allowed_host_reaches_origin_with_its_own_certificate(
        proxy, tls_origin: CountingServer, client_env) -> None:
    # The client trusts only the test CA: success proves the origin's certificate came through,
    # i.e. the proxy did not intercept TLS.
    result = curl(client_env, proxy, f"https://allowed.test:{tls_origin.port}/hello")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"hello from tls-origin: /hello host=allowed.test:{tls_origin.port}\n"


def test_curl_wildcard_subdomain_at_any_depth(proxy, tls_origin, client_env) -> None:
    for name in ("sub.wild.test", "deep.sub.wild.test"):
        result = curl(client_env, proxy, f"https://{name}:{tls_origin.port}/hello")
        assert result.returncode == 0, result.stderr
        assert f"host={name}:" in result.stdout


@pytest.mark.parametrize("host, x_proxy_error", [
    ("other.test", "blocked-by-allowlist"),
    ("denied.evil.test", "blocked-by-denylist"),
])
def test_denied_connect_gets_403_and_origin_sees_nothing(
        proxy, tls_origin, client_env, host, x_proxy_error) -> None:
    before = tls_origin.connections
    result = curl(client_env, proxy, f"https://{host}:{tls_origin.port}/hello", "-v")
    assert result.returncode == 56  # CONNECT tunnel failed
    assert "< HTTP/1.1 403" in result.stderr
    assert f"< x-proxy-error: {x_proxy_error}" in result.stderr
    assert "< Proxy-Status: agent-egress; error=http_request_denied" in result.stderr
    assert tls_origin.connections == before


def test_port_not_in_policy_is_denied(proxy, tls_origin, client_env) -> None:
    before = tls_origin.connections
    # Port 1 is in no policy; nothing listens there either, so nothing leaves the machine.
    result = curl(client_env, proxy, "https://allowed.test:1/hello", "-v")
    assert "< HTTP/1.1 403" in result.stderr
    event = proxy.wait_for_event(lambda e: e.get("port") == 1)
    assert event["reason"] == "port_not_allowed"
    assert tls_origin.connections == before


def test_sni_mismatch_is_cut_off_before_reaching_origin(proxy, tls_origin, client_env) -> None:
    before = tls_origin.connections
    port = tls_origin.port
    # CONNECT names the allowed host, but the TLS ClientHello asks for another one.
    result = curl(client_env, proxy, f"https://other.test:{port}/hello",
                  "--connect-to", f"other.test:{port}:allowed.test:{port}")
    assert result.returncode != 0
    assert "hello from" not in result.stdout
    event = proxy.wait_for_event(lambda e: e.get("reason") == "sni_mismatch"
                                 and e.get("sni") == "other.test")
    assert event["host"] == "allowed.test"
    assert event["decision"] == "deny"
    assert tls_origin.connections == before


def test_ip_literal_connect_is_denied(proxy, tls_origin, client_env) -> None:
    before = tls_origin.connections
    for spelling in ("127.0.0.1", "127.1", "2130706433", "0x7f.0.0.1", "[::ffff:127.0.0.1]"):
        result = curl(client_env, proxy, f"https://{spelling}:{tls_origin.port}/hello", "-v",
                      "-k")
        assert "< HTTP/1.1 403" in result.stderr, spelling
    assert tls_origin.connections == before


def test_httpx_through_proxy(proxy, tls_origin, ca_file: Path) -> None:
    context = ssl.create_default_context(cafile=str(ca_file))
    with httpx.Client(proxy=proxy.url, verify=context, trust_env=False) as client:
        response = client.get(f"https://allowed.test:{tls_origin.port}/hello")
        assert response.status_code == 200
        assert response.text.startswith("hello from tls-origin")
        with pytest.raises(httpx.ProxyError, match="403"):
            client.get(f"https://other.test:{tls_origin.port}/hello")


def test_tunnel_closed_event_counts_bytes(proxy, tls_origin, client_env) -> None:
    result = curl(client_env, proxy, f"https://allowed.test:{tls_origin.port}/hello?token=s3cret",
                  "-H", "X-Marker: tunnel-bytes")
    assert result.returncode == 0, result.stderr
    event = proxy.wait_for_event(lambda e: e["event"] == "tunnel.closed"
                                 and e["host"] == "allowed.test" and e["bytes_down"] > 1000)
    assert event["protocol"] == "tls"
    assert event["bytes_up"] > 200  # ClientHello and the request
    assert event["duration_ms"] >= 0
    assert "s3cret" not in proxy.audit_path.read_text()


def test_name_resolving_to_private_address_is_refused(tls_origin, plain_origin, client_env,
                                                      tmp_path) -> None:
    # Without allowed_cidrs, loopback is a private upstream. (If the proxy wrongly let it
    # through, the connection would still only reach the local test origin.)
    from conftest import policy_text

    text = policy_text(tls_origin.port, plain_origin.port).replace(
        'allowed_cidrs = ["127.0.0.0/8", "::1/128"]', "allowed_cidrs = []")
    process = ProxyProcess(tmp_path / "proxy", text)
    try:
        before = (tls_origin.connections, plain_origin.connections)
        result = curl(client_env, process, f"https://allowed.test:{tls_origin.port}/hello", "-v")
        assert "< HTTP/1.1 403" in result.stderr
        assert "< Proxy-Status: agent-egress; error=destination_ip_prohibited" in result.stderr
        plain = curl(client_env, process, f"http://allowed.test:{plain_origin.port}/hello", "-i")
        assert "resolves to 127.0.0.1, which is loopback" in plain.stdout
        assert (tls_origin.connections, plain_origin.connections) == before
        event = process.wait_for_event(lambda e: e.get("reason") == "private_address")
        assert event["decision"] == "deny" and event["rule"] == "allowed.test"
    finally:
        process.stop()
