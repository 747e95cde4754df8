"""A loopback HTTPS server publishing a managed policy and its signature, as an administrator's
web server or object store would: ETags, If-None-Match answered 304, contents the test
switches, every request recorded."""

from __future__ import annotations

import hashlib
import http.server
import ssl
import threading

import trustme

PATH = "/fleet/managed.toml"


class _Handler(http.server.BaseHTTPRequestHandler):
    server: PolicyServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        with self.server.lock:
            policy, signature = self.server.policy, self.server.signature
        if self.path == PATH:
            etag = f'"{hashlib.sha256(policy).hexdigest()[:16]}"'
            match = self.headers.get("If-None-Match")
            status, body = (304, b"") if match == etag else (200, policy)
            self.server.record(self.path, match, status)
            self.send_response(status)
            self.send_header("ETag", etag)
        elif self.path == PATH + ".sig" and signature is not None:
            status, body = 200, signature
            self.server.record(self.path, None, status)
            self.send_response(status)
        else:
            status, body = 404, b"not found\n"
            self.server.record(self.path, None, status)
            self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class PolicyServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, ca: trustme.CA, port: int = 0) -> None:
        super().__init__(("127.0.0.1", port), _Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ca.issue_cert("127.0.0.1").configure_cert(context)
        self.socket = context.wrap_socket(self.socket, server_side=True)
        self.lock = threading.Lock()
        self.policy = b""
        self.signature: bytes | None = None
        self.requests: list[tuple[str, str | None, int]] = []  # path, If-None-Match, status

    def publish(self, policy: bytes, signature: bytes | None) -> None:
        with self.lock:
            self.policy, self.signature = policy, signature

    def record(self, path: str, if_none_match: str | None, status: int) -> None:
        with self.lock:
            self.requests.append((path, if_none_match, status))

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.server_address[1]}{PATH}"

    def start(self) -> PolicyServer:
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
