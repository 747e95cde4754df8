"""Runs the real `agent-egress serve` in a subprocess for end-to-end tests."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

_LISTENING = re.compile(r"listening on ([0-9.]+):(\d+)")
_SOCKS = re.compile(r"SOCKS5 listening on ([0-9.]+):(\d+)")


def owner_args() -> tuple[str, ...]:
    """A managed file must be root's; a test run by another user names itself the admin."""
    return () if os.geteuid() == 0 else ("--managed-owner", str(os.geteuid()))


class ProxyProcess:
    def __init__(self, workdir: Path, policy: str | None, *extra_args: str,
                 env: dict[str, str] | None = None, listen: str = "127.0.0.1:0",
                 prefix: tuple[str, ...] = (), python_options: tuple[str, ...] = ()) -> None:
        self.workdir = workdir
        self.extra_env = env or {}
        workdir.mkdir(parents=True, exist_ok=True)
        self.audit_path = workdir / "audit.jsonl"
        self.policy_path = workdir / "policy.toml"
        self.socket_path = workdir / "approvals.sock"
        self.host = listen.rpartition(":")[0]
        args = [*prefix, sys.executable, *python_options, "-m", "agent_egress.proxy", "serve",
                "--listen", listen,
                "--audit-log", str(self.audit_path), "--approval-socket", str(self.socket_path)]
        if policy is not None:
            self.policy_path.write_text(policy)
            args += ["--config", str(self.policy_path)]
        args += list(extra_args)
        self.output: list[str] = []
        self.port: int | None = None
        self.socks_port: int | None = None  # with --socks-listen
        self._ready = threading.Event()
        self.process = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            stdin=subprocess.DEVNULL, env=self.env(),
        )
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(30) or self.port is None:
            self.stop()
            raise RuntimeError("proxy did not start:\n" + "".join(self.output))

    def env(self) -> dict[str, str]:
        """The proxy's (and its approvers') environment: XDG dirs of its own, nothing shared."""
        env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}
        home = self.workdir / "home"
        home.mkdir(exist_ok=True)
        env.update(PYTHONUNBUFFERED="1", HOME=str(home),
                   XDG_CONFIG_HOME=str(self.workdir / "config"),
                   XDG_STATE_HOME=str(self.workdir / "state"),
                   XDG_CACHE_HOME=str(self.workdir / "cache"))
        env.update(self.extra_env)
        return env

    def cli(self, *args: str, timeout: float = 30, **kwargs) -> subprocess.CompletedProcess:
        """Run an agent-egress command against this proxy's approval socket."""
        command = [sys.executable, "-m", "agent_egress.proxy", *args,
                   "--approval-socket", str(self.socket_path)]
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              env=self.env(), stdin=subprocess.DEVNULL, **kwargs)

    def cli_report(self, *args: str) -> str:
        """`agent-egress report` on this proxy's audit log; its standard output."""
        result = subprocess.run([sys.executable, "-m", "agent_egress.proxy", "report",
                                 str(self.audit_path), *args], capture_output=True, text=True,
                                timeout=60, env=self.env(), stdin=subprocess.DEVNULL)
        assert result.returncode == 0, result.stderr
        return result.stdout

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.output.append(line)
            if match := _SOCKS.match(line):
                self.socks_port = int(match.group(2))
            elif match := _LISTENING.search(line):
                self.port = int(match.group(2))
            if line.strip().startswith("http_proxy="):  # the last line of the banner
                self._ready.set()
        self._ready.set()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def events(self, name: str | None = None) -> list[dict]:
        if not self.audit_path.exists():
            return []
        lines = self.audit_path.read_text().splitlines()
        events = [json.loads(line) for line in lines if line.strip()]
        return [e for e in events if name is None or e["event"] == name]

    def mark(self) -> int:
        """How many events are logged so far: pass it as `after` to see only newer ones."""
        return len(self.events())

    def wait_for_event(self, predicate, timeout: float = 5.0, after: int = 0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.events()[after:]:
                if predicate(event):
                    return event
            time.sleep(0.05)
        raise AssertionError(f"no matching event in {self.events()[after:]}")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode
