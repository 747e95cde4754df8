"""A signed managed policy fetched from a URL (serve --managed-url): keys and signatures, then
real proxies against a real loopback HTTPS server that publishes the policy and its .sig."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from agent_egress.policy.signed import Rejection, accept
from agent_egress.policy.signing import (
    SignatureError,
    SigningKeyError,
    generate_keypair,
    load_private_key,
    load_public_key,
    sign,
    verify,
)
from conftest import TLS_NAMES
from origins import free_port
from policyserver import PolicyServer
from proxyproc import ProxyProcess

RESOLVE = [arg for name in TLS_NAMES for arg in ("--resolve", f"{name}=127.0.0.1")]
USER = 'version = 1\n[network]\ndefault = "deny"\n'


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent_egress.proxy", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An administrator's key pair, made by `policy keygen`."""
    directory = tmp_path_factory.mktemp("keys")
    result = cli("policy", "keygen", "--out", str(directory / "admin.key"))
    assert result.returncode == 0, result.stderr
    return directory / "admin.key", directory / "admin.key.pub"


def managed(serial: int, allow: str, tls_port: int) -> bytes:
    return (f'version = 1\nserial = {serial}\n[network]\ndefault = "deny"\n'
            f'allow = [{allow}]\ndeny = ["denied.evil.test"]\nports = [443, {tls_port}]\n'
            f'allowed_cidrs = ["127.0.0.0/8"]\n').encode()


def signed(data: bytes, private: Path) -> bytes:
    return sign(data, load_private_key(private))


# -- keys and signatures ------------------------------------------------------------------------

def test_sign_and_verify(tmp_path, keys) -> None:
    private, public = keys
    data = b"version = 1\nserial = 1\n"
    signature = signed(data, private)
    assert signature.endswith(b"\n") and len(base64.b64decode(signature)) == 64
    key = load_public_key(public)
    assert verify(data, signature, [key], "x") is key
    assert verify(data, base64.b64decode(signature), [key], "x") is key  # the raw 64 bytes
    with pytest.raises(SignatureError, match="does not verify"):
        verify(data + b"#", signature, [key], "x")
    other = tmp_path / "other.pub"
    other.write_bytes(generate_keypair()[1])
    with pytest.raises(SignatureError, match="signed with another key"):
        verify(data, signature, [load_public_key(other)], "x")
    with pytest.raises(SignatureError, match="not an Ed25519 signature"):
        verify(data, b"not a signature\n", [key], "x.sig")
    with pytest.raises(SigningKeyError, match="this is a private key"):
        load_public_key(private)
    with pytest.raises(SigningKeyError, match="not a PEM private key"):
        load_private_key(public)


def test_openssl_signs_what_the_proxy_verifies(tmp_path, keys) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    private, public = keys
    policy = tmp_path / "managed.toml"
    policy.write_bytes(b"version = 1\nserial = 4\n")
    made = subprocess.run(["openssl", "pkeyutl", "-sign", "-rawin", "-inkey", str(private),
                           "-in", str(policy), "-out", str(tmp_path / "raw.sig")],
                          capture_output=True, timeout=30)
    if made.returncode != 0:
        pytest.skip(f"this openssl cannot sign raw Ed25519 input: {made.stderr!r}")
    result = cli("policy", "verify", str(policy), "--key", str(public),
                 "--sig", str(tmp_path / "raw.sig"))
    assert result.returncode == 0, result.stderr
    assert "signature OK" in result.stdout and "serial 4" in result.stdout


def test_accept_rules(keys) -> None:
    private, public = keys
    key = [load_public_key(public)]
    five = managed(5, '"a.test"', 443)
    in_force = accept(five, signed(five, private), key, "url", 0)
    assert in_force.serial == 5 and in_force.parsed.model.serial == 5
    # The version in force, again: accepted as itself (unchanged).
    assert accept(five, signed(five, private), key, "url", 5, in_force) is in_force
    cases = {
        "bad_signature": (five + b"#", signed(five, private)),
        "stale": (managed(4, '"b.test"', 443), None),
        "invalid": (b"version = 1\n[network]\ndefault = 'maybe'\nserial = 9\n", None),
    }
    for reason, (data, signature) in cases.items():
        with pytest.raises(Rejection) as caught:
            accept(data, signature or signed(data, private), key, "url", 5, in_force)
        assert caught.value.reason == reason, caught.value
    other_five = managed(5, '"b.test"', 443)  # the serial in force, other text
    with pytest.raises(Rejection, match="with other content") as caught:
        accept(other_five, signed(other_five, private), key, "url", 5, in_force)
    assert caught.value.reason == "stale"
    no_serial = b"version = 1\n"
    with pytest.raises(Rejection, match="needs a top-level serial") as caught:
        accept(no_serial, signed(no_serial, private), key, "url", 0)
    assert caught.value.reason == "invalid"
    huge = b"version = 1\nserial = 6\n" + b"#" * (4 * 1024 * 1024)
    with pytest.raises(Rejection) as caught:
        accept(huge, b"", key, "url", 5)
    assert caught.value.reason == "too_large"


def test_keygen_sign_verify_cli(tmp_path) -> None:
    assert cli("policy", "keygen", cwd=tmp_path).returncode == 0
    private, public = tmp_path / "agent-egress-policy.key", tmp_path / "agent-egress-policy.key.pub"
    assert private.stat().st_mode & 0o077 == 0
    again = cli("policy", "keygen", cwd=tmp_path)
    assert again.returncode == 2 and "never overwrites" in again.stderr
    policy = tmp_path / "managed.toml"
    policy.write_text("version = 1\n[network]\nallow = ['a.test']\n")
    refused = cli("policy", "sign", str(policy), "--key", str(private))
    assert refused.returncode == 2 and "needs a top-level serial" in refused.stderr
    assert not (tmp_path / "managed.toml.sig").exists()
    policy.write_text("version = 1\nserial = 1\n[network]\nallow = ['a.test']\n")
    result = cli("policy", "sign", str(policy), "--key", str(private))
    assert result.returncode == 0, result.stderr
    assert cli("policy", "verify", str(policy), "--key", str(public)).returncode == 0
    policy.write_text("version = 1\nserial = 1\n[network]\nallow = ['b.test']\n")
    tampered = cli("policy", "verify", str(policy), "--key", str(public))
    assert tampered.returncode == 1 and "does not verify" in tampered.stderr


def test_serve_refuses_conflicting_options(tmp_path, keys) -> None:
    both = cli("serve", "--managed", str(tmp_path / "m.toml"), "--managed-url",
               "https://127.0.0.1:1/m.toml", "--managed-key", str(keys[1]))
    assert both.returncode == 2 and "give one" in both.stderr
    keyless = cli("serve", "--managed-url", "https://127.0.0.1:1/m.toml")
    assert keyless.returncode == 2 and "needs --managed-key" in keyless.stderr
    private_key = cli("serve", "--managed-url", "https://127.0.0.1:1/m.toml", "--managed-key",
                      str(keys[0]))
    assert private_key.returncode == 2 and "this is a private key" in private_key.stderr


# -- the proxy ----------------------------------------------------------------------------------

@pytest.fixture
def server(ca) -> PolicyServer:
    server = PolicyServer(ca).start()
    yield server
    server.stop()


class Fleet:
    """Proxies started against the policy URL, sharing one managed-policy cache."""

    def __init__(self, tmp_path: Path, public: Path, ca_file: Path) -> None:
        self.tmp_path, self.public, self.ca_file = tmp_path, public, ca_file
        self.cache = tmp_path / "cache"
        self.starts = 0

    def start(self, url: str) -> ProxyProcess:
        self.starts += 1
        return ProxyProcess(self.tmp_path / f"proxy{self.starts}", USER, "--managed-url", url,
                            "--managed-key", str(self.public), "--managed-cache",
                            str(self.cache), "--managed-refresh", "0.2", *RESOLVE,
                            env={"SSL_CERT_FILE": str(self.ca_file)})


def curl(process: ProxyProcess, host: str, port: int, client_env: dict[str, str]) -> str:
    result = subprocess.run(["curl", "-sS", "-i", "-x", process.url,
                             f"https://{host}:{port}/hello"], env=client_env,
                            capture_output=True, text=True, timeout=30)
    return result.stdout + result.stderr


def decided(process: ProxyProcess, host: str, after: int = 0) -> dict:
    return process.wait_for_event(lambda e: e["event"] == "request.decided"
                                  and e.get("host") == host, after=after)


def until(predicate, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.05)


def running(process: ProxyProcess) -> dict:
    result = process.cli("policy", "show", "--json")
    return json.loads(result.stdout)["running"]["managed_url"]


def test_applied_then_updated_live(tmp_path, keys, server, tls_origin, ca_file,
                                   client_env) -> None:
    private, public = keys
    one = managed(1, '"allowed.test"', tls_origin.port)
    server.publish(one, signed(one, private))
    process = Fleet(tmp_path, public, ca_file).start(server.url)
    try:
        loaded = process.wait_for_event(lambda e: e["event"] == "policy.loaded")
        assert loaded["managed"] == server.url and loaded["serial"] == 1
        assert curl(process, "allowed.test", tls_origin.port, client_env).count(
            "hello from tls-origin")
        assert "HTTP/1.1 403" in curl(process, "other.test", tls_origin.port, client_env)
        assert decided(process, "other.test")["reason"] == "not_allowlisted"
        # Unchanged: asked with If-None-Match, answered 304, nothing logged.
        mark = process.mark()
        until(lambda: any(status == 304 for _, _, status in list(server.requests)),
              "a conditional request answered 304")
        assert any(match and status == 304 for _, match, status in server.requests)
        assert not process.events("policy.rejected")
        two = managed(2, '"allowed.test", "other.test"', tls_origin.port)
        server.publish(two, signed(two, private))
        event = process.wait_for_event(lambda e: e["event"] == "policy.loaded"
                                       and e.get("serial") == 2, after=mark)
        assert event["managed"] == server.url
        assert "hello from tls-origin" in curl(process, "other.test", tls_origin.port,
                                               client_env)
        assert running(process)["serial"] == 2
        assert process.process.poll() is None  # the same process: no restart
    finally:
        process.stop()


def rejected(process: ProxyProcess, reason: str, after: int = 0) -> dict:
    return process.wait_for_event(lambda e: e["event"] == "policy.rejected"
                                  and e.get("reason") == reason, after=after)


def test_tampered_stale_unsigned_rejected_and_last_good_kept_across_restart(
        tmp_path, keys, server, tls_origin, ca_file, client_env) -> None:
    private, public = keys
    good = managed(5, '"allowed.test"', tls_origin.port)
    server.publish(good, signed(good, private))
    fleet = Fleet(tmp_path, public, ca_file)
    process = fleet.start(server.url)
    try:
        process.wait_for_event(lambda e: e["event"] == "policy.loaded" and e.get("serial") == 5)
        wider = managed(6, '"allowed.test", "other.test"', tls_origin.port)
        attempts = {
            # Changed after it was signed (one more host allowed).
            "bad_signature": (wider, signed(good.replace(b"serial = 5", b"serial = 6"),
                                            private)),
            # An older version, properly signed: never put back in force.
            "stale": (managed(4, '"allowed.test", "other.test"', tls_origin.port), None),
            # No signature published (the .sig answers 404).
            "unsigned": (wider, b""),
        }
        for reason, (data, signature) in attempts.items():
            mark = process.mark()
            server.publish(data, None if signature == b"" else signature or signed(data, private))
            event = rejected(process, reason, after=mark)
            assert event["source"] == "url" and event["url"] == server.url
            assert event["in_force"] == 5 and event["error"]
            assert running(process)["serial"] == 5
            assert running(process)["last_failure"]["reason"] == reason
            assert "HTTP/1.1 403" in curl(process, "other.test", tls_origin.port, client_env)
            assert decided(process, "other.test", after=mark)["reason"] == "not_allowlisted"
        assert not [e for e in process.events("policy.loaded") if e.get("serial") != 5]
        health = process.cli("health")
        assert health.returncode == 0, health.stdout + health.stderr
        assert "serial 5 in force" in health.stdout and "unsigned" in health.stdout
    finally:
        process.stop()
    # A restart while the URL serves the stale version: the cache's floor rejects it.
    stale = managed(4, '"allowed.test", "other.test"', tls_origin.port)
    server.publish(stale, signed(stale, private))
    process = fleet.start(server.url)
    try:
        assert rejected(process, "stale")["trigger"] == "start"
        loaded = process.wait_for_event(lambda e: e["event"] == "policy.loaded")
        assert loaded["serial"] == 5
        assert "hello from tls-origin" in curl(process, "allowed.test", tls_origin.port,
                                               client_env)
        assert "HTTP/1.1 403" in curl(process, "other.test", tls_origin.port, client_env)
    finally:
        process.stop()
    # A restart with the URL down: the cached version, verified, is enforced.
    server.stop()
    process = fleet.start(server.url)
    try:
        event = rejected(process, "fetch_failed")
        assert event["trigger"] == "start" and event["in_force"] == 5
        assert process.wait_for_event(lambda e: e["event"] == "policy.loaded")["serial"] == 5
        assert "hello from tls-origin" in curl(process, "allowed.test", tls_origin.port,
                                               client_env)
        assert "HTTP/1.1 403" in curl(process, "other.test", tls_origin.port, client_env)
        assert "serial 5 in force" in process.cli("health").stdout
        # Down for a while: one event for the failure, not one per refresh.
        until(lambda: running(process)["last_failure"]["count"] >= 3, "more failed refreshes")
        assert len(process.events("policy.rejected")) == 1
    finally:
        process.stop()


def test_tampered_cache_is_rejected_and_everything_refused(tmp_path, keys, server, tls_origin,
                                                           ca_file, client_env) -> None:
    private, public = keys
    good = managed(3, '"allowed.test"', tls_origin.port)
    server.publish(good, signed(good, private))
    fleet = Fleet(tmp_path, public, ca_file)
    process = fleet.start(server.url)
    try:
        process.wait_for_event(lambda e: e["event"] == "policy.loaded" and e.get("serial") == 3)
    finally:
        process.stop()
    cache = fleet.cache / "cache.json"
    record = json.loads(cache.read_text())
    wider = good.replace(b'"allowed.test"', b'"allowed.test", "other.test"')
    record["policy"] = base64.b64encode(wider).decode()
    cache.write_text(json.dumps(record))
    server.stop()  # and the URL is down
    process = fleet.start(server.url)
    try:
        event = rejected(process, "bad_signature")
        assert event["trigger"] == "start (cache)"
        loaded = process.wait_for_event(lambda e: e["event"] == "policy.loaded")
        assert loaded["managed_unavailable"] is True
        for host in ("allowed.test", "other.test"):
            assert "HTTP/1.1 403" in curl(process, host, tls_origin.port, client_env)
            assert decided(process, host)["reason"] == "managed_policy_unavailable"
    finally:
        process.stop()


def test_never_good_refuses_everything_until_a_version_verifies(
        tmp_path, keys, ca, tls_origin, ca_file, client_env) -> None:
    private, public = keys
    port = free_port()
    url = f"https://127.0.0.1:{port}/fleet/managed.toml"
    process = Fleet(tmp_path, public, ca_file).start(url)
    server = None
    try:
        assert "UNAVAILABLE" in "".join(process.output)
        rejected(process, "fetch_failed")
        result = subprocess.run(["curl", "-sS", "-i", "-x", process.url,
                                 f"http://allowed.test:{tls_origin.port}/hello"],
                                env=client_env, capture_output=True, text=True, timeout=30)
        assert result.stdout.startswith("HTTP/1.1 403")
        assert "reason: managed_policy_unavailable" in result.stdout
        assert "agent-egress health" in result.stdout
        health = process.cli("health")
        assert health.returncode == 1
        assert "UNAVAILABLE" in health.stdout and "every request is refused" in health.stdout
        # The URL comes up with a good version: applied at the next refresh.
        server = PolicyServer(ca, port)
        good = managed(1, '"allowed.test"', tls_origin.port)
        server.publish(good, signed(good, private))
        server.start()
        process.wait_for_event(lambda e: e["event"] == "policy.loaded" and e.get("serial") == 1)
        assert "hello from tls-origin" in curl(process, "allowed.test", tls_origin.port,
                                               client_env)
        assert process.cli("health").returncode == 0
    finally:
        process.stop()
        if server is not None:
            server.stop()
