"""OpenTelemetry export to real OTLP receivers (HTTP/protobuf and gRPC) in the test."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from holding import ask_policy, start_curl, wait_pending
from otlp import GrpcReceiver, HttpReceiver, StallingCollector, closed_port_endpoint
from proxyproc import ProxyProcess, owner_args


def otel_env(endpoint: str, protocol: str = "http/protobuf") -> dict[str, str]:
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
            "OTEL_METRIC_EXPORT_INTERVAL": "300",
            "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=test",
            "OTEL_EXPORTER_OTLP_HEADERS": "x-tenant=team-a"}


def curl(env, proxy_url: str, url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "-i", "--max-time", "20", "-x", proxy_url, *args, url],
                          env=env, capture_output=True, text=True, timeout=30)


@pytest.fixture
def http_receiver():
    receiver = HttpReceiver()
    yield receiver
    receiver.stop()


def test_scripted_session_over_http_protobuf(tmp_path, http_receiver, tls_origin, plain_origin,
                                             client_env) -> None:
    process = ProxyProcess(tmp_path / "p", ask_policy(tls_origin.port, plain_origin.port),
                           env=otel_env(http_receiver.endpoint))
    agent_url = "http://agent-7:s3cretpw@127.0.0.1:{port}"
    try:
        proxy_url = agent_url.format(port=process.port)
        allowed = curl(client_env, proxy_url,
                       f"http://u:userpw@allowed.test:{plain_origin.port}/hello?token=QSECRET")
        assert "hello from plain-origin" in allowed.stdout
        assert "Proxy-Authorization" not in allowed.stdout  # never forwarded
        tls = curl(client_env, proxy_url, f"https://allowed.test:{tls_origin.port}/hello")
        assert "hello from tls-origin" in tls.stdout
        denied = curl(client_env, proxy_url, f"http://denied.evil.test:{plain_origin.port}/")
        assert denied.stdout.startswith("HTTP/1.1 403")
        held = start_curl(client_env, process, f"http://ask.test:{plain_origin.port}/x")
        pending = wait_pending(process)
        assert process.cli("approve", pending["id"]).returncode == 0
        held.communicate(timeout=30)
        received = http_receiver.received
        received.wait_for(lambda: "agent_egress.decisions" in received.metrics)
    finally:
        assert process.stop() == 0
    received.wait_for(lambda: received.events("proxy.stopped"))

    decided = received.events("request.decided")
    allowed_plain = next(e for e in decided if e["attributes"].get("url.path") == "/hello"
                         and e["attributes"]["url.scheme"] == "http")
    attrs = allowed_plain["attributes"]
    assert attrs["server.address"] == "allowed.test"
    assert attrs["server.port"] == plain_origin.port
    assert attrs["http.request.method"] == "GET"
    assert attrs["client.address"] == "127.0.0.1" and isinstance(attrs["client.port"], int)
    assert attrs["network.protocol.name"] == "http"
    assert attrs["agent_egress.decision"] == "allow"
    assert attrs["agent_egress.rule"] == "allowed.test"
    assert attrs["agent_egress.layer"] == "user"
    assert attrs["agent_egress.reason"] == "allowlist"
    assert attrs["agent_egress.agent"] == "agent-7"
    assert allowed_plain["body"] == f"allow allowed.test:{plain_origin.port} (allowlist)"
    # The names Codex's network proxy uses, beside ours: its dashboards read these.
    assert attrs["network.policy.decision"] == "allow"
    assert attrs["network.policy.reason"] == "allowlist"
    assert attrs["network.policy.source"] == "baseline_policy"
    assert attrs["network.transport.protocol"] == "http"
    tunnel = next(e for e in decided if e["attributes"]["url.scheme"] == "connect")
    assert tunnel["attributes"]["network.transport.protocol"] == "https_connect"
    assert tunnel["attributes"]["http.request.method"] == "none"
    deny = next(e for e in decided if e["attributes"]["agent_egress.decision"] == "deny")
    assert deny["severity"] == "WARN"
    assert deny["attributes"]["agent_egress.reason"] == "denylist"
    approved = next(e for e in decided if e["attributes"].get("agent_egress.reason") ==
                    "approved")
    assert approved["attributes"]["agent_egress.approval.id"] == pending["id"]
    assert approved["attributes"]["agent_egress.approval.actor"].startswith("uid:")
    assert approved["attributes"]["network.policy.source"] == "decider"
    held_event = next(e for e in decided if e["attributes"]["agent_egress.decision"] == "held")
    assert held_event["attributes"]["network.policy.decision"] == "ask"
    (requested,) = received.events("approval.requested")
    assert requested["attributes"]["agent_egress.approval.id"] == pending["id"]
    (decision,) = received.events("approval.decided")
    assert decision["attributes"]["agent_egress.approval.actor"].startswith("uid:")
    closed = received.events("tunnel.closed")
    assert closed and closed[0]["attributes"]["agent_egress.bytes_down"] > 0
    assert closed[0]["attributes"]["agent_egress.agent"] == "agent-7"
    for name in ("proxy.started", "policy.loaded", "proxy.stopped"):
        assert received.events(name), name

    resource = received.resources[0]
    assert resource["service.name"] == "agent-egress"
    assert resource["service.version"]
    assert resource["host.name"]
    assert resource["deployment.environment"] == "test"
    assert received.headers["x-tenant"] == "team-a"  # type: ignore[attr-defined]

    by_decision = {}
    for point in received.metrics["agent_egress.decisions"]:
        key = point["attributes"]["agent_egress.decision"]
        by_decision[key] = by_decision.get(key, 0) + point["value"]
    audit_decisions = [e for e in process.events("request.decided")]
    expected = {}
    for event in audit_decisions:
        expected[event["decision"]] = expected.get(event["decision"], 0) + 1
    assert by_decision == expected
    assert by_decision["deny"] == 1 and by_decision["held"] == 1
    (wait,) = received.metrics["agent_egress.approval.wait_time"]
    assert wait["value"]["count"] == 1 and wait["value"]["sum"] > 0
    assert "agent_egress.tunnels.open" in received.metrics
    assert "agent_egress.approvals.pending" in received.metrics
    assert received.metrics["agent_egress.telemetry.dropped"][0]["value"] == 0

    # Redaction: no query string, userinfo or proxy password in any sink.
    everything = b"".join(received.raw) + process.audit_path.read_bytes()
    for secret in (b"QSECRET", b"userpw", b"s3cretpw"):
        assert secret not in everything


def test_grpc_export(tmp_path, tls_origin, plain_origin, client_env) -> None:
    receiver = GrpcReceiver()
    process = ProxyProcess(tmp_path / "p", ask_policy(tls_origin.port, plain_origin.port),
                           env=otel_env(receiver.endpoint, "grpc"))
    try:
        curl(client_env, process.url, f"http://allowed.test:{plain_origin.port}/hello")
        curl(client_env, process.url, f"http://denied.evil.test:{plain_origin.port}/")
        receiver.received.wait_for(lambda: "agent_egress.decisions" in receiver.received.metrics)
    finally:
        process.stop()
        receiver.stop()
    decisions = [e["attributes"]["agent_egress.decision"]
                 for e in receiver.received.events("request.decided")]
    assert sorted(decisions) == ["allow", "deny"]
    assert receiver.received.resources[0]["service.name"] == "agent-egress"


@pytest.mark.parametrize("collector", ["dead", "stalling"])
def test_unreachable_collector_never_blocks_proxying(tmp_path, tls_origin, plain_origin,
                                                     client_env, collector) -> None:
    stalling = StallingCollector() if collector == "stalling" else None
    endpoint = stalling.endpoint if stalling else closed_port_endpoint()
    process = ProxyProcess(tmp_path / "p", ask_policy(tls_origin.port, plain_origin.port),
                           env={**otel_env(endpoint), "OTEL_EXPORTER_OTLP_TIMEOUT": "30"})
    try:
        for index in range(20):
            result = curl(client_env, process.url,
                          f"http://allowed.test:{plain_origin.port}/hello?n={index}")
            assert "hello from plain-origin" in result.stdout
        started = time.monotonic()
    finally:
        assert process.stop() == 0
        if stalling:
            stalling.stop()
    assert time.monotonic() - started < 20  # shutdown flush is bounded
    decided = [e for e in process.events("request.decided") if e["host"] == "allowed.test"]
    assert len(decided) == 20  # the audit log lost nothing


def test_managed_policy_can_require_telemetry(tmp_path, http_receiver, plain_origin,
                                              client_env) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    managed = policies / "managed.toml"
    managed.write_text(f'version = 1\n[network]\nallow = ["allowed.test"]\n'
                       f'ports = [80, {plain_origin.port}]\nallowed_cidrs = ["127.0.0.0/8"]\n'
                       "[requirements]\ntelemetry_required = true\n")
    user = policies / "user.toml"
    user.write_text("version = 1\n[telemetry]\nenabled = false\n")
    env = {**otel_env(http_receiver.endpoint), "OTEL_SDK_DISABLED": "true"}
    process = ProxyProcess(tmp_path / "p", None, "--config", str(user), "--managed", str(managed),
                           *owner_args(), "--resolve", "allowed.test=127.0.0.1", env=env)
    try:
        curl(client_env, process.url, f"http://allowed.test:{plain_origin.port}/hello")
    finally:
        process.stop()
    http_receiver.received.wait_for(lambda: http_receiver.received.events("request.decided"))
    # Without an endpoint, a required export cannot start: say so and stop.
    result = subprocess.run([sys.executable, "-m", "agent_egress.proxy", "serve", "--config",
                             str(user), "--managed", str(managed), *owner_args(),
                             "--listen", "127.0.0.1:0"],
                            capture_output=True, text=True, timeout=30,
                            env={k: v for k, v in process.env().items()
                                 if not k.startswith("OTEL_")})
    assert result.returncode == 2
    assert "requires telemetry (telemetry_required) but no OTLP endpoint" in result.stderr
