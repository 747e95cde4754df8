"""Raw-socket clients for tests where a client library would hide the trick: split segments,
hand-made TLS records and ClientHellos, malformed request lines."""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import struct
import time


def connect(proxy_port: int, host: str = "127.0.0.1", timeout: float = 10) -> socket.socket:
    sock = socket.create_connection((host, proxy_port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # one send, one segment
    return sock


def read_head(sock: socket.socket) -> bytes:
    """Read up to the end of a response head (or EOF)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def read_all(sock: socket.socket, timeout: float = 10) -> bytes:
    """Everything until the peer closes (or the timeout): what the client was told."""
    sock.settimeout(timeout)
    data = b""
    with contextlib.suppress(TimeoutError, ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


def open_tunnel(proxy_port: int, target: str) -> socket.socket:
    sock = connect(proxy_port)
    sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    head = read_head(sock)
    assert head.startswith(b"HTTP/1.1 200"), head
    return sock


def closed_by_peer(sock: socket.socket, timeout: float = 10) -> bool:
    """Whether the peer closed the connection (EOF or reset) within the timeout."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def send_segments(sock: socket.socket, data: bytes, cuts: tuple[int, ...],
                  pause: float = 0.2) -> None:
    """Send data split at the given offsets, pausing so each piece arrives on its own."""
    start = 0
    for cut in (*cuts, len(data)):
        sock.sendall(data[start:cut])
        start = cut
        time.sleep(pause)


class TLSClient:
    """Python's TLS client on memory buffers: its ClientHello is sent by hand, any way split."""

    def __init__(self, server_name: str, ca_file: str | None = None) -> None:
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        context = ssl.create_default_context(cafile=ca_file)
        if ca_file is None:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname=server_name)

    def client_hello(self) -> bytes:
        with contextlib.suppress(ssl.SSLWantReadError):
            self.tls.do_handshake()
        return self.outgoing.read()

    def finish(self, sock: socket.socket, timeout: float = 5) -> bool:
        """Carry the handshake to its end over the socket (the hello was sent already)."""
        sock.settimeout(timeout)
        while True:
            try:
                self.tls.do_handshake()
                sock.sendall(self.outgoing.read())
                return True
            except ssl.SSLWantReadError:
                if pending := self.outgoing.read():
                    sock.sendall(pending)
            except (ssl.SSLError, OSError):
                return False
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, OSError):
                return False
            if not chunk:
                return False
            self.incoming.write(chunk)

    def request(self, sock: socket.socket, text: str) -> bytes:
        """Send a request over the finished handshake; the response bytes until EOF."""
        self.tls.write(text.encode())
        sock.sendall(self.outgoing.read())
        data = b""
        while True:
            try:
                data += self.tls.read(65536)
                continue
            except ssl.SSLWantReadError:
                pass
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return data
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, OSError):
                return data
            if not chunk:
                return data
            self.incoming.write(chunk)


def record(content_type: int, body: bytes, version: bytes = b"\x03\x01") -> bytes:
    return bytes([content_type]) + version + struct.pack("!H", len(body)) + body


def server_name_extension(*names: bytes) -> bytes:
    entries = b"".join(b"\x00" + struct.pack("!H", len(n)) + n for n in names)
    body = struct.pack("!H", len(entries)) + entries
    return struct.pack("!HH", 0, len(body)) + body


def handmade_client_hello(*extensions: bytes) -> bytes:
    """A minimal TLS 1.2 ClientHello handshake message with the given extensions."""
    ciphers = struct.pack("!H", 4) + b"\x13\x01\xc0\x2f"
    ext = b"".join(extensions)
    body = (b"\x03\x03" + os.urandom(32) + b"\x00" + ciphers + b"\x01\x00"
            + struct.pack("!H", len(ext)) + ext)
    return b"\x01" + len(body).to_bytes(3, "big") + body
