"""What the agent can touch on disk: links and files it plants where the proxy writes, and
policy files it can rewrite. The agent is played by uid `nobody` on real files (as root)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import policy_text
from proxyproc import ProxyProcess

NOBODY = 65534
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="plays another uid: needs root")


def as_nobody(*command: str) -> None:
    """Run a command as the agent (uid nobody), as a real process of that uid."""
    subprocess.run(command, check=True, user=NOBODY, group=NOBODY, extra_groups=[],
                   capture_output=True, timeout=30)


@pytest.fixture
def tmp_path() -> Iterator[Path]:
    """A root-owned directory the agent can reach (pytest's own are 0700 down from /tmp)."""
    path = Path(tempfile.mkdtemp(prefix="agent-egress-planted-", dir="/tmp"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def shared_dir(tmp_path: Path, name: str, mode: int) -> Path:
    directory = tmp_path / name
    directory.mkdir()
    os.chmod(directory, mode)
    return directory


def serve(tmp_path: Path, *args: str, env: dict[str, str] | None = None
          ) -> subprocess.CompletedProcess:
    """A `serve` that is expected to refuse to start (it gets 20 s if it does start)."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    environment = {**os.environ, "HOME": str(home), "XDG_STATE_HOME": str(home / "state"),
                   "XDG_CONFIG_HOME": str(home / "config"), **(env or {})}
    try:
        return subprocess.run([sys.executable, "-m", "agent_egress.proxy", "serve", "--listen",
                               "127.0.0.1:0", "--approval-socket", str(home / "a.sock"), *args],
                              capture_output=True, text=True, timeout=20, env=environment,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"serve started: {exc.stdout!r}") from None


# -- the audit log --------------------------------------------------------------------------

def test_planted_symlink_at_the_audit_log_is_refused(tmp_path) -> None:
    victim = tmp_path / "victim.bashrc"
    victim.write_text("# the approver's shell start-up file\n")
    shared = shared_dir(tmp_path, "shared", 0o1777)  # like /tmp
    log = shared / "audit.jsonl"
    as_nobody("ln", "-s", str(victim), str(log))
    result = serve(tmp_path, "--audit-log", str(log))
    assert result.returncode == 2
    assert f"{log} is a symbolic link" in result.stderr
    assert victim.read_text() == "# the approver's shell start-up file\n"


def test_audit_log_file_planted_by_another_uid_is_refused(tmp_path) -> None:
    shared = shared_dir(tmp_path, "shared", 0o1777)
    log = shared / "audit.jsonl"
    as_nobody("touch", str(log))
    result = serve(tmp_path, "--audit-log", str(log))
    assert result.returncode == 2
    assert f"{log} belongs to uid {NOBODY}" in result.stderr


def test_our_audit_log_in_a_sticky_shared_directory_is_fine(tmp_path) -> None:
    shared = shared_dir(tmp_path, "shared", 0o1777)
    process = ProxyProcess(tmp_path / "p", "version = 1\n", "--audit-log",
                           str(shared / "mine.jsonl"))
    try:
        assert (shared / "mine.jsonl").stat().st_uid == os.geteuid()
        assert oct((shared / "mine.jsonl").stat().st_mode & 0o777) == oct(0o600)
    finally:
        process.stop()


@pytest.mark.parametrize("mode, owner, why", [
    (0o777, 0, "is writable by other users (mode 0777)"),
    (0o755, NOBODY, f"belongs to uid {NOBODY}"),
])
def test_audit_log_directory_others_can_change_is_refused(tmp_path, mode, owner, why) -> None:
    directory = shared_dir(tmp_path, "logs", mode)
    os.chown(directory, owner, owner)
    result = serve(tmp_path, "--audit-log", str(directory / "audit.jsonl"))
    assert result.returncode == 2
    assert why in result.stderr
    assert not (directory / "audit.jsonl").exists()


def test_symlinked_parent_owned_by_the_agent_is_refused(tmp_path) -> None:
    shared = shared_dir(tmp_path, "shared", 0o1777)
    target = tmp_path / "elsewhere"
    target.mkdir()
    as_nobody("ln", "-s", str(target), str(shared / "logs"))
    for path, why in ((shared / "logs" / "audit.jsonl", "logs is a symbolic link"),
                      (shared / "logs" / "deeper" / "audit.jsonl",
                       "logs is a symbolic link owned by uid 65534")):
        result = serve(tmp_path, "--audit-log", str(path))
        assert result.returncode == 2
        assert why in result.stderr
    assert list(target.iterdir()) == []


def test_missing_log_directories_are_created_private(tmp_path) -> None:
    process = ProxyProcess(tmp_path / "p", "version = 1\n", "--audit-log",
                           str(tmp_path / "new" / "deeper" / "audit.jsonl"))
    process.stop()
    for directory in (tmp_path / "new", tmp_path / "new" / "deeper"):
        assert directory.stat().st_mode & 0o777 == 0o700


# -- policy files ---------------------------------------------------------------------------

def _policies(tmp_path: Path, managed: str = "version = 1\n", user: str = "version = 1\n"
              ) -> tuple[Path, Path]:
    (tmp_path / "etc").mkdir(exist_ok=True)
    (tmp_path / "policies").mkdir(exist_ok=True)
    (tmp_path / "etc" / "managed.toml").write_text(managed)
    (tmp_path / "policies" / "user.toml").write_text(user)
    return tmp_path / "etc" / "managed.toml", tmp_path / "policies" / "user.toml"


def test_managed_file_writable_by_others_is_refused(tmp_path) -> None:
    managed, user = _policies(tmp_path)
    os.chmod(managed, 0o666)
    result = serve(tmp_path, "--config", str(user), "--managed", str(managed))
    assert result.returncode == 2
    assert "refusing to start: the managed policy" in result.stderr
    assert "is writable by every user (mode 0666)" in result.stderr


def test_managed_file_owned_by_the_agent_is_refused(tmp_path) -> None:
    managed, user = _policies(tmp_path)
    os.chown(managed, NOBODY, NOBODY)
    result = serve(tmp_path, "--config", str(user), "--managed", str(managed))
    assert result.returncode == 2
    assert f"is owned by uid {NOBODY}" in result.stderr


def test_managed_link_into_a_directory_the_agent_owns_is_refused(tmp_path) -> None:
    """The link itself is root's, but the file it names sits where the agent can replace it:
    the target's directories are checked, not the link's."""
    agents = shared_dir(tmp_path, "agent-owned", 0o755)
    os.chown(agents, NOBODY, NOBODY)
    as_nobody("sh", "-c", f"echo 'version = 1' > {agents / 'real.toml'}")
    _, user = _policies(tmp_path)
    managed = tmp_path / "etc" / "managed.toml"
    managed.unlink()
    managed.symlink_to(agents / "real.toml")
    result = serve(tmp_path, "--config", str(user), "--managed", str(managed))
    assert result.returncode == 2
    assert f"the directory {agents} is owned by uid {NOBODY}" in result.stderr


def test_a_named_admin_uid_may_own_the_managed_file(tmp_path) -> None:
    managed, user = _policies(tmp_path)
    os.chown(managed, NOBODY, NOBODY)
    process = ProxyProcess(tmp_path / "p", None, "--config", str(user), "--managed",
                           str(managed), "--managed-owner", str(NOBODY))
    process.stop()
    assert process.process.returncode == 0


def test_user_policy_others_can_change_is_warned_about_everywhere(tmp_path) -> None:
    managed, user = _policies(tmp_path)
    os.chmod(user, 0o666)
    process = ProxyProcess(tmp_path / "p", None, "--config", str(user), "--managed",
                           str(managed))
    try:
        banner = "".join(process.output)
        assert f"WARNING: the user policy {user} can be changed by another user" in banner
        health = process.cli("health")
        assert "WARNING: the user policy" in health.stdout
        show = process.cli("policy", "show", "--config", str(user), "--managed", str(managed))
        assert "WARNING: the user policy" in show.stdout
    finally:
        process.stop()


def test_user_policy_the_agent_can_change_is_named(tmp_path) -> None:
    managed, user = _policies(tmp_path)
    os.chown(user.parent, NOBODY, NOBODY)
    process = ProxyProcess(tmp_path / "p", None, "--config", str(user), "--managed",
                           str(managed), "--agent-uid", str(NOBODY))
    try:
        banner = "".join(process.output)
        assert "can be changed by another user or the agent" in banner
        assert f"is owned by uid {NOBODY}" in banner
        assert "approvals: separated: the agent runs as uid 65534" in banner
    finally:
        process.stop()


def test_protected_file_refuses_a_user_policy_others_can_change(tmp_path) -> None:
    managed, user = _policies(tmp_path, "version = 1\n[requirements]\nprotected_file = true\n")
    os.chmod(user, 0o666)
    result = serve(tmp_path, "--config", str(user), "--managed", str(managed))
    assert result.returncode == 2
    assert "requirements.protected_file = true" in result.stderr


def test_managed_file_opened_to_others_later_is_not_reloaded(tmp_path) -> None:
    managed, user = _policies(tmp_path, 'version = 1\n[network]\ndeny = ["x.test"]\n')
    process = ProxyProcess(tmp_path / "p", None, "--config", str(user), "--managed",
                           str(managed))
    try:
        mark = process.mark()
        os.chmod(managed, 0o666)
        managed.write_text('version = 1\n[network]\nallow = ["*"]\n')  # "the agent's" edit
        event = process.wait_for_event(lambda e: e["event"] == "policy.rejected", timeout=10,
                                       after=mark)
        assert "writable by every user" in event["error"]
        explain = process.cli("policy", "show", "--config", str(user), "--managed", str(managed))
        assert "LAST RELOAD FAILED" in explain.stdout
    finally:
        process.stop()


def test_banner_says_approvals_are_not_separated_by_default(tmp_path) -> None:
    process = ProxyProcess(tmp_path / "p", "version = 1\n")
    try:
        banner = "".join(process.output)
        assert "approvals: NOT SEPARATED unless the agent runs as another user" in banner
        assert "agent-egress run --agent-user USER" in banner
        assert "NOT SEPARATED" in process.cli("health").stdout
    finally:
        process.stop()


# -- `always` writes --------------------------------------------------------------------------

def _ask_proxy(tmp_path: Path, origin_port: int) -> ProxyProcess:
    text = policy_text(origin_port, default="ask")
    return ProxyProcess(tmp_path / "p", text)


def test_always_refused_when_the_user_policy_is_a_planted_link(tmp_path, plain_origin) -> None:
    process = _ask_proxy(tmp_path, plain_origin.port)
    try:
        elsewhere = tmp_path / "elsewhere.toml"
        elsewhere.write_text(process.policy_path.read_text())
        process.policy_path.unlink()
        process.policy_path.symlink_to(elsewhere)
        result = process.cli("approve", "new.test", "--scope", "always")
        assert result.returncode != 0
        assert "symbolic link" in result.stderr
        assert "new.test" not in elsewhere.read_text()
        assert process.policy_path.is_symlink()
    finally:
        process.stop()


def test_always_refused_when_the_user_policy_vanished(tmp_path, plain_origin) -> None:
    process = _ask_proxy(tmp_path, plain_origin.port)
    try:
        process.policy_path.unlink()
        result = process.cli("approve", "new.test", "--scope", "always")
        assert result.returncode != 0
        assert "the user policy file is gone" in result.stderr
        assert not process.policy_path.exists()  # never replaced by the built-in policy
        session = process.cli("approve", "new.test", "--scope", "session")
        assert session.returncode == 0, session.stderr
    finally:
        process.stop()


def test_always_refused_when_the_user_policy_does_not_load(tmp_path, plain_origin) -> None:
    process = _ask_proxy(tmp_path, plain_origin.port)
    try:
        process.policy_path.write_text("version = 1\n[network\n")
        result = process.cli("approve", "new.test", "--scope", "always")
        assert result.returncode != 0
        assert "not valid TOML" in result.stderr
        assert process.policy_path.read_text() == "version = 1\n[network\n"
    finally:
        process.stop()


def test_always_for_an_ipv6_destination_with_a_port_means_exactly_it(tmp_path,
                                                                     plain_origin) -> None:
    text = policy_text(plain_origin.port, default="ask").replace(
        "[network]", "[network]\nallow_ip_literals = true", 1)
    process = ProxyProcess(tmp_path / "p", text)
    try:
        result = process.cli("approve", "[2606:4700::1111]:8443", "--scope", "always")
        assert result.returncode == 0, result.stderr
        assert '"[2606:4700::1111]:8443"' in process.policy_path.read_text()
        check = subprocess.run([sys.executable, "-m", "agent_egress.proxy", "policy", "check",
                                str(process.policy_path)], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
        for target, expected in (("[2606:4700::1111]:8443", 0),
                                 ("[2606:4700::1111:8443]:443", 1),
                                 ("[2606:4700::1111]:443", 1)):
            explain = subprocess.run(
                [sys.executable, "-m", "agent_egress.proxy", "policy", "explain", target,
                 "--config", str(process.policy_path)], capture_output=True, text=True)
            assert explain.returncode == expected, (target, explain.stdout)
    finally:
        process.stop()
