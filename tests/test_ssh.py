"""git over SSH through `agent-egress run`: real git, real ssh, a real sshd on loopback.

`run` gives the command ALL_PROXY (the SOCKS5 port) and GIT_SSH_COMMAND, whose ProxyCommand is
`agent-egress connect %h %p`; the test adds only its own key and known-hosts file to that
command (ssh reads its configuration from the account's home, never $HOME). sshd listens on
127.0.0.1 with its own host key; its log shows every connection that reached it, so a refused
attempt can be shown to have reached nothing.
"""

from __future__ import annotations

import getpass
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from origins import free_port, wait_listening

SSHD = Path("/usr/sbin/sshd")
pytestmark = pytest.mark.skipif(not SSHD.exists() or shutil.which("ssh") is None,
                                reason="needs openssh-server and openssh-client (.ci/run "
                                       "installs them)")


@dataclass
class Sshd:
    port: int
    directory: Path
    log: Path
    key: Path
    known_hosts: Path
    process: subprocess.Popen[bytes]

    def connections(self) -> int:
        """How many TCP connections reached sshd so far."""
        return self.log.read_text(errors="replace").count("Connection from ")


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)],
                   check=True, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def sshd(tmp_path_factory) -> Iterator[Sshd]:
    directory = tmp_path_factory.mktemp("sshd")
    port = free_port()
    _keygen(directory / "host_key")
    _keygen(directory / "client_key")
    (directory / "authorized_keys").write_text((directory / "client_key.pub").read_text())
    host_key = (directory / "host_key.pub").read_text().split()
    known_hosts = directory / "known_hosts"
    known_hosts.write_text(f"[git-ssh.test]:{port} {host_key[0]} {host_key[1]}\n")
    config = directory / "sshd_config"
    config.write_text(f"""Port {port}
ListenAddress 127.0.0.1
HostKey {directory / "host_key"}
PidFile {directory / "sshd.pid"}
AuthorizedKeysFile {directory / "authorized_keys"}
StrictModes no
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
LogLevel VERBOSE
""")
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation
    log = directory / "sshd.log"
    process = subprocess.Popen([str(SSHD), "-D", "-f", str(config), "-E", str(log)],
                               stdin=subprocess.DEVNULL)
    if not wait_listening(port, 10):
        process.kill()
        pytest.fail(f"sshd did not start: {log.read_text() if log.exists() else ''}")
    yield Sshd(port, directory, log, directory / "client_key", known_hosts, process)
    process.terminate()
    process.wait(10)


@pytest.fixture(scope="module")
def repositories(tmp_path_factory, sshd) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("repos")
    bare = root / "project.git"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(bare)], check=True)
    work = root / "work"
    subprocess.run(["git", "init", "-q", "-b", "main", str(work)], check=True)
    (work / "README").write_text("pushed over SSH through agent-egress\n")
    git = ["git", "-C", str(work), "-c", "user.name=Agent", "-c", "user.email=agent@test"]
    subprocess.run([*git, "add", "README"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "first"], check=True)
    return {"bare": bare, "work": work}


def _policy(tmp_path: Path, sshd: Sshd) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(f"""version = 1
[network]
default = "deny"
allow = ["git-ssh.test:{sshd.port}", "named-only.test"]
ports = [80, 443, {sshd.port}]
allowed_cidrs = ["127.0.0.0/8"]

[resolve]
"git-ssh.test" = "127.0.0.1"
"named-only.test" = "127.0.0.1"
"unlisted.test" = "127.0.0.1"
""")
    return path


def _environment(tmp_path: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items()
           if key.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
           and not key.startswith(("GIT_", "XDG_"))}
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env.update(HOME=str(home), XDG_CONFIG_HOME=str(tmp_path / "config"),
               XDG_STATE_HOME=str(tmp_path / "state"), XDG_DATA_HOME=str(tmp_path / "data"),
               XDG_CACHE_HOME=str(tmp_path / "cache"), XDG_RUNTIME_DIR=str(tmp_path),
               GIT_CONFIG_NOSYSTEM="1")
    return env


def run_git(tmp_path: Path, sshd: Sshd, *git_args: str) -> tuple[subprocess.CompletedProcess,
                                                                  list[dict]]:
    """`agent-egress run -- git ...` with run's GIT_SSH_COMMAND, plus the test's key and
    known hosts; the result and the audit log's events."""
    audit = tmp_path / "audit.jsonl"
    ssh_options = (f"-F /dev/null -i {sshd.key} -o IdentitiesOnly=yes -o BatchMode=yes "
                   f"-o StrictHostKeyChecking=yes -o UserKnownHostsFile={sshd.known_hosts}")
    script = f'GIT_SSH_COMMAND="$GIT_SSH_COMMAND {ssh_options}" exec git "$@"'
    command = [sys.executable, "-m", "agent_egress.proxy", "run",
               "--config", str(_policy(tmp_path, sshd)), "--audit-log", str(audit),
               "--approval-socket", str(tmp_path / "approvals.sock"), "--agent-id", "git-agent",
               # run's default --explain-https stays on: it must not turn a SOCKS5 refusal
               # into a "succeeded" (it answers refused HTTPS over TLS, on the HTTP port)
               "--", "sh", "-c", script, "git", *git_args]
    result = subprocess.run(command, env=_environment(tmp_path), capture_output=True, text=True,
                            timeout=120, stdin=subprocess.DEVNULL)
    events = [json.loads(line) for line in audit.read_text().splitlines()] if audit.exists() \
        else []
    return result, events


def _url(host: str, sshd: Sshd, repositories: dict[str, Path]) -> str:
    return f"ssh://{getpass.getuser()}@{host}:{sshd.port}{repositories['bare']}"


def test_git_push_and_ls_remote_over_ssh_through_run(tmp_path, sshd, repositories) -> None:
    before = sshd.connections()
    url = _url("git-ssh.test", sshd, repositories)
    pushed, events = run_git(tmp_path, sshd, "-C", str(repositories["work"]), "push", url,
                             "main")
    assert pushed.returncode == 0, pushed.stderr
    head = subprocess.run(["git", "-C", str(repositories["work"]), "rev-parse", "HEAD"],
                          capture_output=True, text=True, check=True).stdout.strip()
    remote = subprocess.run(["git", "--git-dir", str(repositories["bare"]), "rev-parse",
                             "main"], capture_output=True, text=True, check=True)
    assert remote.stdout.strip() == head
    decided = [e for e in events if e["event"] == "request.decided"]
    assert decided and all(e["scheme"] == "socks5" and e["decision"] == "allow"
                           and e["agent"] == "git-agent" for e in decided)
    assert decided[0]["rule"] == f"git-ssh.test:{sshd.port}"
    closed = [e for e in events if e["event"] == "tunnel.closed"]
    assert closed and closed[0]["protocol"] == "tcp"
    assert closed[0]["bytes_up"] > 1000 and closed[0]["bytes_down"] > 1000

    again = tmp_path / "again"  # a second run, with an audit log of its own
    again.mkdir()
    listed, _ = run_git(again, sshd, "ls-remote", url)
    assert listed.returncode == 0, listed.stderr
    assert f"{head}\trefs/heads/main" in listed.stdout
    assert sshd.connections() == before + 2


def test_ssh_to_a_host_whose_rule_names_no_port_reaches_nothing(tmp_path, sshd,
                                                                 repositories) -> None:
    """named-only.test is allowed (for TLS and HTTP), on a port in `ports`; SSH is raw TCP,
    which needs a rule naming the port: the tunnel is cut at ssh's first bytes."""
    before = sshd.connections()
    result, events = run_git(tmp_path, sshd, "ls-remote",
                             _url("named-only.test", sshd, repositories))
    assert result.returncode != 0
    refusal = next(e for e in events if e["event"] == "request.decided"
                   and e["decision"] == "deny")
    assert refusal["reason"] == "tunnel_protocol" and refusal["scheme"] == "socks5"
    assert "names the port" in refusal["detail"]
    assert sshd.connections() == before


def test_ssh_to_an_unlisted_host_is_refused_with_the_reason(tmp_path, sshd,
                                                            repositories) -> None:
    before = sshd.connections()
    result, events = run_git(tmp_path, sshd, "ls-remote",
                             _url("unlisted.test", sshd, repositories))
    assert result.returncode != 0
    assert "agent-egress connect: the proxy refused unlisted.test" in result.stderr
    assert "the policy does not allow" in result.stderr
    refusal = next(e for e in events if e["event"] == "request.decided")
    assert refusal["decision"] == "deny" and refusal["reason"] == "not_allowlisted"
    assert sshd.connections() == before


def test_run_leaves_a_git_ssh_command_of_the_users_own(tmp_path) -> None:
    env = {**_environment(tmp_path), "GIT_SSH_COMMAND": "ssh -i /my/deploy-key"}
    result = subprocess.run([sys.executable, "-m", "agent_egress.proxy", "run",
                             "--no-explain-https", "--approval-socket",
                             str(tmp_path / "approvals.sock"), "--", "env"],
                            env=env, capture_output=True, text=True, timeout=60,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "GIT_SSH_COMMAND=ssh -i /my/deploy-key" in lines
    socks = next(line for line in lines if line.startswith("ALL_PROXY="))
    assert socks.startswith("ALL_PROXY=socks5h://127.0.0.1:")
    assert f"all_proxy={socks.partition('=')[2]}" in lines
