"""textsafe: agent-chosen text shown to people is escaped visibly, never interpreted."""

from __future__ import annotations

import pytest
from agent_egress.proxy.textsafe import csv_cell, host_display, printable, printable_lines


@pytest.mark.parametrize(("text", "shown"), [
    ("evil.test", "evil.test"),
    ("", ""),
    ("Zürich/日本語/аррӏе", "Zürich/日本語/аррӏе"),  # letters of any script stay
    ("a b~!", "a b~!"),
    ("\x1b[2J", "\\x1b[2J"),  # clear screen
    ("\x1b]0;pwned\x07", "\\x1b]0;pwned\\x07"),  # set the window title
    ("good.test\rbad.test", "good.test\\x0dbad.test"),  # carriage return overwrite
    ("a\nb", "a\\x0ab"),
    ("a\tb", "a\\x09b"),
    ("nul\x00", "nul\\x00"),
    ("del\x7f", "del\\x7f"),
    ("csi\x9b2J", "csi\\x9b2J"),  # C1 control sequence introducer
    ("\x85next line", "\\x85next line"),
    ("evil\u202etxt.exe", "evil\\u202etxt.exe"),  # right-to-left override
    ("\u2066\u2067\u2068\u2069\u202a\u202b\u202c\u202d", "\\u2066\\u2067\\u2068\\u2069"
     "\\u202a\\u202b\\u202c\\u202d"),
    ("\u200e\u200f\u061c", "\\u200e\\u200f\\u061c"),  # directional marks
    ("zero\u200bwidth\ufeff", "zero\\u200bwidth\\ufeff"),  # invisible format characters
    ("soft\u00adhyphen", "soft\\xadhyphen"),
    ("line\u2028para\u2029", "line\\u2028para\\u2029"),
    ("tag\U000e0041", "tag\\U000e0041"),  # invisible tag characters
    ("surrogate\udcff", "surrogate\\udcff"),  # what surrogateescape leaves; unprintable
    ("back\\slash", "back\\\\slash"),
    ("\\x1b", "\\\\x1b"),  # a literal backslash-x never looks like an escaped ESC
    (42, "42"),
    (None, "None"),
])
def test_printable(text: object, shown: str) -> None:
    assert printable(text) == shown


def test_printable_output_has_no_controls_left() -> None:
    import unicodedata

    every = "".join(chr(c) for c in range(0x3000)) + "\U000e0001\U000e007f"
    out = printable(every)
    assert not [c for c in out
                if unicodedata.category(c) in ("Cc", "Cf", "Cs", "Zl", "Zp")]


def test_printable_lines_keeps_line_breaks_only() -> None:
    assert printable_lines("a\x1b\n  b\rc\u2028") == "a\\x1b\n  b\\x0dc\\u2028"
    assert printable_lines(ValueError("x\ny")) == "x\ny"


@pytest.mark.parametrize(("host", "shown"), [
    ("xn--80ak6aa92e.com", "xn--80ak6aa92e.com (аррӏе.com)"),
    ("www.xn--mnchen-3ya.de", "www.xn--mnchen-3ya.de (www.münchen.de)"),
    ("XN--80AK6AA92E.com", "XN--80AK6AA92E.com (аррӏе.com)"),
    ("xn--zz-zzzzzzz.test", "xn--zz-zzzzzzz.test"),  # does not decode: punycode only
    ("xn--.test", "xn--.test"),
    ("apple.com", "apple.com"),
    ("203.0.113.7", "203.0.113.7"),
    ("2001:db8::1", "2001:db8::1"),
    ("evil\x1b[2J.test", "evil\\x1b[2J.test"),
    ("xn--80ak6aa92e.com\u202e", "xn--80ak6aa92e.com\\u202e (аррӏе.com\\u202e)"),
])
def test_host_display(host: str, shown: str) -> None:
    assert host_display(host) == shown


def test_host_display_with_a_port() -> None:
    assert host_display("xn--80ak6aa92e.com", 443) == "xn--80ak6aa92e.com:443 (аррӏе.com)"
    assert host_display("evil.test", 8443) == "evil.test:8443"
    assert host_display("a\x1b.test", "1\r") == "a\\x1b.test:1\\x0d"


@pytest.mark.parametrize(("value", "cell"), [
    ("=HYPERLINK(\"http://evil.test\")", "'=HYPERLINK(\"http://evil.test\")"),
    ("+1+1", "'+1+1"),
    ("-2+3", "'-2+3"),
    ("@SUM(A1)", "'@SUM(A1)"),
    ("\t=1", "'\t=1"),
    ("\r=1", "'\r=1"),
    ("evil.test", "evil.test"),
    ("a=b", "a=b"),
    ("", ""),
    (3, "3"),
])
def test_csv_cell(value: object, cell: str) -> None:
    assert csv_cell(value) == cell
