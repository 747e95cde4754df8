"""`agent-egress isolate-bridge`: the inside half of `run --isolate` (proxy/isolate.py).

Runs first thing in the new network namespace: hides the resolver daemons' sockets (when
unshare made the namespace; bwrap does it itself), brings loopback up, listens on 127.0.0.1 at
each mapped port and relays every connection to its Unix socket (the proxy, outside), then runs
the command (as the agent's user, if given) and exits with its status.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import signal
import socket
import socketserver
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from .isolate import pipe

_SIOCGIFFLAGS, _SIOCSIFFLAGS, _IFF_UP = 0x8913, 0x8914, 0x1


def add_parsers(commands: Any) -> None:
    bridge = commands.add_parser(
        "isolate-bridge", help="(internal) the inside of run --isolate",
        description="Used by `run --isolate`: relay 127.0.0.1:PORT to a Unix socket inside a "
                    "network namespace, then run COMMAND.")
    bridge.add_argument("--map", metavar="PORT=SOCKET", action="append", default=[],
                        required=True)
    bridge.add_argument("--mask", metavar="DIR", action="append", default=[],
                        help="hide this directory (a resolver's sockets) under an empty tmpfs")
    bridge.add_argument("--user", metavar="UID:GID:GROUPS", help="run COMMAND as this user")
    bridge.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND ...")
    bridge.set_defaults(handler=cmd_bridge)


class _ToUnix(socketserver.BaseRequestHandler):
    server: _Listener

    def handle(self) -> None:
        outside = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            outside.connect(self.server.path)
        except OSError:
            outside.close()
            return
        pipe(self.request, outside)


class _Listener(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port: int, path: str) -> None:
        self.path = path
        super().__init__(("127.0.0.1", port), _ToUnix)


def loopback_up() -> None:
    """A fresh namespace's loopback is down under unshare (bwrap brings it up)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(sock, _SIOCGIFFLAGS, request))[1]
        if not flags & _IFF_UP:
            fcntl.ioctl(sock, _SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | _IFF_UP))


def _fail(message: str) -> int:
    print(f"agent-egress run --isolate: {message}", file=sys.stderr)
    return 2


def cmd_bridge(args: argparse.Namespace) -> int:
    command = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not command:
        return _fail("no command to run")
    for directory in args.mask:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k,mode=0755", "tmpfs",
                                  directory], capture_output=True, text=True)
        if mounted.returncode != 0:
            return _fail(f"cannot hide {directory}: {mounted.stderr.strip()}")
    try:
        loopback_up()
        listeners = []
        for mapping in args.map:
            port, _, path = mapping.partition("=")
            if not Path(path).is_socket():
                return _fail(f"the proxy's relay socket {path} is missing")
            listeners.append(_Listener(int(port), path))
    except OSError as exc:
        return _fail(f"cannot set up the namespace's loopback bridge: {exc}")
    for listener in listeners:
        threading.Thread(target=listener.serve_forever, daemon=True).start()
    options: dict[str, Any] = {}
    if args.user:
        uid, gid, groups = args.user.split(":")
        options = {"user": int(uid), "group": int(gid),
                   "extra_groups": [int(g) for g in groups.split(",") if g]}
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return _fail("setpriv (util-linux) is missing: it keeps the command from gaining "
                     "privileges (setuid programs) or keeping root's capabilities")
    # No new privileges: a setuid program inside does not run with its owner's rights.
    drop = ["--no-new-privs"]
    if not args.user and os.geteuid() == 0:
        # Root keeps CAP_SYS_ADMIN, with which `nsenter --net=/proc/PID/ns/net` walks out of
        # the namespace (run refuses root without --agent-user; this is the second line).
        drop += ["--inh-caps=-all", "--bounding-set=-all"]
    command = [setpriv, *drop, "--", *command]
    try:
        # A session of its own: the terminal is not its controlling terminal, so it cannot
        # push keystrokes into the shell that started `run` (TIOCSTI).
        child = subprocess.Popen(command, start_new_session=True, **options)
    except FileNotFoundError:
        print(f"agent-egress run: command not found: {command[0]}", file=sys.stderr)
        return 127
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda number, _: child.send_signal(number))
    status = child.wait()
    return status if status >= 0 else 128 - status
