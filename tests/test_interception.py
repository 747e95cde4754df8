"""Request-level rules on intercepted hosts, end to end: real clients (curl, git, pip, npm,
httpx, Python 3.13, websockets) through the proxy against local TLS origins, trusting the
proxy's local CA through the variables `run` sets."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import shutil
import ssl
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trustme
from conftest import TLS_NAMES
from holding import wait_pending
from origins import CountingServer
from proxyproc import ProxyProcess

PY313 = Path("/root/.pyenv/versions/3.13.0/bin/python")
GIT_IDENTITY = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.test",
                "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.test",
                "GIT_TERMINAL_PROMPT": "0"}


def intercept_policy(ca_file: Path, *ports: int, extra: str = "") -> str:
    port_list = ", ".join(str(p) for p in (80, 443, *ports))
    resolve = "\n".join(f'"{name}" = "127.0.0.1"' for name in TLS_NAMES)
    return f"""version = 1
[network]
default = "deny"
allow = ["allowed.test", "pypi.example.test", "git.example.test", "npm.example.test",
         "api.example.test", "ws.example.test", "h2.example.test", "badcert.example.test",
         "mtls.example.test"]
ports = [{port_list}]
allowed_cidrs = ["127.0.0.0/8", "::1/128"]
read_only = ["pypi.example.test", "npm.example.test"]
request_default = "deny"
passthrough = ["mtls.example.test"]
explain_https = true
upstream_ca_file = "{ca_file}"

[[network.requests]]
host = "git.example.test"
methods = ["GET", "HEAD"]
action = "allow"

[[network.requests]]
host = "git.example.test"
methods = ["POST"]
paths = ["/smart/*/git-upload-pack"]
action = "allow"

[[network.requests]]
host = "api.example.test"
methods = ["GET"]
action = "allow"

[[network.requests]]
host = "api.example.test"
paths = ["/hello/secret/**"]
action = "deny"

[[network.requests]]
host = "api.example.test"
methods = ["POST"]
paths = ["/ask/**"]
action = "ask"

[[network.requests]]
host = "ws.example.test"
methods = ["GET"]
paths = ["/chat"]
action = "allow"

[[network.requests]]
host = "h2.example.test"
action = "allow"
{extra}
[approvals]
timeout = 30

[resolve]
{resolve}
"""


def isolated_env(base: dict[str, str], home: Path) -> dict[str, str]:
    home.mkdir(parents=True, exist_ok=True)
    return {**base, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
            "XDG_DATA_HOME": str(home / ".local/share"), "XDG_STATE_HOME": str(home / ".state"),
            "XDG_CACHE_HOME": str(home / ".cache"), "PYTHONUNBUFFERED": "1"}


def agent_env(proxy: ProxyProcess, client_env: dict[str, str]) -> dict[str, str]:
    """What `agent-egress env` prints for this proxy, applied to the client's environment."""
    result = subprocess.run(
        [sys.executable, "-m", "agent_egress.proxy", "env", "--shell", "dotenv", "--proxy",
         proxy.url, "--config", str(proxy.policy_path)],
        env={**proxy.env(), **{k: v for k, v in client_env.items() if k.endswith(
            ("CA_BUNDLE", "CERT_FILE", "CAINFO", "PIP_CERT"))}},
        capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    variables = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    assert "SSL_CERT_FILE" in variables, result.stdout
    return {**client_env, **variables}


@pytest.fixture(scope="module")
def origin_ca_file(ca_file: Path) -> Path:
    return ca_file


@pytest.fixture(scope="module")
def stranger_origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CountingServer]:
    """An origin whose certificate the proxy has no reason to trust."""
    stranger = trustme.CA()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    stranger.issue_cert("api.example.test").configure_cert(context)
    origin = CountingServer("stranger", tmp_path_factory.mktemp("stranger"), context).start()
    yield origin
    origin.stop()


@pytest.fixture(scope="module")
def mtls_origin(ca: trustme.CA,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[CountingServer]:
    """An origin that requires a client certificate (a passthrough host)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("mtls.example.test").configure_cert(context)
    context.verify_mode = ssl.CERT_REQUIRED  # no client certificate, no handshake
    ca.configure_trust(context)
    origin = CountingServer("mtls", tmp_path_factory.mktemp("mtls"), context).start()
    yield origin
    origin.stop()


@pytest.fixture(scope="module")
def intercepting(tls_origin: CountingServer, stranger_origin: CountingServer,
                 mtls_origin: CountingServer, ca_file: Path,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    workdir = tmp_path_factory.mktemp("intercepting")
    process = ProxyProcess(workdir, intercept_policy(ca_file, tls_origin.port,
                                                     stranger_origin.port, mtls_origin.port),
                           env={"XDG_DATA_HOME": str(workdir / "data")})
    yield process
    process.stop()


@pytest.fixture(scope="module")
def agent(intercepting: ProxyProcess, client_env: dict[str, str]) -> dict[str, str]:
    return agent_env(intercepting, client_env)


def final_status(output: str) -> int:
    """The status of the last response curl -i printed (after the CONNECT's 200)."""
    statuses = [line.split()[1] for line in output.splitlines() if line.startswith("HTTP/")]
    assert statuses, output
    return int(statuses[-1])


def curl(env: dict[str, str], proxy: ProxyProcess, url: str, *args: str
         ) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "-x", proxy.url, "--max-time", "20", *args, url],
                          env=env, capture_output=True, text=True, timeout=60)


# -- curl and the decisions ---------------------------------------------------------------


def test_allowed_get_reaches_the_origin_with_event(intercepting, agent, tls_origin) -> None:
    mark = intercepting.mark()
    url = f"https://api.example.test:{tls_origin.port}/hello/there?token=s3cret"
    result = curl(agent, intercepting, url)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("hello from tls-origin: /hello/there?token=s3cret")
    event = intercepting.wait_for_event(
        lambda e: e["event"] == "request.decided" and e.get("path") == "/hello/there",
        after=mark)
    assert event["intercepted"] is True and event["method"] == "GET"
    assert event["decision"] == "allow" and event["reason"] == "request_rule"
    assert "s3cret" not in json.dumps(intercepting.events()[mark:])


def test_refused_method_is_a_403_naming_method_path_and_rule(intercepting, agent,
                                                             tls_origin) -> None:
    before = len(tls_origin.requests)
    mark = intercepting.mark()
    url = f"https://api.example.test:{tls_origin.port}/hello/upload?x=1"
    result = curl(agent, intercepting, url, "-i", "-X", "POST", "--data", "exfiltrated")
    assert result.returncode == 0, result.stderr
    assert final_status(result.stdout) == 403, result.stdout
    assert "POST /hello/upload" in result.stdout and "x=1" not in result.stdout
    assert "reason: method_not_allowed" in result.stdout
    assert "network.requests[" in result.stdout  # the rule
    assert "what to do:" in result.stdout
    event = intercepting.wait_for_event(
        lambda e: e["event"] == "request.decided" and e.get("method") == "POST", after=mark)
    assert event["reason"] == "method_not_allowed" and event["intercepted"] is True
    assert len(tls_origin.requests) == before  # nothing reached the origin


def test_deny_rule_beats_allow_and_paths_are_canonical(intercepting, agent,
                                                       tls_origin) -> None:
    base = f"https://api.example.test:{tls_origin.port}"
    for path in ("/hello/secret/key", "/hello/%73ecret/key", "/hello/x/../secret/key"):
        result = curl(agent, intercepting, base + path, "-i", "--path-as-is")
        assert final_status(result.stdout) in (403, 400), (path, result.stdout)
    allowed = curl(agent, intercepting, base + "/hello/public")
    assert allowed.returncode == 0 and allowed.stdout.startswith("hello from")


def test_read_only_refuses_writes_whatever_else(intercepting, agent, tls_origin) -> None:
    url = f"https://pypi.example.test:{tls_origin.port}/hello/upload"
    result = curl(agent, intercepting, url, "-i", "-X", "PUT", "--data", "x")
    assert final_status(result.stdout) == 403 and "reason: read_only" in result.stdout
    before = len(tls_origin.requests)
    head = curl(agent, intercepting, url, "-I")
    assert final_status(head.stdout) != 403, head.stdout  # the origin's own answer
    assert any(line.startswith("HEAD /hello/upload") for line in tls_origin.requests[before:])


@pytest.mark.parametrize(("where", "override", "reason"), [
    ("pypi.example.test/hello/item", ("-H", "X-HTTP-Method-Override: DELETE"), "read_only"),
    ("pypi.example.test/hello/item", ("-H", "x-http-method: put"), "read_only"),
    ("pypi.example.test/hello/item", ("-H", "X-Method-Override: PATCH"), "read_only"),
    # POST is allowed there; the DELETE it stands for is not.
    ("git.example.test/smart/r/git-upload-pack", ("-X", "POST", "--data", "",
                                                  "--url-query", "_method=DELETE"),
     "method_not_allowed"),
])
def test_method_overrides_are_decided_as_the_method_they_ask_for(
        intercepting, agent, tls_origin, where, override, reason) -> None:
    """Frameworks read these as the real method: a GET to a read-only host must not become a
    DELETE in the application behind it."""
    before = len(tls_origin.requests)
    host, _, path = where.partition("/")
    result = curl(agent, intercepting, f"https://{host}:{tls_origin.port}/{path}", "-i",
                  *override)
    assert final_status(result.stdout) == 403, result.stdout
    assert f"reason: {reason}" in result.stdout and "asks for it" in result.stdout
    assert len(tls_origin.requests) == before


def test_requests_in_an_intercepted_tunnel_must_name_its_host(intercepting, agent,
                                                              tls_origin) -> None:
    before = len(tls_origin.requests)
    url = f"https://api.example.test:{tls_origin.port}/hello/there"
    result = curl(agent, intercepting, url, "-i", "-H", "Host: other.test")
    assert final_status(result.stdout) in (400, 403), result.stdout
    assert "host_mismatch" in result.stdout or "invalid_request" in result.stdout
    h1 = curl(agent, intercepting, url, "-i", "--http1.1", "-H", "Host: pypi.example.test")
    assert final_status(h1.stdout) in (400, 403), h1.stdout
    assert len(tls_origin.requests) == before


def test_explain_https_tells_a_refused_destination_over_tls(intercepting, agent,
                                                           tls_origin) -> None:
    before = tls_origin.connections
    mark = intercepting.mark()
    result = curl(agent, intercepting, f"https://other.test:{tls_origin.port}/hello", "-i")
    assert result.returncode == 0, result.stderr
    assert final_status(result.stdout) == 403
    assert "reason: not_allowlisted" in result.stdout
    assert tls_origin.connections == before  # nothing upstream
    event = intercepting.wait_for_event(
        lambda e: e["event"] == "request.decided" and e.get("explained"), after=mark)
    assert event["host"] == "other.test" and event["path"] == "/hello"


def test_upstream_certificate_failure_is_a_502_never_insecure(intercepting, agent,
                                                              stranger_origin) -> None:
    origin = stranger_origin
    mark = intercepting.mark()
    result = curl(agent, intercepting, f"https://api.example.test:{origin.port}/hello", "-i")
    assert final_status(result.stdout) == 502, result.stdout + result.stderr
    assert "upstream_tls_error" in result.stdout
    assert "tls_certificate_error" in result.stdout  # Proxy-Status
    assert origin.requests == []
    failed = intercepting.wait_for_event(
        lambda e: e.get("reason") == "upstream_tls_error", after=mark)
    assert failed["event"] == "request.failed" and failed["intercepted"] is True
    assert any(e.get("side") == "origin" and e.get("host") == "api.example.test"
               for e in intercepting.events("tls.failed"))


def test_a_client_that_does_not_trust_the_ca_is_refused_not_passed_through(
        intercepting, client_env, tls_origin) -> None:
    """Without the CA the agent's handshake fails: never a fallback to passthrough (which
    would skip the request rules)."""
    before = len(tls_origin.requests)
    mark = intercepting.mark()
    result = curl(client_env, intercepting,
                  f"https://api.example.test:{tls_origin.port}/hello/untrusting")
    assert result.returncode == 60, result.stderr  # curl: peer certificate not trusted
    assert len(tls_origin.requests) == before
    event = intercepting.wait_for_event(
        lambda e: e.get("event") == "tls.failed" and e.get("side") == "agent", after=mark)
    assert "agent-egress ca path" in event["hint"]


def test_ask_rule_holds_a_write_until_a_person_decides(intercepting, agent,
                                                       tls_origin) -> None:
    url = f"https://api.example.test:{tls_origin.port}/ask/issue"
    client = subprocess.Popen(["curl", "-sS", "-x", intercepting.url, "--max-time", "40",
                               "--data", "hello", url], env=agent, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        pending = wait_pending(intercepting, lambda p: p["path"] == "/ask/issue")
        assert pending["method"] == "POST" and pending["request_rule"]
        decided = intercepting.cli("approve", pending["id"])
        assert decided.returncode == 0, decided.stderr
        out, err = client.communicate(timeout=30)
    finally:
        client.kill()
    assert out == "hello", err


def test_passthrough_host_sees_the_clients_own_certificate(intercepting, agent, ca,
                                                           mtls_origin, tmp_path) -> None:
    client_cert = ca.issue_cert("agent@example.test")
    pem = tmp_path / "client.pem"
    client_cert.private_key_and_cert_chain_pem.write_to_path(str(pem))
    url = f"https://mtls.example.test:{mtls_origin.port}/hello"
    result = curl(agent, intercepting, url, "--cert", str(pem))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("hello from mtls"), result.stdout
    # Without its certificate the client is turned away by the origin itself: the proxy
    # neither terminated the TLS nor made a handshake of its own.
    refused = curl(agent, intercepting, url)
    assert refused.returncode != 0 and "hello" not in refused.stdout


# -- other clients ------------------------------------------------------------------------


def test_httpx_through_the_intercepting_proxy(intercepting, agent, tls_origin) -> None:
    verify = ssl.create_default_context(cafile=agent["SSL_CERT_FILE"])
    with httpx.Client(proxy=intercepting.url, verify=verify, trust_env=False) as client:
        ok = client.get(f"https://api.example.test:{tls_origin.port}/hello/httpx")
        refused = client.delete(f"https://api.example.test:{tls_origin.port}/hello/httpx")
    assert ok.status_code == 200 and ok.text.startswith("hello from")
    assert refused.status_code == 403
    assert refused.headers["x-proxy-error"] == "blocked-by-policy"
    assert "error=http_request_denied" in refused.headers["proxy-status"]


@pytest.mark.skipif(not PY313.exists(), reason="needs the Python 3.13 interpreter")
def test_python313_default_context_accepts_the_leaf(intercepting, agent, tls_origin) -> None:
    code = ("import os, ssl, urllib.request\n"
            "ctx = ssl.create_default_context()\n"
            "assert ctx.verify_flags & ssl.VERIFY_X509_STRICT\n"
            f"handler = urllib.request.ProxyHandler({{'https': {intercepting.url!r}}})\n"
            "opener = urllib.request.build_opener(handler, "
            "urllib.request.HTTPSHandler(context=ctx))\n"
            f"print(opener.open('https://api.example.test:{tls_origin.port}/hello/313').read()"
            ".decode())\n")
    result = subprocess.run([str(PY313), "-I", "-c", code], env=agent, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("hello from tls-origin: /hello/313")


def _wheel(directory: Path) -> Path:
    import zipfile

    name = "ro_pkg-1.0-py3-none-any.whl"
    files = {"ro_pkg/__init__.py": b"", "ro_pkg-1.0.dist-info/METADATA":
             b"Metadata-Version: 2.1\nName: ro-pkg\nVersion: 1.0\n",
             "ro_pkg-1.0.dist-info/WHEEL":
             b"Wheel-Version: 1.0\nGenerator: t\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files["ro_pkg-1.0.dist-info/RECORD"] = ("".join(f"{p},,\n" for p in files)
                                            + "ro_pkg-1.0.dist-info/RECORD,,\n").encode()
    path = directory / name
    with zipfile.ZipFile(path, "w") as archive:
        for member, data in files.items():
            archive.writestr(member, data)
    return path


def test_pip_download_under_read_only(intercepting, agent, tls_origin, webroot,
                                      tmp_path) -> None:
    wheel = _wheel(webroot)
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    project = webroot / "ro-simple" / "ro-pkg"
    project.mkdir(parents=True, exist_ok=True)
    (project / "index.html").write_text(
        f'<a href="../../{wheel.name}#sha256={digest}">{wheel.name}</a>\n')
    index = f"https://pypi.example.test:{tls_origin.port}/ro-simple/"
    env = {**agent, "PIP_CONFIG_FILE": "/dev/null"}
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
         "--no-cache-dir", "--retries", "0", "--timeout", "15", "--proxy", intercepting.url,
         "--index-url", index, "-d", str(tmp_path), "ro-pkg==1.0"],
        env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / wheel.name).exists()
    assert any(e.get("host") == "pypi.example.test" and e.get("intercepted")
               for e in intercepting.events("request.decided"))


def _npm_package(webroot: Path, base: str) -> None:
    """A package document and its tarball, as a registry serves them."""
    package = json.dumps({"name": "ro-npm", "version": "1.0.0", "main": "index.js"}).encode()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in (("package/package.json", package),
                           ("package/index.js", b"module.exports = 42;\n")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    tarball = buffer.getvalue()
    (webroot / "npm" / "-").mkdir(parents=True, exist_ok=True)
    (webroot / "npm" / "-" / "ro-npm-1.0.0.tgz").write_bytes(tarball)
    integrity = "sha512-" + base64.b64encode(hashlib.sha512(tarball).digest()).decode()
    document = {"name": "ro-npm", "dist-tags": {"latest": "1.0.0"}, "versions": {"1.0.0": {
        "name": "ro-npm", "version": "1.0.0", "main": "index.js",
        "dist": {"tarball": f"{base}/-/ro-npm-1.0.0.tgz", "integrity": integrity,
                 "shasum": hashlib.sha1(tarball).hexdigest()}}}}
    (webroot / "npm" / "ro-npm.json").write_text(json.dumps(document))


@pytest.mark.skipif(shutil.which("npm") is None, reason="needs npm")
def test_npm_install_under_read_only(intercepting, agent, tls_origin, webroot,
                                     tmp_path) -> None:
    registry = f"https://npm.example.test:{tls_origin.port}/npm"
    _npm_package(webroot, registry)
    project = tmp_path / "project"
    project.mkdir()
    (project / "package.json").write_text('{"name": "p", "version": "1.0.0"}')
    env = {**agent, "npm_config_userconfig": str(tmp_path / "npmrc"),
           "npm_config_cache": str(tmp_path / "npm-cache"), "HOME": str(tmp_path),
           "HTTPS_PROXY": intercepting.url, "https_proxy": intercepting.url,
           "npm_config_update_notifier": "false"}
    result = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--registry",
                             registry, "ro-npm@1.0.0"], cwd=project, env=env,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (project / "node_modules" / "ro-npm" / "index.js").exists()
    # A write to the registry (npm publish's PUT) is refused by read_only.
    refused = curl(agent, intercepting, registry + "/ro-npm", "-i", "-X", "PUT", "--data", "{}")
    assert "reason: read_only" in refused.stdout
