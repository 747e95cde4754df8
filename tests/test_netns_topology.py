"""The sidecar topology, proven with Linux network namespaces (no container engine here).

agent-ns --veth-- proxy-ns --veth-- origin-ns. The agent's only link is to the proxy's
namespace, which does not forward packets: a direct connection to the origin fails, requests
through the proxy obey the policy. All addresses exist only inside these namespaces.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest
from proxyproc import ProxyProcess

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                                reason="needs root and iproute2 for network namespaces")

SUFFIX = str(os.getpid() % 100000)
AGENT, PROXY, ORIGIN = (f"ae-{role}-{SUFFIX}" for role in ("agent", "proxy", "origin"))
PROXY_ADDRESS, ORIGIN_ADDRESS = "10.213.1.1", "10.213.2.2"
ORIGIN_PORT = 8000


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def in_ns(namespace: str, *command: str) -> list[str]:
    return ["ip", "netns", "exec", namespace, *command]


@pytest.fixture(scope="module")
def topology(tmp_path_factory):
    created = []
    try:
        for namespace in (AGENT, PROXY, ORIGIN):
            ip("netns", "add", namespace)
            created.append(namespace)
            ip("-n", namespace, "link", "set", "lo", "up")
        pairs = [(AGENT, f"aea{SUFFIX}", "10.213.1.2/24", PROXY, f"aep{SUFFIX}",
                  f"{PROXY_ADDRESS}/24"),
                 (PROXY, f"aeq{SUFFIX}", "10.213.2.1/24", ORIGIN, f"aeo{SUFFIX}",
                  f"{ORIGIN_ADDRESS}/24")]
        for left_ns, left, left_ip, right_ns, right, right_ip in pairs:
            ip("link", "add", left, "type", "veth", "peer", "name", right)
            ip("link", "set", left, "netns", left_ns)
            ip("link", "set", right, "netns", right_ns)
            ip("-n", left_ns, "addr", "add", left_ip, "dev", left)
            ip("-n", right_ns, "addr", "add", right_ip, "dev", right)
            ip("-n", left_ns, "link", "set", left, "up")
            ip("-n", right_ns, "link", "set", right, "up")
        subprocess.run(in_ns(PROXY, "sysctl", "-qw", "net.ipv4.ip_forward=0"), check=True)
        webroot = tmp_path_factory.mktemp("ns-www")
        (webroot / "hello").write_text("hello from the origin namespace\n")
        origin = subprocess.Popen(in_ns(ORIGIN, sys.executable, "-m", "http.server", "--bind",
                                        ORIGIN_ADDRESS, "--directory", str(webroot),
                                        str(ORIGIN_PORT)),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        policy = (f'version = 1\n[network]\nallow = ["origin.test"]\ndefault = "deny"\n'
                  f'ports = [{ORIGIN_PORT}]\nallowed_cidrs = ["10.213.2.0/24"]\n'
                  f'[resolve]\n"origin.test" = "{ORIGIN_ADDRESS}"\n'
                  f'"other.test" = "{ORIGIN_ADDRESS}"\n')
        proxy = ProxyProcess(tmp_path_factory.mktemp("ns-proxy"), policy,
                             listen=f"{PROXY_ADDRESS}:0", prefix=tuple(in_ns(PROXY)))
        for _ in range(50):  # the origin is up once the proxy's namespace can reach it
            probe = subprocess.run(in_ns(PROXY, "curl", "-s", "-o", "/dev/null", "--max-time",
                                         "1", f"http://{ORIGIN_ADDRESS}:{ORIGIN_PORT}/hello"))
            if probe.returncode == 0:
                break
            time.sleep(0.1)
        yield proxy
        proxy.stop()
        origin.terminate()
        origin.wait(10)
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"network namespaces unavailable here: {exc.stderr}")
    finally:
        for namespace in created:
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)


def agent_curl(*args: str) -> subprocess.CompletedProcess:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    return subprocess.run(in_ns(AGENT, "curl", "-sS", "--max-time", "3", *args), env=env,
                          capture_output=True, text=True, timeout=30)


def test_agent_cannot_reach_the_origin_directly(topology) -> None:
    direct = agent_curl(f"http://{ORIGIN_ADDRESS}:{ORIGIN_PORT}/hello")
    assert direct.returncode != 0
    assert "hello" not in direct.stdout
    # Even with a route through the proxy's namespace, nothing is forwarded.
    subprocess.run(in_ns(AGENT, "ip", "route", "add", "10.213.2.0/24", "via", PROXY_ADDRESS),
                   check=True)
    try:
        routed = agent_curl(f"http://{ORIGIN_ADDRESS}:{ORIGIN_PORT}/hello")
        assert routed.returncode != 0
    finally:
        subprocess.run(in_ns(AGENT, "ip", "route", "del", "10.213.2.0/24"), check=True)


def test_requests_through_the_proxy_obey_the_policy(topology) -> None:
    allowed = agent_curl("-x", topology.url, f"http://origin.test:{ORIGIN_PORT}/hello")
    assert allowed.stdout == "hello from the origin namespace\n", allowed.stderr
    denied = agent_curl("-i", "-x", topology.url, f"http://other.test:{ORIGIN_PORT}/hello")
    assert denied.stdout.startswith("HTTP/1.1 403")
    literal = agent_curl("-i", "-x", topology.url, f"http://{ORIGIN_ADDRESS}:{ORIGIN_PORT}/")
    assert literal.stdout.startswith("HTTP/1.1 403")
    event = topology.wait_for_event(lambda e: e.get("host") == "origin.test")
    assert event["client"].startswith("10.213.1.2:") and event["address"] == ORIGIN_ADDRESS
