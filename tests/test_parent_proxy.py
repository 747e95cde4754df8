"""A parent (corporate) proxy: Debian's Squid on loopback, started by the test.

Allowed destinations reach the origin through Squid (its access log names them); refused ones
never reach Squid; `network.no_upstream` destinations go straight to the origin. Squid resolves
names from a hosts file of the test's, so everything stays on this machine.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import socksclient
from conftest import TLS_NAMES, policy_text
from origins import free_port, wait_listening
from proxyproc import ProxyProcess

SQUID = shutil.which("squid") or "/usr/sbin/squid"
pytestmark = pytest.mark.skipif(not Path(SQUID).exists(),
                                reason="needs squid (.ci/run installs it)")


@dataclass
class Squid:
    port: int
    log: Path

    def lines(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []


@pytest.fixture(scope="module")
def squid() -> Iterator[Squid]:
    # Squid started as root works as its own user, which cannot enter pytest's 0700 temp tree.
    directory = Path(tempfile.mkdtemp(prefix="agent-egress-squid-"))
    directory.chmod(0o777)
    port = free_port()
    hosts = directory / "hosts"
    hosts.write_text("127.0.0.1 " + " ".join([*TLS_NAMES, "direct.test"]) + "\n")
    hosts.chmod(0o644)
    log = directory / "access.log"
    config = directory / "squid.conf"
    config.write_text(f"""http_port 127.0.0.1:{port}
acl loopback src 127.0.0.0/8
http_access allow loopback
http_access deny all
hosts_file {hosts}
cache deny all
logformat withauth %ts %>a %rm %ru %>Hs %{{Proxy-Authorization}}>h
access_log stdio:{log} withauth
cache_log {directory / "cache.log"}
pid_filename {directory / "squid.pid"}
coredump_dir {directory}
shutdown_lifetime 1 seconds
""")
    process = subprocess.Popen([SQUID, "-N", "-f", str(config)], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if not wait_listening(port, 20):
        process.kill()
        pytest.fail("squid did not start")
    yield Squid(port, log)
    process.terminate()
    process.wait(15)
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def egress(squid, tls_origin, plain_origin, tmp_path_factory) -> Iterator[ProxyProcess]:
    policy = policy_text(tls_origin.port, plain_origin.port,
                         extra='no_upstream = ["direct.test"]').replace(
        '"**.evil.test"]', '"**.evil.test", "direct.test"]').replace(
        '"*.pastebin.com"]', '"*.pastebin.com", "fass.evil.test"]').replace(
        "[resolve]\n", '[resolve]\n"direct.test" = "127.0.0.1"\n'
                        '"xn--fa-hia.evil.test" = "127.0.0.1"\n')
    process = ProxyProcess(tmp_path_factory.mktemp("parent"), policy,
                           "--socks-listen", "127.0.0.1:0",
                           "--upstream-proxy", f"http://127.0.0.1:{squid.port}",
                           "--upstream-proxy-auth", "env:PARENT_PROXY_AUTH",
                           env={"PARENT_PROXY_AUTH": "agent-egress:parent-secret-7"})
    yield process
    process.stop()


def _curl(egress: ProxyProcess, env: dict[str, str], url: str, *args: str) -> str:
    result = subprocess.run(["curl", "-sS", "--max-time", "20", "-x", egress.url, *args, url],
                            env=env, capture_output=True, text=True, timeout=30)
    return result.stdout + result.stderr


def _wait_for_line(squid: Squid, text: str, before: int) -> str:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if line := next((line for line in squid.lines()[before:] if text in line), None):
            return line
        time.sleep(0.05)
    raise AssertionError(f"squid never saw {text!r}: {squid.lines()[before:]}")


def test_allowed_connections_leave_through_the_parent(egress, squid, tls_origin, plain_origin,
                                                      client_env) -> None:
    before, origin_before = len(squid.lines()), plain_origin.connections
    plain = _curl(egress, client_env, f"http://allowed.test:{plain_origin.port}/hello")
    assert plain.startswith("hello from plain-origin"), plain
    tls = _curl(egress, client_env, f"https://allowed.test:{tls_origin.port}/hello")
    assert tls.startswith("hello from tls-origin"), tls
    sock, code = socksclient.open_tunnel(egress.socks_port, "allowed.test", plain_origin.port)
    assert code == 0
    sock.sendall(b"GET /hello HTTP/1.1\r\nHost: allowed.test\r\nConnection: close\r\n\r\n")
    assert b"hello from plain-origin" in b"".join(iter(lambda: sock.recv(65536), b""))
    # The parent is asked for each by name (it resolves it), with its credentials.
    line = _wait_for_line(squid, f"CONNECT allowed.test:{tls_origin.port}", before)
    assert "Basic%20YWdlbnQtZWdyZXNzOnBhcmVudC1zZWNyZXQtNw==" in line  # as Squid logs it
    _wait_for_line(squid, f"CONNECT allowed.test:{plain_origin.port}", before)
    assert plain_origin.connections == origin_before + 2
    recorded = egress.audit_path.read_text() + "".join(egress.output)
    assert "parent-secret-7" not in recorded and "YWdlbnQtZWdy" not in recorded


def test_refused_destinations_never_reach_the_parent(egress, squid, plain_origin,
                                                     client_env) -> None:
    before = len(squid.lines())
    denied = _curl(egress, client_env, f"http://denied.evil.test:{plain_origin.port}/")
    assert "agent-egress blocked this request" in denied
    sock, code = socksclient.open_tunnel(egress.socks_port, "denied.evil.test",
                                         plain_origin.port)
    assert code == 2
    time.sleep(0.3)
    assert not [line for line in squid.lines()[before:] if "evil" in line]


def test_the_parent_is_asked_for_the_name_decided_not_the_agents_spelling(
        egress, squid, plain_origin) -> None:
    """faß.evil.test is allowed (**.evil.test) as xn--fa-hia.evil.test; fass.evil.test is
    denied. The parent must get the decided name: its own IDNA 2003 reading of "faß" is
    "fass"."""
    before = len(squid.lines())
    sock = socket.create_connection(("127.0.0.1", egress.port), timeout=10)
    sock.sendall(f"GET / HTTP/1.1\r\nHost: faß.evil.test:{plain_origin.port}\r\n"
                 "Connection: close\r\n\r\n".encode())
    b"".join(iter(lambda: sock.recv(65536), b""))
    sock.close()
    line = _wait_for_line(squid, "CONNECT", before)
    assert f"CONNECT xn--fa-hia.evil.test:{plain_origin.port}" in line
    assert not [line for line in squid.lines()[before:] if "fass.evil.test" in line]


def test_no_upstream_destinations_go_direct(egress, squid, plain_origin, client_env) -> None:
    before, origin_before = len(squid.lines()), plain_origin.connections
    direct = _curl(egress, client_env, f"http://direct.test:{plain_origin.port}/hello")
    assert direct.startswith("hello from plain-origin"), direct
    assert plain_origin.connections == origin_before + 1
    time.sleep(0.3)
    assert not [line for line in squid.lines()[before:] if "direct.test" in line]


@pytest.mark.parametrize(("args", "message"), [
    (["--upstream-proxy", "socks5://127.0.0.1:1080"], "expected http://"),
    (["--upstream-proxy", "http://:3128"], "expected http://"),
    (["--upstream-proxy", "http://proxy.test:0"], "expected http://"),
    (["--upstream-proxy", "http://user:pa/ss-TOPSECRET@proxy.test:3128"], "expected http://"),
    (["--upstream-proxy-auth", "env:X"], "needs --upstream-proxy"),
    (["--upstream-proxy", "http://127.0.0.1:3128", "--upstream-proxy-auth", "env:UNSET_VAR"],
     "UNSET_VAR"),
])
def test_a_bad_parent_proxy_setting_is_refused(tmp_path, args, message) -> None:
    env = {key: value for key, value in os.environ.items() if key != "UNSET_VAR"}
    env.update(HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path / "c"),
               XDG_STATE_HOME=str(tmp_path / "s"))
    result = subprocess.run([sys.executable, "-m", "agent_egress.proxy", "serve", "--listen",
                             "127.0.0.1:0", "--approval-socket", str(tmp_path / "a.sock"),
                             *args], env=env, capture_output=True, text=True, timeout=30,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 2 and message in result.stderr
    assert "TOPSECRET" not in result.stderr + result.stdout


def test_an_intercepted_host_is_reached_through_the_parent_too(squid, tls_origin, ca_file,
                                                               client_env,
                                                               tmp_path_factory) -> None:
    """A read_only host: the proxy opens its TLS, decides each request, and the requests it
    allows go to the origin through the parent; a refused one goes nowhere."""
    from test_interception import agent_env, intercept_policy

    workdir = tmp_path_factory.mktemp("parent-intercepting")
    process = ProxyProcess(workdir, intercept_policy(ca_file, tls_origin.port),
                           "--upstream-proxy", f"http://127.0.0.1:{squid.port}",
                           env={"XDG_DATA_HOME": str(workdir / "data")})
    try:
        env = agent_env(process, client_env)
        before, origin_before = len(squid.lines()), tls_origin.connections
        url = f"https://pypi.example.test:{tls_origin.port}/hello"
        got = subprocess.run(["curl", "-sS", "--max-time", "20", "-x", process.url, url],
                             env=env, capture_output=True, text=True, timeout=30)
        assert got.stdout.startswith("hello from tls-origin"), got.stdout + got.stderr
        posted = subprocess.run(["curl", "-sS", "--max-time", "20", "-x", process.url,
                                 "-d", "x=1", url], env=env, capture_output=True, text=True,
                                timeout=30)
        assert "agent-egress blocked this request" in posted.stdout
        _wait_for_line(squid, f"CONNECT pypi.example.test:{tls_origin.port}", before)
        assert tls_origin.connections == origin_before + 1  # the GET's; the POST went nowhere
    finally:
        process.stop()
