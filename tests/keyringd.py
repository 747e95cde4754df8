"""A real Secret Service for the tests: a private D-Bus session bus and gnome-keyring-daemon
on it, with a login keyring made and unlocked in a temporary home. Processes given `env` use
it through the `keyring` library, as on a desktop."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from pathlib import Path


class SecretService:
    def __init__(self, home: Path) -> None:
        self.home = home
        runtime = home / "run"
        runtime.mkdir(parents=True, exist_ok=True)
        runtime.chmod(0o700)
        base = {"HOME": str(home), "XDG_RUNTIME_DIR": str(runtime),
                "XDG_DATA_HOME": str(home / ".local/share"),
                "XDG_CONFIG_HOME": str(home / ".config"), "PATH": os.environ["PATH"]}
        bus = subprocess.run(
            ["dbus-daemon", "--session", "--fork", "--print-address=1", "--print-pid=1",
             "--nopidfile"], env=base, capture_output=True, text=True, timeout=30, check=True)
        address, pid = bus.stdout.split()[:2]
        self._pids = [int(pid)]
        self.env = {**base, "DBUS_SESSION_BUS_ADDRESS": address}
        daemon = subprocess.run(
            ["gnome-keyring-daemon", "--unlock", "--components=secrets", "--daemonize"],
            input="test-login-password", env=self.env, capture_output=True, text=True,
            timeout=30, check=True)
        for line in daemon.stdout.splitlines():
            name, _, value = line.partition("=")
            if name == "GNOME_KEYRING_CONTROL":
                self.env[name] = value
        found = subprocess.run(["pgrep", "-f", "gnome-keyring-daemon", "-n"],
                               capture_output=True, text=True, check=False).stdout.split()
        self._pids += [int(p) for p in found]

    @staticmethod
    def available() -> bool:
        return bool(shutil.which("gnome-keyring-daemon") and shutil.which("dbus-daemon"))

    def stop(self) -> None:
        for pid in self._pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
