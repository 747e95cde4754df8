"""Request rules against an agent that writes its requests byte by byte: every spelling an
origin could read as another path or method than the one decided is refused, and nothing
refused reaches the origin (a recording TLS origin behind the real proxy, tests/recording.py).

These are the attack review's reproductions (each passed against the first interception
build), turned around.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import h2.config
import h2.connection
import h2.events
import pytest
from holding import wait_pending
from recording import Setup, decided

H = b"Host: api.example.test\r\n"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    s = Setup(tmp_path_factory.mktemp("attack"))
    yield s
    s.stop()


def exchange(s: Setup, raw: bytes, wait: float = 1.5) -> tuple[bytes, bytes, list[dict]]:
    """(the proxy's answer, the bytes the origin received, request.decided events)."""
    mark, before = s.proxy.mark(), len(s.origin.all_bytes())
    answer = s.send(raw, wait=wait)
    time.sleep(0.3)
    return answer, s.origin.all_bytes()[before:], [e for e in decided(s, mark) if e.get("method")]


def test_an_allowed_path_reaches_the_origin_as_sent(setup: Setup) -> None:
    answer, origin, events = exchange(setup, b"GET /public/y HTTP/1.1\r\n" + H + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 200") and origin.startswith(b"GET /public/y ")
    assert events[-1]["reason"] == "request_rule"
    refused, origin, _ = exchange(setup, b"GET /admin/y HTTP/1.1\r\n" + H + b"\r\n")
    assert refused.startswith(b"HTTP/1.1 403") and origin == b""


@pytest.mark.parametrize("target", [
    b"/admin/x/../../public/y",        # an origin that does not resolve dot segments
    b"/admin/..%2F..%2Fpublic/y",      # one that keeps %2F inside a segment
    b"/admin/%2e%2e/public/y",         # one that resolves only literal dots
    b"/public/%u002e%u002e/admin",     # IIS %u escapes
    b"/public/x#/../../admin",         # a fragment sent on the wire
    b"/public/./y",
])
def test_targets_an_origin_could_resolve_elsewhere_are_refused(setup: Setup,
                                                                target: bytes) -> None:
    answer, origin, events = exchange(setup, b"GET " + target + b" HTTP/1.1\r\n" + H + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 403"), answer
    assert origin == b""
    assert events[-1]["decision"] == "deny" and events[-1]["reason"] == "invalid_request"


@pytest.mark.parametrize("target", [b"/public/secret;x/key", b"/public/secret;/key",
                                    b"/public/secret;jsessionid=1", b"/public/secret/",
                                    b"/public/SECRET/key", b"/public/secre%74/key"])
def test_deny_rules_cover_parameters_trailing_slash_case_and_escapes(setup: Setup,
                                                                     target: bytes) -> None:
    """deny /public/secret and /public/secret/**: Tomcat, Jetty and Spring drop ';'
    parameters, most routers serve a trailing '/' alike."""
    answer, origin, events = exchange(setup, b"GET " + target + b" HTTP/1.1\r\n" + H + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 403") and origin == b""
    assert events[-1]["reason"] == "request_denied"


@pytest.mark.parametrize(("content_type", "body"), [
    (b"application/x-www-form-urlencoded", b"a=1&_method=DELETE"),
    (b"application/x-www-form-urlencoded", b"%5Fmethod=delete"),
    (b"multipart/form-data; boundary=XX",
     b'--XX\r\nContent-Disposition: form-data; name="_method"\r\n\r\nDELETE\r\n--XX--\r\n'),
])
def test_a_form_method_override_in_the_body_is_decided(setup: Setup, content_type: bytes,
                                                       body: bytes) -> None:
    """POST /post/** is allowed, DELETE is not: Rails, Laravel and Symfony read _method from
    the form body."""
    answer, origin, events = exchange(setup, b"POST /post/x HTTP/1.1\r\n" + H +
                                      b"Content-Type: " + content_type + b"\r\n" +
                                      b"Content-Length: %d\r\n\r\n" % len(body) + body)
    assert answer.startswith(b"HTTP/1.1 403"), answer
    assert b"_method form field asks for it" in answer
    assert origin == b""
    assert events[-1]["decision"] == "deny"
    fine, origin, _ = exchange(setup, b"POST /post/x HTTP/1.1\r\n" + H +
                               b"Content-Type: application/x-www-form-urlencoded\r\n"
                               b"Content-Length: 7\r\n\r\nname=ok")
    assert fine.startswith(b"HTTP/1.1 200") and origin.endswith(b"name=ok")


def test_a_large_streamed_form_with_a_method_override_is_cut(setup: Setup) -> None:
    """(The recording origin answers a request head at once: what matters is that the body's
    rest never reaches it.)"""
    body = b"a=" + b"x" * (2 << 20) + b"&_method=DELETE"
    _, origin, events = exchange(setup, b"POST /post/x HTTP/1.1\r\n" + H +
                                 b"Content-Type: application/x-www-form-urlencoded\r\n" +
                                 b"Content-Length: %d\r\n\r\n" % len(body) + body, wait=4)
    assert b"_method" not in origin
    assert any(e.get("reason") == "invalid_request" and "_method" in e.get("detail", "")
               for e in events)


@pytest.mark.parametrize("query", [b"_method=DELETE", b"%5Fmethod=DELETE", b"_method=delete"])
def test_a_method_override_in_the_query_is_decided(setup: Setup, query: bytes) -> None:
    answer, origin, _ = exchange(setup, b"POST /post/x?" + query + b" HTTP/1.1\r\n" + H +
                                 b"Content-Length: 0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 403") and origin == b""


@pytest.mark.parametrize("value", [b"DELETE, x", b"delete", b" DELETE ,GET"])
def test_a_method_override_header_list_is_decided_value_by_value(setup: Setup,
                                                                 value: bytes) -> None:
    """/any/** allows every method but DELETE; Express takes the first value of a list."""
    answer, origin, _ = exchange(setup, b"POST /any/x HTTP/1.1\r\n" + H +
                                 b"X-HTTP-Method-Override: " + value + b"\r\n"
                                 b"Content-Length: 0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 403") and origin == b""


def test_an_ask_rule_does_not_hold_a_request_whose_override_is_refused(setup: Setup) -> None:
    """POST /ask/** asks; DELETE /ask/x is refused: a POST standing for that DELETE is refused
    at once, never put before a person as a POST."""
    answer, origin, events = exchange(setup, b"POST /ask/x HTTP/1.1\r\n" + H +
                                      b"X-HTTP-Method-Override: DELETE\r\n"
                                      b"Content-Length: 0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 403") and origin == b""
    assert events[-1]["reason"] == "method_not_allowed"
    assert "X-HTTP-Method-Override".lower() in answer.decode().lower()


def test_an_ask_rule_still_holds_a_plain_request(setup: Setup) -> None:
    result: dict[str, bytes] = {}
    before = len(setup.origin.all_bytes())
    client = threading.Thread(target=lambda: result.update(answer=setup.send(
        b"POST /ask/y HTTP/1.1\r\n" + H + b"Content-Length: 0\r\n\r\n", wait=8)))
    client.start()
    pending = wait_pending(setup.proxy, lambda p: p["path"] == "/ask/y")
    assert pending["method"] == "POST"
    assert setup.proxy.cli("approve", pending["id"]).returncode == 0
    client.join()
    assert result["answer"].startswith(b"HTTP/1.1 200")
    assert setup.origin.all_bytes()[before:].startswith(b"POST /ask/y ")


def test_events_keep_no_fragment_or_path_parameter_values(setup: Setup) -> None:
    mark = setup.proxy.mark()
    exchange(setup, b"GET /public/x;jsessionid=S3CRET HTTP/1.1\r\n" + H + b"\r\n")
    exchange(setup, b"GET /public/x#tok=S3CRET2 HTTP/1.1\r\n" + H + b"\r\n")
    events = setup.proxy.events()[mark:]
    assert any(e.get("path") == "/public/x;" for e in events)
    assert "S3CRET" not in str(events)


def h2_exchange(s: Setup, headers: list[tuple[str, str]]) -> list[object]:
    tls = s.tunnel(alpn=("h2",))
    assert tls.selected_alpn_protocol() == "h2"
    conn = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False))
    conn.initiate_connection()
    conn.send_headers(1, headers, end_stream=True)
    tls.sendall(conn.data_to_send())
    tls.settimeout(3)
    seen: list[object] = []
    with contextlib.suppress(OSError):
        while data := tls.recv(65536):
            for event in conn.receive_data(data):
                seen.append(event)
                if isinstance(event, h2.events.StreamEnded):
                    return seen
            tls.sendall(conn.data_to_send())
    return seen


@pytest.mark.parametrize("headers", [
    [(":method", "DELETE /any/y?"), (":path", "/any/x")],
    [(":method", "GET"), (":path", "/public/x /admin")],
    [(":method", "GET\t"), (":path", "/public/x")],
])
def test_http2_request_lines_no_origin_could_read_one_way_are_refused(
        setup: Setup, headers: list[tuple[str, str]]) -> None:
    """HTTP/2 carries the method and target as free text; mitmproxy writes them into an
    HTTP/1.1 request line upstream, where a space would start another field."""
    mark, before = setup.proxy.mark(), len(setup.origin.all_bytes())
    seen = h2_exchange(setup, [headers[0], (":scheme", "https"),
                               (":authority", "api.example.test"), headers[1]])
    time.sleep(0.3)
    assert setup.origin.all_bytes()[before:] == b""
    statuses = [dict(e.headers).get(b":status") for e in seen
                if isinstance(e, h2.events.ResponseReceived)]
    terminated = any(isinstance(e, h2.events.ConnectionTerminated) for e in seen)
    assert statuses == [b"400"] or (terminated and not statuses), seen
    if statuses:  # refused by the proxy, on the record (h2 itself resets a tab in a method)
        assert any(e.get("reason") == "invalid_request" for e in decided(setup, mark))
