"""A real redis-server on loopback for the fleet tests: started, killed and restarted on the
same port, with nothing persisted (a restart forgets everything, as a Redis without
persistence does)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from origins import free_port, wait_listening


class RedisProcess:
    def __init__(self, workdir: Path, port: int | None = None, *extra: str) -> None:
        self.extra = extra  # e.g. --aclfile PATH
        self.binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), "--protected-mode", "yes",
             *self.extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        if not wait_listening(self.port, 10):
            self.kill()
            raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def command(self, *args: str) -> str:
        """redis-cli against this server (the tests' own look at the state)."""
        result = subprocess.run(["redis-cli", "-p", str(self.port), *args], capture_output=True,
                                text=True, timeout=10, stdin=subprocess.DEVNULL)
        return result.stdout
