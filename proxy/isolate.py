"""`run --isolate`: the command in a network namespace of its own, with only loopback, whose
one way out is the proxy.

Outside, `run` relays two Unix sockets (in a directory only it can enter) to the proxy's HTTP and
SOCKS5 ports. Inside, `agent-egress isolate-bridge` listens on 127.0.0.1 with the proxy's port
numbers, relays each connection to its Unix socket (a Unix socket is a file, not an address: it
crosses the namespace boundary), then starts the command with the proxy variables pointing at
itself. Nothing else leaves: a direct connection finds no route, and no name resolves (there is
no resolver in the namespace; the local resolver daemons' sockets are hidden as well).

The namespace comes from bubblewrap (`bwrap --unshare-net`), or, as root without it, from
util-linux `unshare --net --mount`. Neither: `run` refuses rather than run unisolated.
"""

from __future__ import annotations

import os
import shutil
import socket
import socketserver
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

# Resolver daemons reached over Unix sockets, which a network namespace does not separate:
# nscd, systemd-resolved (its varlink socket, and D-Bus, which also reaches it), avahi (mDNS,
# through nss-mdns), SSSD.
RESOLVER_SOCKET_DIRS = ("/run/nscd", "/run/systemd/resolve", "/run/dbus", "/run/avahi-daemon",
                        "/var/lib/sss/pipes")
# `-I`: the interpreter never imports from the working directory (the agent's project, where a
# planted `agent_egress/` package would otherwise run as the proxy or the root bridge).
PYTHON = (sys.executable, "-I")


class IsolationError(Exception):
    """The command cannot be isolated here; the message says why and what to do."""


def namespace_command(bridge: Sequence[str], argv: Sequence[str],
                      tool: str = "auto") -> list[str]:
    """The command that runs `bridge -- argv` in a namespace with only loopback (bwrap, else
    unshare as root; or the tool asked for); raises IsolationError when it is not possible."""
    masks = [path for path in RESOLVER_SOCKET_DIRS if os.path.isdir(path)]
    bwrap = shutil.which("bwrap") if tool in ("auto", "bwrap") else None
    if tool == "bwrap" and bwrap is None:
        raise IsolationError("--isolate bwrap: bubblewrap is not installed (apt-get install "
                             "bubblewrap)")
    if bwrap is not None:
        mounts = [argument for path in masks for argument in ("--tmpfs", path)]
        # A PID namespace of its own: no process outside to signal, trace or read /proc of.
        return [bwrap, "--unshare-net", "--unshare-pid", "--die-with-parent", "--dev-bind",
                "/", "/", "--proc", "/proc", *mounts, "--", *bridge, "--", *argv]
    unshare = shutil.which("unshare")
    if os.geteuid() == 0 and unshare is not None:
        hidden = [argument for path in masks for argument in ("--mask", path)]
        return [unshare, "--net", "--mount", "--propagation", "private", "--pid", "--fork",
                "--mount-proc", "--", *bridge, *hidden, "--", *argv]
    if tool == "unshare":
        raise IsolationError("--isolate unshare needs root and util-linux unshare")
    raise IsolationError("--isolate needs bubblewrap (apt-get install bubblewrap) or root "
                         "(for unshare --net); refusing to run the command without isolation")


def inside_url(url: str) -> str:
    """The proxy URL as seen inside the namespace: the bridge on 127.0.0.1, same port."""
    parts = urlsplit(url)
    user = f"{parts.username}@" if parts.username else ""
    return urlunsplit((parts.scheme, f"{user}127.0.0.1:{parts.port}", "", "", ""))


class _Relay(socketserver.BaseRequestHandler):
    server: UnixRelay

    def handle(self) -> None:
        try:
            upstream = socket.create_connection(self.server.target, timeout=10)
        except OSError:
            return
        upstream.settimeout(None)
        pipe(self.request, upstream)


def pipe(a: socket.socket, b: socket.socket) -> None:
    """Bytes both ways until both sides are done (half-closes passed on)."""
    def one_way(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    other = threading.Thread(target=one_way, args=(b, a), daemon=True)
    other.start()
    one_way(a, b)
    other.join()
    a.close()
    b.close()


class UnixRelay(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """A Unix socket whose connections are relayed to a TCP address (the proxy's port)."""

    daemon_threads = True

    def __init__(self, path: Path, target: tuple[str, int]) -> None:
        self.target = target
        super().__init__(str(path), _Relay)
        threading.Thread(target=self.serve_forever, daemon=True).start()


class Isolation:
    """The outside half: the relays and the command line that starts the inside half."""

    def __init__(self, urls: dict[str, str], tool: str = "auto") -> None:
        self.tool = tool
        self.directory = Path(tempfile.mkdtemp(prefix="agent-egress-isolate-"))  # 0700
        self.relays: list[UnixRelay] = []
        self.maps: list[str] = []
        for name, url in urls.items():
            parts = urlsplit(url)
            assert parts.hostname is not None and parts.port is not None
            path = self.directory / f"{name}.sock"
            self.relays.append(UnixRelay(path, (parts.hostname, parts.port)))
            self.maps += ["--map", f"{parts.port}={path}"]

    def command(self, argv: Sequence[str], user: tuple[int, int, list[int]] | None) -> list[str]:
        bridge = [*PYTHON, "-m", "agent_egress.proxy", "isolate-bridge", *self.maps]
        if user is not None:
            uid, gid, groups = user
            bridge += ["--user", f"{uid}:{gid}:{','.join(map(str, groups))}"]
        return namespace_command(bridge, argv, self.tool)

    def close(self) -> None:
        for relay in self.relays:
            relay.shutdown()
            relay.server_close()
        shutil.rmtree(self.directory, ignore_errors=True)
