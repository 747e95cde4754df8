"""Intercepted hosts speak what their clients speak: HTTP/2 on both sides (ALPN) and
WebSocket (the upgrade request is decided by the request rules); git through `run`, with a
push refused and git printing why; `run` turns explain_https on."""

from __future__ import annotations

import shutil
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from origins import CountingServer
from proxyproc import ProxyProcess
from test_interception import GIT_IDENTITY, agent_env, curl, intercept_policy, isolated_env

_H2_ORIGIN = r"""
const http2 = require('http2'); const fs = require('fs');
const server = http2.createSecureServer({key: fs.readFileSync(process.argv[1]),
    cert: fs.readFileSync(process.argv[2]), allowHTTP1: true}, (req, res) => {
  res.setHeader('content-type', 'text/plain');
  res.end(`http/${req.httpVersion} ${req.method} ${req.url}\n`);
});
server.listen(0, '127.0.0.1', () => console.log(server.address().port));
"""


@pytest.fixture(scope="module")
def proxy(h2_origin: int, wss_origin: int, ca_file: Path,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    workdir = tmp_path_factory.mktemp("intercepting-protocols")
    process = ProxyProcess(workdir, intercept_policy(ca_file, h2_origin, wss_origin),
                           env={"XDG_DATA_HOME": str(workdir / "data")})
    yield process
    process.stop()


@pytest.fixture(scope="module")
def agent(proxy: ProxyProcess, client_env: dict[str, str]) -> dict[str, str]:
    return agent_env(proxy, client_env)


@pytest.fixture(scope="module")
def h2_origin(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    if shutil.which("node") is None:
        pytest.skip("needs node")
    directory = tmp_path_factory.mktemp("h2-origin")
    leaf = ca.issue_cert("h2.example.test")
    key, cert = directory / "key.pem", directory / "cert.pem"
    leaf.private_key_pem.write_to_path(str(key))
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    process = subprocess.Popen(["node", "-e", _H2_ORIGIN, str(key), str(cert)],
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    port = int(process.stdout.readline())
    yield port
    process.kill()
    process.wait()


def test_http2_on_both_sides(proxy, agent, h2_origin) -> None:
    result = curl(agent, proxy, f"https://h2.example.test:{h2_origin}/two", "--http2",
                  "-w", "client=%{http_version}\n")
    assert result.returncode == 0, result.stderr
    assert "http/2.0 GET /two" in result.stdout  # the proxy spoke h2 to the origin
    assert "client=2" in result.stdout  # and to curl
    event = proxy.wait_for_event(lambda e: e.get("path") == "/two")
    assert event["intercepted"] is True and event["decision"] == "allow"


def test_http1_client_of_an_h2_origin(proxy, agent, h2_origin) -> None:
    result = curl(agent, proxy, f"https://h2.example.test:{h2_origin}/one", "--http1.1",
                  "-w", "client=%{http_version}\n")
    assert result.returncode == 0, result.stderr
    assert "GET /one" in result.stdout and "client=1.1" in result.stdout


@pytest.fixture(scope="module")
def wss_origin(ca: trustme.CA) -> Iterator[int]:
    from websockets.sync.server import serve

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("ws.example.test").configure_cert(context)

    def echo(websocket) -> None:
        for message in websocket:
            websocket.send(f"echo {message}")

    server = serve(echo, "127.0.0.1", 0, ssl=context)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.socket.getsockname()[1]
    server.shutdown()


def test_websocket_upgrade_decided_by_request_rules(proxy, agent, wss_origin) -> None:
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    context = ssl.create_default_context(cafile=agent["SSL_CERT_FILE"])
    with connect(f"wss://ws.example.test:{wss_origin}/chat", proxy=proxy.url, ssl=context,
                 open_timeout=15) as websocket:
        websocket.send("hi")
        assert websocket.recv(timeout=10) == "echo hi"
    with pytest.raises(InvalidStatus) as refused:
        connect(f"wss://ws.example.test:{wss_origin}/admin", proxy=proxy.url, ssl=context,
                open_timeout=15)
    assert refused.value.response.status_code == 403
    assert b"path_not_allowed" in refused.value.response.body
    event = proxy.wait_for_event(lambda e: e.get("path") == "/admin")
    assert event["websocket"] is True and event["intercepted"] is True


# -- through `run` ------------------------------------------------------------------------


def run(workdir: Path, env: dict[str, str], *command: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "agent_egress.proxy", "run", "--config",
         str(workdir / "policy.toml"), "--audit-log", str(workdir / "audit.jsonl"), "--",
         *command], env=env, capture_output=True, text=True, timeout=120,
        stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def run_setup(tls_origin: CountingServer, ca_file: Path, client_env: dict[str, str],
              tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    workdir = tmp_path_factory.mktemp("run-intercepting")
    # No explain_https in the file: `run` turns it on, as it sets the CA variables.
    policy = intercept_policy(ca_file, tls_origin.port).replace("explain_https = true\n", "")
    (workdir / "policy.toml").write_text(policy)
    env = isolated_env({**client_env, **GIT_IDENTITY}, workdir / "home")
    return workdir, env


@pytest.fixture(scope="module")
def smart_repo(webroot: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    work = tmp_path_factory.mktemp("smart-work")
    env = {**GIT_IDENTITY, "HOME": str(work), "PATH": "/usr/bin:/bin"}
    for args in (("init", "-q", "-b", "main", "."), ("commit", "-q", "--allow-empty", "-m",
                                                      "first")):
        subprocess.run(["git", *args], cwd=work, env=env, check=True, capture_output=True)
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(webroot / "smart.git")],
                   env=env, check=True, capture_output=True)
    return "smart/smart.git"


def test_git_clone_allowed_and_push_refused_with_the_reason(run_setup, tls_origin,
                                                           smart_repo) -> None:
    workdir, env = run_setup
    url = f"https://git.example.test:{tls_origin.port}/{smart_repo}"
    clone = workdir / "clone"
    result = run(workdir, env, "git", "clone", "-q", url, str(clone))
    assert result.returncode == 0, result.stdout + result.stderr
    subprocess.run(["git", "commit", "-q", "--allow-empty", "-m", "exfiltrate"], cwd=clone,
                   env=env, check=True)
    before = list(tls_origin.requests)
    result = run(workdir, env, "git", "-C", str(clone), "push", "origin", "main")
    assert result.returncode != 0
    assert "remote: agent-egress blocked this request." in result.stderr, result.stderr
    assert "POST /smart/smart.git/git-receive-pack" in result.stderr
    assert not any("git-receive-pack" in line for line in tls_origin.requests[len(before):])


def test_run_explains_a_refused_https_destination(run_setup, tls_origin) -> None:
    workdir, env = run_setup
    result = run(workdir, env, "curl", "-sS", "--max-time", "20",
                 f"https://other.test:{tls_origin.port}/hello")
    assert "agent-egress blocked this request." in result.stdout, result.stdout + result.stderr
    assert "reason: not_allowlisted" in result.stdout
