"""A SOCKS5 client made of raw socket writes, so a test can send exactly what an attacker would."""

from __future__ import annotations

import socket

CONNECT, BIND, UDP_ASSOCIATE = 1, 2, 3
IPV4, DOMAIN_NAME, IPV6 = 1, 3, 4


def greet(proxy_port: int, user: bytes | None = None, password: bytes = b"secret",
          timeout: float = 10) -> socket.socket:
    """A connection to the SOCKS5 port past the method (and user name) negotiation."""
    sock = socket.create_connection(("127.0.0.1", proxy_port), timeout=timeout)
    sock.sendall(b"\x05\x01\x02" if user is not None else b"\x05\x01\x00")
    chosen = recv_exactly(sock, 2)
    assert chosen == (b"\x05\x02" if user is not None else b"\x05\x00"), chosen
    if user is not None:
        sock.sendall(b"\x01" + bytes([len(user)]) + user + bytes([len(password)]) + password)
        assert recv_exactly(sock, 2) == b"\x01\x00"
    return sock


def request(host: str | bytes, port: int, command: int = CONNECT,
            address_type: int = DOMAIN_NAME) -> bytes:
    if address_type == DOMAIN_NAME:
        name = host.encode() if isinstance(host, str) else host
        address = bytes([len(name)]) + name
    elif address_type in (IPV4, IPV6):
        family = socket.AF_INET if address_type == IPV4 else socket.AF_INET6
        address = socket.inet_pton(family, str(host))
    else:
        address = host if isinstance(host, bytes) else host.encode()
    return bytes([5, command, 0, address_type]) + address + port.to_bytes(2, "big")


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def reply_code(sock: socket.socket) -> int | None:
    """The reply code of the proxy's answer (None if it closed without one)."""
    answer = recv_exactly(sock, 10)
    return answer[1] if len(answer) == 10 and answer[0] == 5 else None


def open_tunnel(proxy_port: int, host: str, port: int, user: bytes | None = None,
                address_type: int = DOMAIN_NAME) -> tuple[socket.socket, int | None]:
    """A SOCKS5 CONNECT; the socket and the reply code (0: the tunnel is open)."""
    sock = greet(proxy_port, user)
    sock.sendall(request(host, port, address_type=address_type))
    return sock, reply_code(sock)
