"""Real local origin servers for the tests: HTTPS (trustme certificates) and plain HTTP.

Each counts the TCP connections it accepts, so a test can prove a refused request never
reached it.
"""

from __future__ import annotations

import http.server
import ssl
import threading
from pathlib import Path


class _Handler(http.server.SimpleHTTPRequestHandler):
    server: CountingServer
    protocol_version = "HTTP/1.1"
    # Headers and body in one segment, sent at once: no Nagle/delayed-ACK stalls on keep-alive.
    wbufsize = -1
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: object) -> None:
        self.server.requests.append(self.requestline)

    def do_GET(self) -> None:
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
        length = int(self.headers.get("Content-Length", 0))
        data = self.rfile.read(length)
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class CountingServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, name: str, root: Path, tls: ssl.SSLContext | None) -> None:
        self.name = name
        self.root = root
        self.connections = 0
        self.requests: list[str] = []
        self._tls = tls
        super().__init__(("127.0.0.1", 0), self._make_handler())

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
