"""The approval socket's path: never taken over from a live proxy, never planted.

Paths are attacked as uid `nobody` on real files (a shared sticky directory, like /tmp), the
way an agent running as another user could prepare them before the proxy starts.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from holding import ask_policy, start_curl, wait_pending
from proxyproc import ProxyProcess

NOBODY = 65534
needs_root = pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as uid nobody")


def start_serve(workdir: Path, socket_path: Path, policy: str) -> subprocess.Popen:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "policy.toml").write_text(policy)
    env = {**os.environ, "HOME": str(workdir), "XDG_CONFIG_HOME": str(workdir / "config"),
           "XDG_STATE_HOME": str(workdir / "state"), "PYTHONUNBUFFERED": "1"}
    env.pop("XDG_RUNTIME_DIR", None)
    return subprocess.Popen(
        [sys.executable, "-m", "agent_egress.proxy", "serve", "--listen", "127.0.0.1:0",
         "--config", str(workdir / "policy.toml"), "--audit-log", str(workdir / "audit.jsonl"),
         "--approval-socket", str(socket_path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
        env=env)


def outcome(process: subprocess.Popen, timeout: float = 30,
            stop: bool = True) -> tuple[int | None, str]:
    """(exit status, output), or (None, output) if the proxy started; it is then stopped unless
    told otherwise, so a test that expected a refusal fails instead of hanging."""
    assert process.stdout is not None
    output = []
    for line in process.stdout:
        output.append(line)
        if line.strip().startswith("http_proxy="):  # started: the banner's last line
            if stop:
                process.terminate()
                process.communicate(timeout=timeout)
            return None, "".join(output)
    return process.wait(timeout), "".join(output)


def serve(workdir: Path, socket_path: Path, policy: str) -> tuple[int | None, str]:
    """Start `serve` on socket_path: (exit status, output), or (None, output) if it started."""
    return outcome(start_serve(workdir, socket_path, policy))


def as_nobody(*command: str) -> None:
    subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                    *command], check=True, capture_output=True, timeout=30)


@pytest.fixture
def shared() -> Iterator[Path]:
    """A root-owned sticky directory every user may write to, like /tmp, that nobody can reach.

    (pytest's tmp_path sits in a 0700 directory, which uid nobody cannot enter.)
    """
    base = Path(tempfile.mkdtemp(prefix="egress-shared-"))
    os.chmod(base, 0o711)
    directory = base / "shared"
    directory.mkdir()
    os.chmod(directory, 0o1777)
    yield directory
    shutil.rmtree(base)


@pytest.fixture
def policy(tls_origin, plain_origin) -> str:
    return ask_policy(tls_origin.port, plain_origin.port)


def identity(path: Path) -> tuple[int, int]:
    info = os.lstat(path)
    return info.st_dev, info.st_ino


def ping(path: Path) -> dict:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(b'{"v": 1, "op": "ping"}\n')
        return json.loads(sock.makefile("rb").readline())


# -- takeover -------------------------------------------------------------------------------

def test_second_proxy_refuses_a_socket_a_live_proxy_answers_on(tmp_path, policy, tls_origin,
                                                                client_env):
    first = ProxyProcess(tmp_path / "first", policy, env={"HOME": str(tmp_path)})
    try:
        before = identity(first.socket_path)
        status, output = serve(tmp_path / "second", first.socket_path, policy)
        assert status == 2, output
        assert str(first.socket_path) in output
        assert "a proxy already answers there" in output
        assert f"127.0.0.1:{first.port}" in output  # the live proxy's listen address
        assert identity(first.socket_path) == before
        # The first proxy can still be approved, after the second has gone.
        curl = start_curl(client_env, first, f"https://ask.test:{tls_origin.port}/hello")
        pending = wait_pending(first)
        assert first.cli("approve", pending["id"]).returncode == 0
        assert "hello from tls-origin" in curl.communicate(timeout=30)[0]
        refused = json.loads((tmp_path / "second" / "audit.jsonl").read_text().splitlines()[-1])
        assert refused["event"] == "approval.socket_refused"
        assert refused["path"] == str(first.socket_path)
    finally:
        first.stop()


def test_of_two_proxies_started_at_once_on_one_socket_one_runs(tmp_path, policy):
    path = tmp_path / "run" / "approvals.sock"
    for attempt in range(3):
        processes = [start_serve(tmp_path / f"{attempt}-{n}", path, policy) for n in range(2)]
        try:
            with ThreadPoolExecutor(2) as pool:  # both keep running until both have answered
                results = list(pool.map(lambda p: outcome(p, stop=False), processes))
        finally:
            for process in processes:
                process.terminate()
                process.communicate(timeout=30)
        assert sorted(status or 0 for status, _ in results) == [0, 2], results
        assert not path.exists()  # the winner removed its own socket; the loser never touched it


def test_stale_socket_left_by_a_crash_is_replaced(tmp_path, policy):
    path = tmp_path / "run" / "approvals.sock"
    path.parent.mkdir(mode=0o700)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))  # bound, never listening: connecting is refused, like after a crash
    stale.close()
    process = ProxyProcess(tmp_path / "p", policy, "--approval-socket", str(path),
                           env={"HOME": str(tmp_path)})
    try:
        assert ping(path) == {"v": 1, "ok": True, "pong": True}
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
    finally:
        process.stop()
    assert not path.exists()  # its own socket is removed at stop


def test_proxy_never_unlinks_a_socket_it_did_not_create(tmp_path, policy):
    process = ProxyProcess(tmp_path / "p", policy, env={"HOME": str(tmp_path)})
    path = process.socket_path
    try:
        path.unlink()  # someone else's socket now stands at the path
        other = socket.socket(socket.AF_UNIX)
        other.bind(str(path))
        replaced = identity(path)
    finally:
        assert process.stop() == 0
    try:
        assert identity(path) == replaced
        deadline = time.monotonic() + 5
        while "left it in place" not in "".join(process.output):
            assert time.monotonic() < deadline, process.output
            time.sleep(0.05)
    finally:
        other.close()


# -- planted paths --------------------------------------------------------------------------

def test_refuses_a_regular_file_or_fifo_at_the_socket_path(tmp_path, policy):
    directory = tmp_path / "run"
    directory.mkdir(mode=0o700)
    (directory / "file.sock").write_text("not a socket")
    os.mkfifo(directory / "fifo.sock")
    for name in ("file.sock", "fifo.sock"):
        status, output = serve(tmp_path / name, directory / name, policy)
        assert status == 2, output
        assert f"{directory / name} exists and is not a socket" in output
        assert "remove it or choose another --approval-socket" in output


@needs_root
def test_refuses_a_socket_directory_symlink_planted_by_another_user(tmp_path, shared, policy):
    private = shared.parent / "private"  # ours, 0700: a link to it looks harmless...
    private.mkdir(mode=0o700)
    # ...but nobody owns the link and can point it elsewhere once the proxy runs.
    as_nobody("ln", "-s", str(private), str(shared / "egress"))
    status, output = serve(tmp_path / "p", shared / "egress" / "a.sock", policy)
    assert status == 2, output
    assert f"{shared / 'egress'} is a symbolic link" in output
    assert list(private.iterdir()) == []


@needs_root
def test_refuses_a_socket_path_symlink_planted_by_another_user(tmp_path, shared, policy):
    as_nobody("ln", "-s", "/nonexistent/agent.sock", str(shared / "a.sock"))
    status, output = serve(tmp_path / "p", shared / "a.sock", policy)
    assert status == 2, output
    assert f"{shared / 'a.sock'} is a symbolic link" in output
    assert os.path.islink(shared / "a.sock")  # left alone


@needs_root
@pytest.mark.parametrize("planted", ["directory", "symlink"])
def test_refuses_to_create_the_socket_directory_under_a_planted_path(tmp_path, shared, policy,
                                                                     planted):
    """--approval-socket SHARED/egress/run/a.sock, with SHARED/egress prepared by nobody."""
    if planted == "directory":
        as_nobody("mkdir", "-m", "0755", str(shared / "egress"))
    else:
        target = shared / "nobody"
        as_nobody("mkdir", "-m", "0777", str(target))
        as_nobody("ln", "-s", str(target), str(shared / "egress"))
    status, output = serve(tmp_path / "p", shared / "egress" / "run" / "a.sock", policy)
    assert status == 2, output
    if planted == "directory":
        assert f"{shared / 'egress'} belongs to uid {NOBODY}" in output
    else:
        assert f"{shared / 'egress'} is a symbolic link" in output
    assert not os.path.lexists(shared / "egress" / "run")


@needs_root
def test_refuses_a_socket_directory_owned_by_another_user(tmp_path, shared, policy):
    as_nobody("mkdir", "-m", "0700", str(shared / "egress"))
    status, output = serve(tmp_path / "p", shared / "egress" / "a.sock", policy)
    assert status == 2, output
    assert f"{shared / 'egress'} belongs to uid {NOBODY}, not to this proxy" in output


def test_missing_directories_are_created_private(tmp_path, policy):
    path = tmp_path / "new" / "deeper" / "approvals.sock"
    process = ProxyProcess(tmp_path / "p", policy, "--approval-socket", str(path),
                           env={"HOME": str(tmp_path)})
    try:
        for directory in (tmp_path / "new", path.parent):
            info = os.lstat(directory)
            assert stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid()
            assert stat.S_IMODE(info.st_mode) == 0o700
        info = os.lstat(path)
        assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600
    finally:
        process.stop()
