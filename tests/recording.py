"""A TLS origin on loopback that records every raw byte it receives (so a request the proxy
never decided is visible), a proxy with request rules in front of it, and raw clients that
speak through the intercepted tunnel byte for byte (tests/test_request_rule_attacks.py)."""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import trustme
from proxyproc import ProxyProcess

NAMES = ["api.example.test", "other.example.test", "refused.example.test"]


class RawOrigin:
    """TLS (or plain) origin: logs raw bytes per connection, answers each request head with a
    200 whose body echoes the request line it saw. ALPN: http/1.1 only unless h2=True."""

    def __init__(self, ca: trustme.CA | None, *, alpn: tuple[str, ...] = ("http/1.1",)) -> None:
        self.ctx = None
        if ca is not None:
            self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ca.issue_cert(*NAMES).configure_cert(self.ctx)
            self.ctx.set_alpn_protocols(list(alpn))
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(50)
        self.port = self.sock.getsockname()[1]
        self.received: list[bytes] = []  # one entry per connection, grown as bytes come
        self.lock = threading.Lock()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with self.lock:
            index = len(self.received)
            self.received.append(b"")
        try:
            if self.ctx is not None:
                conn = self.ctx.wrap_socket(conn, server_side=True)
            conn.settimeout(5)
            buffer = b""
            while True:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                with self.lock:
                    self.received[index] += chunk
                buffer += chunk
                while b"\r\n\r\n" in buffer:
                    head, buffer = buffer.split(b"\r\n\r\n", 1)
                    line = head.split(b"\r\n", 1)[0]
                    body = b"origin saw: " + line + b"\n"
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: " + str(len(body)).encode()
                                 + b"\r\n\r\n" + body)
        except (OSError, ssl.SSLError):
            pass
        finally:
            with contextlib.suppress(OSError):
                conn.close()

    def all_bytes(self) -> bytes:
        with self.lock:
            return b"".join(self.received)

    def request_lines(self) -> list[bytes]:
        lines = []
        for data in list(self.received):
            for part in data.split(b"\r\n"):
                if part.endswith((b" HTTP/1.1", b" HTTP/1.0")):
                    lines.append(part)
        return lines


def attack_policy(origin_port: int, ca_file: Path, extra: str = "") -> str:
    return f"""version = 1
[network]
default = "deny"
allow = ["api.example.test", "other.example.test"]
ports = [443, {origin_port}]
allowed_cidrs = ["127.0.0.0/8"]
request_default = "deny"
explain_https = true
upstream_ca_file = "{ca_file}"

[[network.requests]]
host = "api.example.test"
methods = ["GET"]
paths = ["/public/**"]
action = "allow"

[[network.requests]]
host = "api.example.test"
paths = ["/public/secret", "/public/secret/**"]
action = "deny"

[[network.requests]]
host = "api.example.test"
paths = ["/any/**"]
action = "allow"

[[network.requests]]
host = "api.example.test"
methods = ["DELETE"]
paths = ["/any/**"]
action = "deny"

[[network.requests]]
host = "api.example.test"
methods = ["POST"]
paths = ["/ask/**"]
action = "ask"

[[network.requests]]
host = "api.example.test"
methods = ["POST"]
paths = ["/post/**"]
action = "allow"
{extra}
[approvals]
timeout = 30

[resolve]
"api.example.test" = "127.0.0.1"
"other.example.test" = "127.0.0.1"
"refused.example.test" = "127.0.0.1"
"""


class Setup:
    def __init__(self, workdir: Path, extra: str = "",
                 alpn: tuple[str, ...] = ("http/1.1",)) -> None:
        self.workdir = workdir
        self.ca = trustme.CA()
        self.ca_file = self.workdir / "origin-ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self.origin = RawOrigin(self.ca, alpn=alpn)
        home = self.workdir / "home"
        env = {"HOME": str(home), "XDG_DATA_HOME": str(self.workdir / "data"),
               "XDG_CONFIG_HOME": str(self.workdir / "config"),
               "XDG_STATE_HOME": str(self.workdir / "state"),
               "XDG_CACHE_HOME": str(self.workdir / "cache")}
        self.proxy = ProxyProcess(self.workdir / "proxy",
                                  attack_policy(self.origin.port, self.ca_file, extra), env=env)
        out = subprocess.run([sys.executable, "-m", "agent_egress.proxy", "ca", "path"],
                             env={**os.environ, **env}, capture_output=True, text=True,
                             timeout=30, check=True)
        self.proxy_ca = Path(out.stdout.strip())

    def client_context(self, alpn: tuple[str, ...] = ("http/1.1",)) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.proxy_ca))
        if alpn:
            ctx.set_alpn_protocols(list(alpn))
        return ctx

    def tunnel(self, host: str = "api.example.test", alpn: tuple[str, ...] = ("http/1.1",),
               sni: str | None = None) -> ssl.SSLSocket:
        sock = socket.create_connection(("127.0.0.1", self.proxy.port), timeout=10)
        target = f"{host}:{self.origin.port}"
        sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(4096)
        assert head.startswith(b"HTTP/1.1 200"), head
        deadline = time.monotonic() + 10
        while not self.proxy_ca.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.client_context(alpn).wrap_socket(sock, server_hostname=sni or host)

    def send(self, raw: bytes, host: str = "api.example.test", wait: float = 1.5) -> bytes:
        tls = self.tunnel(host)
        tls.sendall(raw)
        tls.settimeout(wait)
        data = b""
        with contextlib.suppress(OSError):
            while chunk := tls.recv(65536):
                data += chunk
        tls.close()
        return data

    def stop(self) -> None:
        self.proxy.stop()


def decided(setup: Setup, after: int = 0) -> list[dict]:
    return [e for e in setup.proxy.events()[after:] if e["event"] == "request.decided"]
