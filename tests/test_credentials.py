"""The credential broker: the agent holds a placeholder, the proxy adds the real secret for
bound hosts only. Real clients (curl, httpx, git) through `run` against local TLS origins; a
real Secret Service (gnome-keyring on a private D-Bus) for the keyring source."""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_egress.policy import PolicyError, load_policy
from agent_egress.proxy.secretstore import SecretError, placeholder_for, read_secret
from conftest import TLS_NAMES
from keyringd import SecretService
from origins import CountingServer
from test_interception import GIT_IDENTITY, isolated_env

SECRET = "ghp_R3alS3cretValue0123456789abcdefXYZ"
BASIC = base64.b64encode(f"x-access-token:{SECRET}".encode()).decode()


def credential_policy(ca_file: Path, port: int, source: str = "env:REAL_GH_TOKEN") -> str:
    resolve = "\n".join(f'"{name}" = "127.0.0.1"' for name in TLS_NAMES)
    return f"""version = 1
[network]
default = "deny"
allow = ["api.example.test", "git.example.test", "pypi.example.test", "allowed.test"]
ports = [80, 443, {port}]
allowed_cidrs = ["127.0.0.0/8"]
upstream_ca_file = "{ca_file}"
read_only = ["pypi.example.test"]  # intercepted: the proxy sees what is sent there

[[credentials]]
name = "github"
env = "GH_TOKEN"
source = "{source}"
hosts = ["api.example.test", "git.example.test"]

[resolve]
{resolve}
"""


def run(workdir: Path, env: dict[str, str], script: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "agent_egress.proxy", "run", "--config",
         str(workdir / "policy.toml"), "--audit-log", str(workdir / "audit.jsonl"), "--",
         "sh", "-c", script], env=env, capture_output=True, text=True, timeout=120,
        stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def broker(tls_origin: CountingServer, ca_file: Path, client_env: dict[str, str],
           tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    workdir = tmp_path_factory.mktemp("broker")
    (workdir / "policy.toml").write_text(credential_policy(ca_file, tls_origin.port))
    env = isolated_env({**client_env, **GIT_IDENTITY, "REAL_GH_TOKEN": SECRET},
                       workdir / "home")
    return workdir, env


def outputs(workdir: Path, *results: subprocess.CompletedProcess) -> str:
    """Everything a secret could leak into: the audit log and every output."""
    return "\n".join([(workdir / "audit.jsonl").read_text()]
                     + [r.stdout + r.stderr for r in results])


def assert_no_secret(text: str) -> None:
    for form in (SECRET, base64.b64encode(SECRET.encode()).decode(), BASIC, SECRET[4:20]):
        assert form not in text


def test_the_bound_host_gets_the_secret_and_the_agent_only_a_placeholder(
        broker, tls_origin) -> None:
    workdir, env = broker
    before = len(tls_origin.authorizations)
    url = f"https://api.example.test:{tls_origin.port}/hello/bearer"
    result = run(workdir, env, f'echo "token=$GH_TOKEN real=$REAL_GH_TOKEN"; '
                               f'curl -sS --max-time 20 -H "Authorization: Bearer $GH_TOKEN" {url}')
    assert result.returncode == 0, result.stderr
    token = re.search(r"token=(\S+) real=(\S*)", result.stdout)
    assert token is not None, result.stdout
    placeholder, real = token.groups()
    assert real == ""  # the env: source is the proxy's, not handed to the agent
    assert "WARNING: the command runs as your user" in result.stderr  # it could read /proc
    assert placeholder != SECRET and placeholder.startswith("ghp_")
    assert len(placeholder) == len(SECRET)
    assert "hello from tls-origin: /hello/bearer" in result.stdout
    assert tls_origin.authorizations[before:] == [f"Bearer {SECRET}"]
    events = (workdir / "audit.jsonl").read_text()
    assert '"event": "credential.used"' in events and '"credential": "github"' in events
    assert_no_secret(outputs(workdir, result))


@pytest.mark.parametrize(("name", "curl_args", "where"), [
    ("another host", '-H "Authorization: Bearer $GH_TOKEN" https://pypi.example.test:{port}/hello',
     "not bound to"),
    ("the query", '"https://api.example.test:{port}/hello?t=$GH_TOKEN"', "in the URL"),
    ("another header", '-H "X-Token: $GH_TOKEN" https://api.example.test:{port}/hello',
     "x-token header"),
    ("a body", '--data "leak=$GH_TOKEN" https://api.example.test:{port}/hello', "body"),
    ("plain HTTP", '-H "Authorization: Bearer $GH_TOKEN" http://api.example.test:{port}/hello',
     "plain HTTP"),
])
def test_a_placeholder_anywhere_else_is_refused_and_reaches_nobody(
        broker, tls_origin, plain_origin, name, curl_args, where) -> None:
    workdir, env = broker
    port = plain_origin.port if name == "plain HTTP" else tls_origin.port
    if name == "plain HTTP":
        policy = (workdir / "policy.toml").read_text()
        if str(plain_origin.port) not in policy:
            (workdir / "policy.toml").write_text(policy.replace(
                f"ports = [80, 443, {tls_origin.port}]",
                f"ports = [80, 443, {tls_origin.port}, {plain_origin.port}]"))
    origins_before = (len(tls_origin.requests), len(plain_origin.requests))
    result = run(workdir, env, "curl -sS --max-time 20 " + curl_args.format(port=port))
    assert "reason: credential_misdirected" in result.stdout, result.stdout + result.stderr
    assert "credential 'github' (GH_TOKEN)" in result.stdout and where in result.stdout
    assert (len(tls_origin.requests), len(plain_origin.requests)) == origins_before
    events = [line for line in (workdir / "audit.jsonl").read_text().splitlines()
              if "credential_misdirected" in line]
    assert events and '"severity": "high"' in events[-1]
    assert_no_secret(outputs(workdir, result))


def test_an_origin_echoing_the_header_shows_the_agent_only_its_placeholder(broker,
                                                                          tls_origin) -> None:
    workdir, env = broker
    before = len(tls_origin.authorizations)
    result = run(workdir, env, 'echo "token=$GH_TOKEN"; curl -sS --max-time 20 -H '
                               f'"Authorization: Bearer $GH_TOKEN" '
                               f"https://api.example.test:{tls_origin.port}/headers")
    placeholder = re.search(r"token=(\S+)", result.stdout).group(1)
    assert f"authorization: Bearer {placeholder}" in result.stdout, result.stdout
    assert tls_origin.authorizations[before:] == [f"Bearer {SECRET}"]
    assert_no_secret(outputs(workdir, result))
    basic = run(workdir, env, 'echo "token=$GH_TOKEN"; curl -sS --max-time 20 -u '
                              f'"x-access-token:$GH_TOKEN" '
                              f"https://api.example.test:{tls_origin.port}/headers")
    placeholder = re.search(r"token=(\S+)", basic.stdout).group(1)
    echoed = base64.b64encode(f"x-access-token:{placeholder}".encode()).decode()
    assert f"authorization: Basic {echoed}" in basic.stdout, basic.stdout
    assert tls_origin.authorizations[-1] == f"Basic {BASIC}"
    assert_no_secret(outputs(workdir, basic))


def test_a_passthrough_host_gets_the_placeholder_never_the_secret(broker, tls_origin) -> None:
    """The proxy cannot see inside a tunnel it passes through: a placeholder sent there
    arrives as it is, which is worth nothing to whoever receives it."""
    workdir, env = broker
    before = len(tls_origin.authorizations)
    result = run(workdir, env, f'curl -sS --max-time 20 -H "Authorization: Bearer $GH_TOKEN" '
                               f"https://allowed.test:{tls_origin.port}/hello/pass")
    assert "hello from tls-origin" in result.stdout, result.stdout + result.stderr
    [seen] = tls_origin.authorizations[before:]
    assert seen is not None and seen.startswith("Bearer ghp_") and SECRET not in seen


def test_httpx_with_the_placeholder(broker, tls_origin, tmp_path) -> None:
    workdir, env = broker
    before = len(tls_origin.authorizations)
    script = tmp_path / "agent.py"
    script.write_text(
        "import os, ssl, httpx\n"
        "trust = ssl.create_default_context(cafile=os.environ['SSL_CERT_FILE'])\n"
        "with httpx.Client(proxy=os.environ['HTTPS_PROXY'], verify=trust) as client:\n"
        f"    r = client.get('https://api.example.test:{tls_origin.port}/hello/httpx',\n"
        "                   headers={'Authorization': 'token ' + os.environ['GH_TOKEN']})\n"
        "print(r.status_code)\n")
    result = run(workdir, env, f"{sys.executable} {script}")
    assert result.stdout.strip() == "200", result.stdout + result.stderr
    assert tls_origin.authorizations[before:] == [f"token {SECRET}"]


def test_git_clone_of_a_private_repository_with_basic_auth(broker, tls_origin, webroot,
                                                           tmp_path) -> None:
    workdir, env = broker
    source = tmp_path / "source"
    source.mkdir()
    git_env = {**GIT_IDENTITY, "HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    for args in (("init", "-q", "-b", "main", "."), ("commit", "-q", "--allow-empty", "-m",
                                                      "private")):
        subprocess.run(["git", *args], cwd=source, env=git_env, check=True)
    subprocess.run(["git", "clone", "-q", "--bare", str(source), str(webroot / "secret.git")],
                   env=git_env, check=True)
    tls_origin.basic_auth = f"Basic {BASIC}"
    try:
        url = f"https://git.example.test:{tls_origin.port}/private/secret.git"
        helper = ("!f() { echo username=x-access-token; echo password=$GH_TOKEN; }; f")
        result = run(workdir, env, f"git -c credential.helper='{helper}' clone -q {url} "
                                   f"{tmp_path / 'clone'}")
    finally:
        tls_origin.basic_auth = None
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "clone" / ".git").is_dir()
    assert f"Basic {BASIC}" in tls_origin.authorizations
    assert_no_secret(outputs(workdir, result))


# -- sources, placeholders, policy ------------------------------------------------------------


@pytest.mark.parametrize("secret", [SECRET, "github_pat_11ABCDEFG0123456789_abcdefXYZ",
                                    "sk-proj-abc_DEF-123456789012", "xoxb-1234-5678-abcdEFGH",
                                    "plainsecretvalue", "--------"])
def test_placeholders_have_the_secrets_shape(secret: str) -> None:
    placeholder = placeholder_for(secret)
    assert placeholder != secret and secret not in placeholder
    assert len(placeholder) >= len(secret)
    for prefix in ("ghp_", "github_pat_", "sk-proj-", "xoxb-"):
        if secret.startswith(prefix):
            assert placeholder.startswith(prefix) and len(placeholder) == len(secret)
            tail = zip(secret[len(prefix):], placeholder[len(prefix):], strict=True)
            assert all(a.isdigit() == b.isdigit() and a.isupper() == b.isupper()
                       for a, b in tail)
    assert placeholder_for(secret) != placeholder  # fresh each time


def test_env_and_file_sources_and_their_errors(tmp_path: Path) -> None:
    assert read_secret("gh", "env:GH_REAL", {"GH_REAL": SECRET}) == SECRET
    secret_file = tmp_path / "gh"
    secret_file.write_text(SECRET + "\n")
    assert read_secret("gh", f"file:{secret_file}") == SECRET
    for source, environ, words in (("env:NOPE", {}, "has no NOPE"),
                                   (f"file:{tmp_path}/missing", {}, "cannot read"),
                                   ("env:SHORT", {"SHORT": "abc"}, "at least 8")):
        with pytest.raises(SecretError, match=words) as raised:
            read_secret("gh", source, environ)
        assert "abc" not in str(raised.value) or words == "at least 8"


def test_credential_policy_errors(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text('version = 1\n[network]\npassthrough = ["api.example.test"]\n\n'
                    '[[credentials]]\nname = "gh"\nenv = "GH_TOKEN"\nsource = "env:X"\n'
                    'hosts = ["*.example.test"]\n\n'
                    '[[credentials]]\nname = "gh"\nenv = "GH_TOKEN"\nsource = "vault:x"\n'
                    'hosts = ["*"]\n')
    with pytest.raises(PolicyError) as raised:
        load_policy(path)
    text = str(raised.value)
    assert f"{path}:14: credentials[1].source: source 'vault:x': use keyring:SERVICE/USER" in text
    path.write_text(path.read_text().replace('"vault:x"', '"env:Y"'))
    with pytest.raises(PolicyError) as raised:
        load_policy(path)
    text = str(raised.value)
    assert "a credential's hosts must be named" in text
    assert "name 'gh' is used by another credential" in text
    assert "passthrough 'api.example.test' and credential 'gh' name the same hosts" in text


def test_managed_credential_hosts_bound_user_credentials(tmp_path: Path) -> None:
    (tmp_path / "managed.toml").write_text(
        'version = 1\n[requirements]\ncredential_hosts = ["*.github.com", "github.com"]\n')
    (tmp_path / "user.toml").write_text(
        'version = 1\n\n[[credentials]]\nname = "ok"\nenv = "GH_TOKEN"\nsource = "env:A"\n'
        'hosts = ["api.github.com"]\n\n[[credentials]]\nname = "exfil"\nenv = "T"\n'
        'source = "env:B"\nhosts = ["evil.example"]\n')
    policy = load_policy(tmp_path / "user.toml", managed=tmp_path / "managed.toml")
    assert policy.credentials is not None
    assert [c.name for c in policy.credentials.all] == ["ok"]
    assert any("'exfil' binds hosts outside the managed credential_hosts" in p
               for p in policy.problems)
    assert policy.intercepts("api.github.com", 443)
    assert not policy.intercepts("evil.example", 443)


# -- the keyring ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def secret_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecretService]:
    if not SecretService.available():
        pytest.skip("needs gnome-keyring and dbus (Debian: gnome-keyring dbus)")
    service = SecretService(tmp_path_factory.mktemp("keyring-home"))
    yield service
    service.stop()


def cli(env: dict[str, str], *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent_egress.proxy", *args], env=env,
                          input=stdin, capture_output=True, text=True, timeout=60)


def test_credentials_set_list_delete_with_a_real_keyring(secret_service, tls_origin, ca_file,
                                                         client_env, tmp_path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(credential_policy(ca_file, tls_origin.port,
                                        source="keyring:agent-egress/github"))
    env = {**client_env, **secret_service.env}
    listed = cli(env, "credentials", "list", "--config", str(policy))
    assert "no secret in the keyring for agent-egress/github" in listed.stdout
    stored = cli(env, "credentials", "set", "github", "--config", str(policy),
                 stdin=SECRET + "\n")
    assert stored.returncode == 0, stored.stderr
    listed = cli(env, "credentials", "list", "--config", str(policy), "--json")
    assert '"secret": "present"' in listed.stdout
    assert_no_secret(stored.stdout + stored.stderr + listed.stdout + listed.stderr)
    # The proxy reads it from the keyring: the origin sees the secret.
    workdir = tmp_path / "w"
    workdir.mkdir()
    (workdir / "policy.toml").write_text(policy.read_text())
    before = len(tls_origin.authorizations)
    result = run(workdir, isolated_env(env, tmp_path / "agent-home") | {
        "DBUS_SESSION_BUS_ADDRESS": secret_service.env["DBUS_SESSION_BUS_ADDRESS"],
        "XDG_DATA_HOME": secret_service.env["XDG_DATA_HOME"]},
        f'curl -sS --max-time 20 -H "Authorization: Bearer $GH_TOKEN" '
        f"https://api.example.test:{tls_origin.port}/hello/keyring")
    assert "hello from tls-origin" in result.stdout, result.stdout + result.stderr
    assert tls_origin.authorizations[before:] == [f"Bearer {SECRET}"]
    assert_no_secret(outputs(workdir, result))
    deleted = cli(env, "credentials", "delete", "github", "--config", str(policy))
    assert deleted.returncode == 0, deleted.stderr
    again = cli(env, "credentials", "delete", "github", "--config", str(policy))
    assert again.returncode == 1 and "no secret stored" in again.stderr
    wrong = cli(env, "credentials", "set", "nope", "--config", str(policy), stdin="x" * 10)
    assert wrong.returncode == 2 and "no credential named 'nope'" in wrong.stderr


def test_an_unreadable_secret_refuses_requests_carrying_its_placeholder(
        tls_origin, ca_file, client_env, tmp_path) -> None:
    workdir = tmp_path
    (workdir / "policy.toml").write_text(credential_policy(ca_file, tls_origin.port,
                                                           source="env:NOT_SET_ANYWHERE"))
    env = isolated_env({k: v for k, v in client_env.items() if k != "NOT_SET_ANYWHERE"},
                       tmp_path / "home")
    before = len(tls_origin.requests)
    result = run(workdir, env, f'curl -sS --max-time 20 -H "Authorization: Bearer $GH_TOKEN" '
                               f"https://api.example.test:{tls_origin.port}/hello")
    assert "reason: credential_unavailable" in result.stdout, result.stdout + result.stderr
    assert len(tls_origin.requests) == before
    assert "credential.unavailable" in (workdir / "audit.jsonl").read_text()
    assert os.environ.get("NOT_SET_ANYWHERE") is None


def test_serve_prints_and_env_hands_out_the_placeholder(tls_origin, ca_file,
                                                        tmp_path) -> None:
    from proxyproc import ProxyProcess

    proxy = ProxyProcess(tmp_path, credential_policy(ca_file, tls_origin.port),
                         env={"REAL_GH_TOKEN": SECRET})
    try:
        printed = re.search(r"^  GH_TOKEN=(\S+)$", "".join(proxy.output), re.M)
        assert printed is not None, proxy.output
        result = proxy.cli("env", "--shell", "dotenv", "--no-check")
        assert result.returncode == 0, result.stderr
        assert f"GH_TOKEN={printed.group(1)}" in result.stdout
        assert_no_secret(result.stdout + result.stderr + "".join(proxy.output))
        shown = proxy.cli("policy", "show", "--config", str(proxy.policy_path))
        assert "credential github (GH_TOKEN, env:REAL_GH_TOKEN)" in shown.stdout
        assert_no_secret(shown.stdout)
    finally:
        proxy.stop()


def agent_variables(proxy) -> dict[str, str]:
    result = proxy.cli("env", "--shell", "dotenv", "--no-check", "--config",
                       str(proxy.policy_path))
    assert result.returncode == 0, result.stderr
    return dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)


def test_a_reload_cannot_rebind_a_credential_to_another_host(tls_origin, ca_file, client_env,
                                                            tmp_path) -> None:
    """The agent may be able to edit the user policy file: a credential changed after the
    proxy started is not used until a restart, so an edit cannot send the secret elsewhere."""
    from proxyproc import ProxyProcess

    proxy = ProxyProcess(tmp_path, credential_policy(ca_file, tls_origin.port),
                         env={"REAL_GH_TOKEN": SECRET})
    try:
        agent = {**client_env, **agent_variables(proxy)}
        edited = proxy.policy_path.read_text().replace(
            'hosts = ["api.example.test", "git.example.test"]',
            'hosts = ["api.example.test", "git.example.test", "pypi.example.test"]')
        mark = proxy.mark()
        proxy.policy_path.write_text(edited)
        proxy.wait_for_event(lambda e: e["event"] == "policy.loaded", after=mark, timeout=10)
        before = len(tls_origin.authorizations)
        for host in ("pypi.example.test", "api.example.test"):
            result = subprocess.run(
                ["curl", "-sS", "--max-time", "20", "-x", proxy.url, "-H",
                 f"Authorization: Bearer {agent['GH_TOKEN']}",
                 f"https://{host}:{tls_origin.port}/hello"],
                env=agent, capture_output=True, text=True, timeout=60)
            assert "reason: credential_" in result.stdout, result.stdout  # refused either way
        assert all(SECRET not in (a or "") for a in tls_origin.authorizations[before:])
        assert any("changed after the proxy started" in e.get("detail", "")
                   for e in proxy.events("credential.unavailable"))
    finally:
        proxy.stop()


def test_a_streamed_body_goes_out_with_the_secret_in_its_head(broker, tls_origin,
                                                              tmp_path) -> None:
    """A chunked upload (git push's) sends its head before the body arrives: the swap is made
    when the request is allowed, not after the body."""
    workdir, env = broker
    payload = tmp_path / "payload"
    payload.write_bytes(b"x" * (2 << 20))
    before = len(tls_origin.authorizations)
    result = run(workdir, env, f'curl -sS --max-time 30 -o /dev/null '
                               f'-H "Transfer-Encoding: chunked" -H "Authorization: Bearer '
                               f'$GH_TOKEN" --data-binary @{payload} '
                               f"https://api.example.test:{tls_origin.port}/upload")
    # (The test origin answers a chunked upload badly; what matters is the head it got.)
    seen = tls_origin.authorizations[before:]
    assert seen and set(seen) == {f"Bearer {SECRET}"}, result.stderr


@pytest.mark.parametrize(("script", "where"), [
    ('printf "leak=%s" "$GH_TOKEN" | gzip > "$HOME/body.gz"; curl -sS --max-time 20 '
     '-H "Content-Encoding: gzip" --data-binary @"$HOME/body.gz" '
     "https://api.example.test:{port}/hello", "request body"),
    ('curl -sS --max-time 20 -H "Authorization: Basic	$(printf "x:%s" "$GH_TOKEN" | base64 -w0)"'
     " https://pypi.example.test:{port}/hello", "not bound to"),
])
def test_encoded_placeholders_are_still_seen(broker, tls_origin, script, where) -> None:
    workdir, env = broker
    before = len(tls_origin.requests)
    result = run(workdir, env, script.format(port=tls_origin.port))
    assert "reason: credential_misdirected" in result.stdout, result.stdout + result.stderr
    assert where in result.stdout
    assert len(tls_origin.requests) == before


def test_a_malformed_answer_echoing_the_request_never_shows_the_secret(
        ca, ca_file, client_env, tmp_path) -> None:
    """mitmproxy's own error page quotes the origin's bytes; an origin that echoes the request
    in a broken status line would hand the agent the secret through it."""
    import socket
    import ssl
    import threading

    from proxyproc import ProxyProcess

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert(*TLS_NAMES).configure_cert(context)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        raw, _ = listener.accept()
        with context.wrap_socket(raw, server_side=True) as tls:
            head = b""
            while b"\r\n\r\n" not in head:
                head += tls.recv(65536)
            tls.sendall(b"HTTP/1.1 XYZ " + head.replace(b"\r\n", b" ") + b"\r\n\r\n")

    threading.Thread(target=serve, daemon=True).start()
    proxy = ProxyProcess(tmp_path, credential_policy(ca_file, port),
                         env={"REAL_GH_TOKEN": SECRET})
    try:
        agent = {**client_env, **agent_variables(proxy)}
        result = subprocess.run(
            ["curl", "-sS", "--max-time", "20", "-x", proxy.url, "-H",
             f"Authorization: Bearer {agent['GH_TOKEN']}",
             f"https://api.example.test:{port}/hello"],
            env=agent, capture_output=True, text=True, timeout=60)
        assert "the origin's response could not be read" in result.stdout, result.stdout
        assert_no_secret(result.stdout + result.stderr + "".join(proxy.output)
                         + proxy.audit_path.read_text())
    finally:
        proxy.stop()
        listener.close()


def test_websocket_frames_never_carry_the_secret_to_the_agent(ca, ca_file, client_env,
                                                              tmp_path) -> None:
    import ssl
    import threading

    from proxyproc import ProxyProcess
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect
    from websockets.sync.server import serve

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("api.example.test").configure_cert(context)

    def tell(websocket) -> None:  # an origin that echoes the credential it got
        websocket.send(f"you sent {websocket.request.headers['Authorization']}")
        for message in websocket:
            websocket.send(f"echo {message}")

    server = serve(tell, "127.0.0.1", 0, ssl=context)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.socket.getsockname()[1]
    proxy = ProxyProcess(tmp_path, credential_policy(ca_file, port),
                         env={"REAL_GH_TOKEN": SECRET})
    try:
        agent = {**client_env, **agent_variables(proxy)}
        placeholder = agent["GH_TOKEN"]
        trust = ssl.create_default_context(cafile=agent["SSL_CERT_FILE"])
        with connect(f"wss://api.example.test:{port}/ws", proxy=proxy.url, ssl=trust,
                     additional_headers={"Authorization": f"Bearer {placeholder}"},
                     open_timeout=15) as websocket:
            got = websocket.recv(timeout=10)
            assert got == f"you sent Bearer {placeholder}", "".join(proxy.output)[-3000:]
            websocket.send(f"here it is: {placeholder}")
            with pytest.raises((ConnectionClosed, TimeoutError)):
                websocket.recv(timeout=5)
        event = proxy.wait_for_event(lambda e: e.get("reason") == "credential_misdirected")
        assert "WebSocket message" in event["detail"] and event["severity"] == "high"
        assert_no_secret(proxy.audit_path.read_text() + "".join(proxy.output))
    finally:
        proxy.stop()
        server.shutdown()
