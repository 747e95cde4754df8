"""Real local origin servers for the tests: HTTPS (trustme certificates) and plain HTTP.

Each counts the TCP connections it accepts, so a test can prove a refused request never
reached it.
"""

from __future__ import annotations

import http.server
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

SMART_GIT = "/smart/"  # paths under it are served by git-http-backend (git's smart HTTP)
PRIVATE_GIT = "/private/"  # the same, behind Basic auth (CountingServer.basic_auth)
NPM_REGISTRY = "/npm/"  # an npm registry's package documents (see _npm)


class _Handler(http.server.SimpleHTTPRequestHandler):
    server: CountingServer
    protocol_version = "HTTP/1.1"
    # Headers and body in one segment, sent at once: no Nagle/delayed-ACK stalls on keep-alive.
    wbufsize = -1
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: object) -> None:
        self.server.requests.append(self.requestline)
        headers = getattr(self, "headers", None)  # absent when the request did not parse
        self.server.authorizations.append(headers.get("Authorization") if headers else None)

    def do_GET(self) -> None:
        if self.path.startswith((SMART_GIT, PRIVATE_GIT)):
            self._smart_git()
            return
        if self.path.startswith(NPM_REGISTRY):
            self._npm()
            return
        if self.path.startswith(("/hello", "/headers")):
            body = f"hello from {self.server.name}: {self.path} host={self.headers['Host']}\n"
            if self.path.startswith("/headers"):  # what arrived, for header-stripping tests
                body += "".join(f"{name.lower()}: {value}\n" for name, value in
                                self.headers.items())
            data = body.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        super().do_GET()

    def do_POST(self) -> None:
        if self.path.startswith((SMART_GIT, PRIVATE_GIT)):
            self._smart_git()
            return
        length = int(self.headers.get("Content-Length", 0))
        data = self.rfile.read(length)
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


    def _npm(self) -> None:
        """An npm registry: /npm/NAME is the package document (NAME.json under the webroot's
        npm/), tarballs are static files under /npm/-/."""
        name = self.path[len(NPM_REGISTRY):].split("?", 1)[0]
        document = Path(self.directory) / "npm" / f"{name.replace('/', '%2f')}.json"
        if "/" in name or not document.is_file():
            super().do_GET()
            return
        data = document.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _smart_git(self) -> None:
        """git's smart HTTP protocol through git-http-backend (CGI), pushes enabled: a push
        the test sees refused was refused by the proxy, not by this origin. Under /private/,
        only with the Basic credentials the server was given."""
        if self.path.startswith(PRIVATE_GIT) and (
                self.headers.get("Authorization") != self.server.basic_auth):
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="private"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        prefix = PRIVATE_GIT if self.path.startswith(PRIVATE_GIT) else SMART_GIT
        path, _, query = self.path[len(prefix) - 1:].partition("?")
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        env = {"PATH": "/usr/bin:/bin", "GIT_PROJECT_ROOT": str(self.server.root),
               "GIT_HTTP_EXPORT_ALL": "1", "REQUEST_METHOD": self.command, "PATH_INFO": path,
               "QUERY_STRING": query, "CONTENT_TYPE": self.headers.get("Content-Type", ""),
               "CONTENT_LENGTH": str(len(body)), "REMOTE_USER": "agent",
               "REMOTE_ADDR": self.client_address[0], "GIT_CONFIG_COUNT": "1",
               "GIT_CONFIG_KEY_0": "http.receivepack", "GIT_CONFIG_VALUE_0": "true",
               "HTTP_CONTENT_ENCODING": self.headers.get("Content-Encoding", ""),
               "HTTP_GIT_PROTOCOL": self.headers.get("Git-Protocol", "")}
        result = subprocess.run(["git", "http-backend"], input=body, env=env,
                                capture_output=True, timeout=60, check=False)
        head, _, payload = result.stdout.partition(b"\r\n\r\n")
        status = 200
        headers = []
        for line in head.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            if name.lower() == "status":
                status = int(value.split()[0])
            elif name:
                headers.append((name, value.strip()))
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


class CountingServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, name: str, root: Path, tls: ssl.SSLContext | None,
                 address: tuple[str, int] = ("127.0.0.1", 0)) -> None:
        self.name = name
        self.root = root
        self.connections = 0
        self.requests: list[str] = []
        self.authorizations: list[str | None] = []  # each request's Authorization header
        self.basic_auth: str | None = None  # what /private/ requires, e.g. "Basic dXNlcjpwdw=="
        self._tls = tls
        super().__init__(address, self._make_handler())

    def _make_handler(self) -> type[_Handler]:
        root = str(self.root)

        class Handler(_Handler):
            def __init__(self, *args: object, **kwargs: object) -> None:
                super().__init__(*args, directory=root, **kwargs)  # type: ignore[arg-type]

        return Handler

    def get_request(self):  # type: ignore[override]
        sock, address = super().get_request()
        self.connections += 1
        if self._tls is not None:
            sock = self._tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, address

    def finish_request(self, request, client_address) -> None:  # type: ignore[override]
        if self._tls is not None:
            try:
                request.do_handshake()
            except (ssl.SSLError, OSError):
                return
        super().finish_request(request, client_address)

    @property
    def port(self) -> int:
        return self.server_address[1]

    def start(self) -> CountingServer:
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


def free_port() -> int:
    """A loopback port nothing listens on (for a server the test starts by its port)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_listening(port: int, timeout: float) -> bool:
    """Whether a server started by the test accepts connections on 127.0.0.1:port in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False
