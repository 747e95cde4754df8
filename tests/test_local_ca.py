"""The local CA (`agent-egress ca`), the trust bundle `env` and `run` hand agents, and the
leaf certificates' acceptance by strict verifiers (Python 3.13, OpenSSL 3)."""

from __future__ import annotations

import os
import ssl
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import trustme
from agent_egress.proxy.ca import CAError, LocalCA
from agent_egress.proxy.trust import (
    BUNDLE_VARIABLES,
    bundle_text,
    ca_environment,
    existing_trust,
    write_trust,
)
from cryptography import x509
from test_interception import PY313, isolated_env


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent_egress.proxy", *args], env=env,
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


@pytest.fixture
def home_env(tmp_path: Path) -> dict[str, str]:
    return isolated_env(dict(os.environ), tmp_path / "home")


def test_ca_path_creates_a_private_ca_under_xdg_data_home(home_env: dict[str, str]) -> None:
    result = cli(home_env, "ca", "path")
    assert result.returncode == 0, result.stderr
    cert = Path(result.stdout.strip())
    directory = Path(home_env["XDG_DATA_HOME"]) / "agent-egress" / "ca"
    assert cert.parent == directory and cert.is_file()
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    key = directory / "agent-egress-ca.pem"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in key.read_bytes() and b"PRIVATE KEY" not in cert.read_bytes()
    assert not (Path(home_env["HOME"]) / ".mitmproxy").exists()
    assert not list(directory.glob("*.p12")) and not list(directory.glob(".new-*"))
    # Asked again: the same CA.
    assert cli(home_env, "ca", "path").stdout == result.stdout
    exported = cli(home_env, "ca", "export")
    assert exported.returncode == 0 and exported.stdout.encode() == cert.read_bytes()


def test_ca_rotate_replaces_the_ca(home_env: dict[str, str]) -> None:
    before = cli(home_env, "ca", "export").stdout
    rotated = cli(home_env, "ca", "rotate")
    assert rotated.returncode == 0, rotated.stderr
    assert "restart running proxies" in rotated.stderr
    after = cli(home_env, "ca", "export").stdout
    assert after.startswith("-----BEGIN CERTIFICATE-----") and after != before


def test_a_ca_directory_others_can_write_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    with pytest.raises(CAError, match="writable by other users"):
        LocalCA(shared / "ca").ensure()


def test_ca_errors_are_said_with_exit_status_1(home_env: dict[str, str], tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = cli(home_env, "ca", "path", "--ca-dir", str(blocker / "ca"))
    assert result.returncode == 1
    assert result.stderr.startswith("agent-egress ca: ")


def test_leaf_has_the_identifiers_strict_verifiers_need(tmp_path: Path) -> None:
    ca = LocalCA(tmp_path / "ca")
    ca.ensure()
    leaf = ca.entry("api.example.test").cert.to_cryptography()
    root = x509.load_pem_x509_certificate(ca.pem())
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["api.example.test"]
    address = ca.entry("127.0.0.1").cert.to_cryptography()
    sans = address.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(a) for a in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]


def test_python313_strict_context_verifies_a_leaf(tmp_path: Path) -> None:
    """VERIFY_X509_STRICT (3.13's default) over a real handshake with a leaf of the CA."""
    if not PY313.exists():
        pytest.skip("needs the Python 3.13 interpreter")
    ca = LocalCA(tmp_path / "ca")
    ca.ensure()
    entry = ca.entry("strict.example.test")
    pem = tmp_path / "leaf.pem"
    pem.write_bytes(entry.cert.to_pem() + ca.key_path.read_bytes())
    script = f"""
import ssl, socket, threading
server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
server.load_cert_chain({str(pem)!r})
listener = socket.create_server(("127.0.0.1", 0))
def serve():
    conn, _ = listener.accept()
    with server.wrap_socket(conn, server_side=True) as tls:
        tls.sendall(b"ok")
threading.Thread(target=serve, daemon=True).start()
client = ssl.create_default_context(cafile={str(ca.cert_path)!r})
assert client.verify_flags & ssl.VERIFY_X509_STRICT
with socket.create_connection(listener.getsockname()) as raw:
    with client.wrap_socket(raw, server_hostname="strict.example.test") as tls:
        print(tls.recv(2).decode())
"""
    result = subprocess.run([str(PY313), "-I", "-c", script], capture_output=True, text=True,
                            timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


# -- the trust bundle -----------------------------------------------------------------------


def test_bundle_keeps_the_users_trust_and_adds_the_ca_once(tmp_path: Path) -> None:
    ca = LocalCA(tmp_path / "ca")
    corporate = trustme.CA()
    corporate_file = tmp_path / "corporate.pem"
    corporate.cert_pem.write_to_path(str(corporate_file))
    environ = {"SSL_CERT_FILE": str(corporate_file), "PIP_CERT": str(tmp_path / "missing.pem")}
    assert existing_trust(environ) == [corporate_file]
    bundle, certificate = write_trust(ca, tmp_path / "trust", environ)
    text = bundle.read_bytes()
    assert corporate.cert_pem.bytes().strip() in text and ca.pem().strip() in text
    assert certificate.read_bytes() == ca.pem()
    assert stat.S_IMODE(bundle.stat().st_mode) == 0o644
    # A bundle made from an earlier bundle holds each certificate once.
    again = bundle_text([bundle], ca.pem())
    assert again.count(b"BEGIN CERTIFICATE") == 2
    # Both verify: the user's own origins and intercepted ones.
    context = ssl.create_default_context(cafile=str(bundle))
    assert len(context.get_ca_certs()) == 2


def test_without_variables_the_system_store_is_kept(tmp_path: Path) -> None:
    sources = existing_trust({})
    assert sources and all(path.is_file() for path in sources)
    assert bundle_text(sources, b"").count(b"BEGIN CERTIFICATE") > 10


def test_the_variables_point_at_the_bundle_and_node_at_the_ca_alone(tmp_path: Path) -> None:
    env = ca_environment(tmp_path / "bundle.pem", tmp_path / "ca.pem")
    for name in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "GIT_SSL_CAINFO",
                 "PIP_CERT", "NPM_CONFIG_CAFILE", "npm_config_cafile", "CARGO_HTTP_CAINFO",
                 "BUNDLE_SSL_CA_CERT", "DENO_CERT", "AWS_CA_BUNDLE"):
        assert env[name] == str(tmp_path / "bundle.pem"), name
    assert env["NODE_EXTRA_CA_CERTS"] == str(tmp_path / "ca.pem")
    assert set(env) == {*BUNDLE_VARIABLES, "NODE_EXTRA_CA_CERTS"}


def test_env_sets_the_ca_variables_only_when_the_policy_intercepts(
        home_env: dict[str, str], tmp_path: Path) -> None:
    plain = tmp_path / "plain.toml"
    plain.write_text('version = 1\n[network]\nallow = ["github.com"]\n')
    result = cli(home_env, "env", "--shell", "dotenv", "--no-check", "--config", str(plain))
    assert result.returncode == 0, result.stderr
    assert "HTTPS_PROXY=" in result.stdout and "SSL_CERT_FILE" not in result.stdout
    ruled = tmp_path / "ruled.toml"
    ruled.write_text('version = 1\n[network]\nallow = ["github.com"]\n'
                     'read_only = ["github.com"]\n')
    result = cli(home_env, "env", "--shell", "dotenv", "--no-check", "--config", str(ruled))
    assert result.returncode == 0, result.stderr
    variables = dict(line.split("=", 1) for line in result.stdout.splitlines())
    bundle = Path(variables["SSL_CERT_FILE"])
    assert bundle.is_relative_to(Path(home_env["XDG_DATA_HOME"]))
    assert variables["NODE_EXTRA_CA_CERTS"].endswith("agent-egress-ca.pem")
    ca_cert = Path(variables["NODE_EXTRA_CA_CERTS"]).read_bytes()
    assert ca_cert.strip() in bundle.read_bytes()
    explicit = cli(home_env, "env", "--shell", "dotenv", "--no-check", "--config", str(plain),
                   "--ca-file", "/etc/my-bundle.pem")
    assert "SSL_CERT_FILE=/etc/my-bundle.pem" in explicit.stdout
