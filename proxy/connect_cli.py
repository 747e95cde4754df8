"""`agent-egress connect HOST PORT`: standard input and output relayed to HOST:PORT through the
proxy's SOCKS5 port, for `ssh -o ProxyCommand='agent-egress connect %h %p'` (git over SSH).

The proxy decides the destination by name (the relay never resolves it), holds it for a person
if the policy says so, and refuses it with a SOCKS5 reply code this command turns into words.
"""

from __future__ import annotations

import argparse
import os
import shlex
import socket
import sys
import threading
from collections.abc import Mapping
from urllib.parse import unquote, urlsplit

from .textsafe import printable

EXIT_REFUSED = 1
EXIT_USAGE = 2
_REPLIES = {
    0x01: "the proxy failed",
    0x02: "the policy does not allow this destination (see the proxy's audit log, or "
          "`agent-egress policy explain`)",
    0x03: "the network is unreachable",
    0x04: "the host could not be resolved or reached",
    0x05: "the destination refused the connection",
    0x07: "the proxy does not support this request",
    0x08: "the proxy does not support this address type",
}


def add_parsers(commands: argparse._SubParsersAction) -> None:
    connect = commands.add_parser(
        "connect", help="relay stdin/stdout to HOST PORT through the proxy (ssh ProxyCommand)",
        description="Relay standard input and output to HOST:PORT through the proxy's SOCKS5 "
                    "port, e.g. ssh -o ProxyCommand='agent-egress connect %%h %%p'. The proxy "
                    "is --proxy, else ALL_PROXY/all_proxy (socks5h://[AGENT@]HOST:PORT; "
                    "`agent-egress run` sets it). Exits 1 when the proxy refuses.")
    connect.add_argument("host", metavar="HOST")
    connect.add_argument("port", metavar="PORT", type=_port)
    connect.add_argument("--proxy", metavar="URL",
                         help="the SOCKS5 proxy, socks5h://[AGENT@]HOST:PORT")
    connect.add_argument("--timeout", metavar="SECONDS", type=float, default=None,
                         help="give up when the proxy has not answered by then (default: wait, "
                              "as a person may be deciding)")
    connect.set_defaults(handler=cmd_connect)


def _port(value: str) -> int:
    if not (value.isascii() and value.isdigit()) or not 0 < int(value) < 65536:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port (1-65535)")
    return int(value)


class ConnectError(Exception):
    """The relay cannot be set up; the message says why, the status how to exit."""

    def __init__(self, message: str, status: int = EXIT_REFUSED) -> None:
        super().__init__(message)
        self.status = status


def socks_proxy(url: str | None, environ: Mapping[str, str]) -> tuple[str, int, str | None]:
    """(host, port, agent name) of the SOCKS5 proxy to use; raises ConnectError."""
    url = url or environ.get("ALL_PROXY") or environ.get("all_proxy")
    if not url:
        raise ConnectError("no proxy: pass --proxy socks5h://HOST:PORT, or set ALL_PROXY "
                           "(agent-egress run does; serve prints it with --socks-listen)",
                           EXIT_USAGE)
    parts = urlsplit(url)
    if parts.scheme not in ("socks5h", "socks5") or not parts.hostname:
        raise ConnectError(f"the proxy {printable(url)!r} is not a SOCKS5 URL "
                           "(socks5h://HOST:PORT); is the proxy's SOCKS5 port on "
                           "(serve --socks-listen)?", EXIT_USAGE)
    try:
        port = parts.port or 1080
    except ValueError:
        raise ConnectError(f"the proxy URL {printable(url)!r} has an invalid port",
                           EXIT_USAGE) from None
    return parts.hostname, port, unquote(parts.username) if parts.username else None


def _read(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectError("the proxy closed the connection during the SOCKS5 handshake")
        data += chunk
    return data


def open_tunnel(proxy: tuple[str, int, str | None], host: str, port: int,
                timeout: float | None) -> socket.socket:
    """A connection to HOST:PORT through the SOCKS5 proxy; raises ConnectError."""
    proxy_host, proxy_port, agent = proxy
    try:
        name = host.encode("idna")
    except UnicodeError:
        raise ConnectError(f"{printable(host)!r} is not a host name") from None
    if not 0 < len(name) < 256:
        raise ConnectError(f"{printable(host)!r} is not a host name")
    try:
        sock = socket.create_connection((proxy_host, proxy_port), timeout=10)
    except OSError as exc:
        raise ConnectError(f"cannot reach the proxy at {proxy_host}:{proxy_port}: "
                           f"{exc.strerror or exc}") from None
    try:
        sock.settimeout(timeout)
        sock.sendall(b"\x05\x02\x00\x02" if agent else b"\x05\x01\x00")
        method = _read(sock, 2)
        if method == b"\x05\x02" and agent:
            user = agent.encode()[:255]
            sock.sendall(b"\x01" + bytes([len(user)]) + user + b"\x00")
            if _read(sock, 2) != b"\x01\x00":
                raise ConnectError("the proxy refused the agent name")
        elif method != b"\x05\x00":
            raise ConnectError("the proxy does not speak SOCKS5 as expected "
                               f"(greeting answered {method.hex()})")
        sock.sendall(b"\x05\x01\x00\x03" + bytes([len(name)]) + name + port.to_bytes(2, "big"))
        answer = _read(sock, 4)
        if answer[1] != 0x00:
            why = _REPLIES.get(answer[1], f"SOCKS5 reply {answer[1]}")
            raise ConnectError(f"the proxy refused {printable(host)}:{port}: {why}")
        bound = {0x01: 4, 0x04: 16}.get(answer[3])
        _read(sock, (bound if bound is not None else _read(sock, 1)[0]) + 2)
        sock.settimeout(None)
        return sock
    except (ConnectError, OSError) as exc:
        sock.close()
        if isinstance(exc, socket.timeout):
            raise ConnectError(f"the proxy did not answer within {timeout:g} s") from None
        if isinstance(exc, OSError):
            raise ConnectError(f"the connection to the proxy failed: {exc}") from None
        raise


def relay(sock: socket.socket) -> None:
    """Standard input to the socket and the socket to standard output, until the far end
    closes (ssh closes our standard input when it is done)."""
    def upstream() -> None:
        try:
            while data := os.read(0, 65536):
                sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    threading.Thread(target=upstream, daemon=True).start()
    while data := sock.recv(65536):
        view = memoryview(data)
        while view:
            view = view[os.write(1, view):]


def cmd_connect(args: argparse.Namespace) -> int:
    try:
        sock = open_tunnel(socks_proxy(args.proxy, os.environ), args.host, args.port,
                           args.timeout)
    except ConnectError as exc:
        print(f"agent-egress connect: {exc}", file=sys.stderr)
        return exc.status
    try:
        relay(sock)
    except OSError as exc:
        print(f"agent-egress connect: the connection to {printable(args.host)}:{args.port} "
              f"failed: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_REFUSED
    finally:
        sock.close()
    return 0


def ssh_environment(environ: Mapping[str, str], python: str = sys.executable) -> dict[str, str]:
    """GIT_SSH_COMMAND with this relay as ssh's ProxyCommand, unless the user set their own."""
    if environ.get("GIT_SSH_COMMAND") or environ.get("GIT_SSH"):
        return {}
    # -I: never import from the working directory (a repository git works in).
    relay_command = f"{shlex.quote(python)} -I -m agent_egress.proxy connect %h %p"
    return {"GIT_SSH_COMMAND": f"ssh -o {shlex.quote('ProxyCommand=' + relay_command)}"}
