"""git and pip, as agents run them, through the proxy against local HTTPS origins."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def git_repo(webroot: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A bare repository served over HTTPS (git's dumb HTTP protocol: static files)."""
    work = tmp_path_factory.mktemp("git-work")
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.test",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.test",
           "HOME": str(work), "PATH": "/usr/bin:/bin"}

    def git(*args: str, cwd: Path) -> None:
        subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True)

    git("init", "-q", "-b", "main", ".", cwd=work)
    (work / "README").write_text("served through agent-egress\n")
    git("add", "README", cwd=work)
    git("commit", "-q", "-m", "first", cwd=work)
    bare = webroot / "repo.git"
    git("clone", "-q", "--bare", str(work), str(bare), cwd=work)
    git("update-server-info", cwd=bare)
    return "repo.git"


def test_git_clone_over_https(proxy, tls_origin, git_repo, client_env, tmp_path) -> None:
    env = {**client_env, "HTTPS_PROXY": proxy.url, "HOME": str(tmp_path),
           "GIT_TERMINAL_PROMPT": "0"}
    url = f"https://git.example.test:{tls_origin.port}/{git_repo}"
    result = subprocess.run(["git", "clone", "-q", url, str(tmp_path / "clone")], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "clone" / "README").read_text() == "served through agent-egress\n"

    denied = url.replace("git.example.test", "other.test")
    result = subprocess.run(["git", "clone", "-q", denied, str(tmp_path / "denied")], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "403" in result.stderr


def _wheel(directory: Path) -> Path:
    name = "demo_pkg-1.0-py3-none-any.whl"
    files = {
        "demo_pkg/__init__.py": b"VALUE = 1\n",
        "demo_pkg-1.0.dist-info/METADATA":
            b"Metadata-Version: 2.1\nName: demo-pkg\nVersion: 1.0\n",
        "demo_pkg-1.0.dist-info/WHEEL":
            b"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{path},,\n" for path in files) + "demo_pkg-1.0.dist-info/RECORD,,\n"
    files["demo_pkg-1.0.dist-info/RECORD"] = record.encode()
    path = directory / name
    with zipfile.ZipFile(path, "w") as archive:
        for member, data in files.items():
            archive.writestr(member, data)
    return path


@pytest.fixture(scope="module")
def simple_index(webroot: Path) -> str:
    packages = webroot / "packages"
    packages.mkdir(exist_ok=True)
    wheel = _wheel(packages)
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    project = webroot / "simple" / "demo-pkg"
    project.mkdir(parents=True, exist_ok=True)
    (project / "index.html").write_text(
        f'<html><body><a href="../../packages/{wheel.name}#sha256={digest}">{wheel.name}</a>'
        "</body></html>\n")
    return "simple/"


def test_pip_download_from_https_index(proxy, tls_origin, simple_index, client_env, ca_file,
                                       tmp_path) -> None:
    index = f"https://pypi.example.test:{tls_origin.port}/{simple_index}"
    command = [sys.executable, "-m", "pip", "--isolated", "download", "--no-deps",
               "--disable-pip-version-check", "--no-cache-dir", "--retries", "0",
               "--timeout", "15", "--proxy", proxy.url, "--cert", str(ca_file),
               "--index-url", index, "-d", str(tmp_path / "dl"), "demo-pkg==1.0"]
    result = subprocess.run(command, env=client_env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "dl" / "demo_pkg-1.0-py3-none-any.whl").exists()

    blocked = [part.replace("pypi.example.test", "other.test") for part in command]
    blocked.insert(blocked.index("download") + 1, "-vv")
    result = subprocess.run(blocked, env=client_env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "Tunnel connection failed: 403" in result.stdout + result.stderr
    proxy.wait_for_event(lambda e: e.get("host") == "other.test" and e.get("scheme") == "connect"
                         and e["port"] == tls_origin.port)
