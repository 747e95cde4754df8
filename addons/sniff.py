"""What the first bytes of a CONNECT tunnel are: a TLS ClientHello, an HTTP/1 request, or neither.

The agent controls every byte and how they are split into TCP segments and TLS records, so the
answer is given only on enough bytes: a complete TLS ClientHello (reassembled across records),
or a complete HTTP/1 request line. Until then the caller waits. Anything that looks like TLS but
is not exactly one well-formed ClientHello naming at most one server is a problem, never "raw
TCP": that fallback is how a TLS client would skip the SNI check.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from mitmproxy.tls import ClientHello

MAX_CLIENT_HELLO = 64 * 1024  # post-quantum key shares make ~2 KiB hellos; 64 KiB is generous
MAX_REQUEST_LINE = 8 * 1024

_HANDSHAKE = 0x16
_OTHER_RECORD_TYPES = {0x14: "change_cipher_spec", 0x15: "alert", 0x17: "application_data",
                       0x18: "heartbeat"}
_CLIENT_HELLO = 0x01
_SERVER_NAME = 0x0000
_ENCRYPTED_CLIENT_HELLO = 0xFE0D
_MAX_RECORD = 2**14 + 2048  # TLSCiphertext bound; a plaintext hello record is at most 2**14

_TOKEN = rb"[A-Za-z0-9!#$%&'*+.^_`|~-]"
_REQUEST_LINE = re.compile(rb"%s+ [\x21-\x7e]+ HTTP/1\.[01]\r?\n" % _TOKEN)
# What a request line can start with before its newline arrives.
_REQUEST_LINE_PREFIX = re.compile(
    rb"%s+(?: (?:[\x21-\x7e]+(?: (?:H(?:T(?:T(?:P(?:/(?:1(?:\.[01]?\r?)?)?)?)?)?)?)?)?)?)?"
    % _TOKEN)


class Sniffed(NamedTuple):
    """The verdict on a tunnel's first bytes."""

    protocol: str  # "tls" | "http" | "tcp"
    sni: str | None = None
    problem: str | None = None  # why these bytes must be cut (malformed or ambiguous TLS)
    ech: bool = False  # an encrypted ClientHello rides inside: the real name is hidden


def sniff(data: bytes) -> Sniffed | None:
    """Classify a tunnel's first bytes; None while more are needed to be sure."""
    if not data:
        return None
    first = data[0]
    if first == _HANDSHAKE:
        return _sniff_tls(data)
    if first in _OTHER_RECORD_TYPES and (len(data) < 2 or data[1] == 0x03):
        name = _OTHER_RECORD_TYPES[first]
        return Sniffed("tls", problem=f"a TLS {name} record where a ClientHello must come first")
    if first & 0x80 and len(data) >= 3 and data[2] == 0x01:
        return Sniffed("tls", problem="an SSLv2-format ClientHello (no SNI; not accepted)")
    return _sniff_http(data)


def _sniff_tls(data: bytes) -> Sniffed | None:
    handshake = bytearray()
    offset = 0
    while True:
        header = data[offset:offset + 5]
        if len(header) >= 2 and header[1] != 0x03 or len(header) >= 3 and header[2] > 0x03:
            version = header[1:3].hex(" ")
            return Sniffed("tls", problem=f"a TLS record with unknown version {version}")
        if len(header) >= 1 and header[0] != _HANDSHAKE:
            return Sniffed("tls", problem="a non-handshake TLS record inside the ClientHello")
        if len(header) < 5:
            return None
        length = int.from_bytes(header[3:5], "big")
        if not 0 < length <= _MAX_RECORD:
            return Sniffed("tls", problem=f"a TLS record of {length} bytes")
        body = data[offset + 5:offset + 5 + length]
        if len(body) < length:
            handshake += body
            return _incomplete_or_problem(handshake)
        handshake += body
        offset += 5 + length
        if (problem := _incomplete_or_problem(handshake)) is not None:
            return problem
        size = 4 + int.from_bytes(handshake[1:4], "big") if len(handshake) >= 4 else None
        if size is not None and len(handshake) >= size:
            return _parse_client_hello(bytes(handshake[4:size]))


def _incomplete_or_problem(handshake: bytearray) -> Sniffed | None:
    """None while the handshake message is still arriving; a problem if it cannot be a hello."""
    if handshake and handshake[0] != _CLIENT_HELLO:
        return Sniffed("tls", problem=f"a TLS handshake message of type {handshake[0]} where a "
                                      "ClientHello must come first")
    if len(handshake) >= 4 and 4 + int.from_bytes(handshake[1:4], "big") > MAX_CLIENT_HELLO:
        return Sniffed("tls", problem=f"a ClientHello larger than {MAX_CLIENT_HELLO} bytes")
    return None


def _parse_client_hello(body: bytes) -> Sniffed:
    try:
        hello = ClientHello(body)
        extensions = hello.extensions
    except Exception:  # the parser raises several types on malformed input; all mean the same
        return Sniffed("tls", problem="a malformed TLS ClientHello")
    names = [data for kind, data in extensions if kind == _SERVER_NAME]
    ech = any(kind == _ENCRYPTED_CLIENT_HELLO for kind, _ in extensions)
    if len(names) > 1:
        return Sniffed("tls", problem="a ClientHello with more than one server_name extension")
    if not names:
        return Sniffed("tls", ech=ech)
    return _server_name(names[0])._replace(ech=ech)


def _server_name(extension: bytes) -> Sniffed:
    """The one host name of a server_name extension (RFC 6066), or why it is not acceptable."""
    if len(extension) < 2 or int.from_bytes(extension[:2], "big") != len(extension) - 2:
        return Sniffed("tls", problem="a malformed server_name extension")
    entries, offset = [], 2
    while offset < len(extension):
        if offset + 3 > len(extension):
            return Sniffed("tls", problem="a malformed server_name extension")
        kind = extension[offset]
        length = int.from_bytes(extension[offset + 1:offset + 3], "big")
        name = extension[offset + 3:offset + 3 + length]
        if len(name) != length:
            return Sniffed("tls", problem="a malformed server_name extension")
        entries.append((kind, name))
        offset += 3 + length
    if len(entries) != 1:
        return Sniffed("tls", problem=f"a server_name extension with {len(entries)} names")
    kind, name = entries[0]
    if kind != 0 or not name or not name.isascii():
        return Sniffed("tls", problem="a server_name that is not an ASCII host name")
    return Sniffed("tls", sni=name.decode("ascii"))


def _sniff_http(data: bytes) -> Sniffed | None:
    line_end = data.find(b"\n", 0, MAX_REQUEST_LINE)
    if line_end != -1:
        return Sniffed("http" if _REQUEST_LINE.match(data[:line_end + 1]) else "tcp")
    if len(data) < MAX_REQUEST_LINE and _REQUEST_LINE_PREFIX.fullmatch(data):
        return None  # could still become a request line
    return Sniffed("tcp")


HELLO_RETRY_RANDOM = bytes.fromhex(
    "cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c")  # RFC 8446 4.1.3


class HelloRetryWatch:
    """A passed-through TLS handshake, until it can no longer bring a new ClientHello.

    TLS 1.3 lets a server answer the first ClientHello with a HelloRetryRequest, and the
    client then sends a second ClientHello in the clear: it must name the same server as the
    first, or the SNI check on the first is moot. The server's first handshake message says
    which: a ServerHello ends the watch; a HelloRetryRequest makes the client's next bytes
    (after any change_cipher_spec records) a ClientHello to hold and judge before relaying.
    """

    __slots__ = ("_server", "_client", "retry")

    def __init__(self) -> None:
        self._server = bytearray()
        self._client = bytearray()
        self.retry = False  # the server asked for a second ClientHello

    def server_bytes(self, data: bytes) -> bool:
        """Feed the server's bytes; whether to keep watching."""
        self._server += data
        first = _first_handshake_message(self._server)
        if first is None:
            return len(self._server) < MAX_CLIENT_HELLO  # wait, but not forever
        kind, body = first
        self.retry = kind == 2 and body[2:34] == HELLO_RETRY_RANDOM
        self._server.clear()
        return self.retry

    def client_bytes(self, data: bytes) -> Sniffed | None:
        """Feed the client's bytes after a HelloRetryRequest; the verdict on its second
        ClientHello, None while it is incomplete (the bytes are held meanwhile)."""
        self._client += data
        rest = _after_change_cipher_spec(bytes(self._client))
        if rest is None:
            return None
        return sniff(rest) if rest else None

    def held(self) -> bytes:
        return bytes(self._client)


def _first_handshake_message(data: bytearray) -> tuple[int, bytes] | None:
    """The type and the first 34 body bytes of the first handshake message in TLS records;
    (0, b"") when the first record is not a handshake (an alert): not a retry either way."""
    handshake, offset = bytearray(), 0
    while len(handshake) < 38:
        header = data[offset:offset + 5]
        if len(header) < 5:
            return None
        if header[0] != _HANDSHAKE:
            return 0, b""
        length = int.from_bytes(header[3:5], "big")
        handshake += data[offset + 5:offset + 5 + length]
        if len(data) < offset + 5 + length and len(handshake) < 38:
            return None
        offset += 5 + length
    return handshake[0], bytes(handshake[4:38])


def _after_change_cipher_spec(data: bytes) -> bytes | None:
    """The bytes after any leading change_cipher_spec records (sent for middlebox
    compatibility); None while one is incomplete."""
    while data[:1] == b"\x14":
        if len(data) < 5:
            return None
        end = 5 + int.from_bytes(data[3:5], "big")
        if len(data) < end:
            return None
        data = data[end:]
    return data
