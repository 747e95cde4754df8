"""The watch screen's status line: a summary that fits one row, at most once per interval."""

from __future__ import annotations

import io

import pytest
from agent_egress.proxy.watch_screen import PROMPT, WatchScreen, fit, summary


def queue(*hosts: str) -> list[dict]:
    return [{"id": str(i), "host": host, "port": 443} for i, host in enumerate(hosts)]


@pytest.mark.parametrize(("hosts", "columns", "shown"), [
    ((), 80, "(nothing else waiting)"),
    (("a.test",), 80, "(1 more waiting: a.test)"),
    (("a.test", "evil.test", "evil.test", "b.test", "evil.test", "a.test"), 80,
     "(6 more waiting: evil.test x3, a.test x2, b.test)"),
    (tuple(f"h{i}.flood.test" for i in range(60)), 60,
     "(60 more waiting: h0.flood.test, h1.flood.test, ...)"),
    (("xn--80ak6aa92e.com",), 80, "(1 more waiting: xn--80ak6aa92e.com (аррӏе.com))"),
    (("evil\x1b[2J.test", "\u202eb.test"), 80,
     "(2 more waiting: evil\\x1b[2J.test, \\u202eb.test)"),
])
def test_summary(hosts: tuple[str, ...], columns: int, shown: str) -> None:
    assert summary(queue(*hosts), columns) == shown


@pytest.mark.parametrize(("text", "columns", "shown"), [
    ("short", 10, "short"),
    ("exactly10!", 10, "exactly10!"),
    ("a bit too long", 10, "a bit t..."),
    ("日本語日本語", 8, "日本..."),  # wide characters take two cells
])
def test_fit(text: str, columns: int, shown: str) -> None:
    assert fit(text, columns) == shown


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_status_is_written_at_most_once_per_interval_when_piped() -> None:
    stream, clock = io.StringIO(), Clock()
    screen = WatchScreen(stream, interval=1.0, clock=clock)
    screen.ask("3f9c01ab  ask.test:443  CONNECT")
    waiting: list[dict] = []
    for index in range(2000):
        waiting.append(queue(f"h{index % 3}.test")[0])
        screen.queue_changed()
        screen.status(waiting)
        clock.now += 0.001  # 2,000 requests in two seconds
    assert stream.getvalue().count("more waiting") == 2
    clock.now += 1
    screen.status(waiting)
    assert stream.getvalue().endswith("(2000 more waiting: h0.test x667, h1.test x667, "
                                      f"h2.test x666)\n{PROMPT}")
    assert screen.due_in() is None  # nothing new: select may sleep


def test_no_status_without_a_question_on_screen() -> None:
    stream, clock = io.StringIO(), Clock()
    screen = WatchScreen(stream, interval=1.0, clock=clock)
    screen.ask("question")
    screen.answer("allow once")
    screen.queue_changed()
    assert screen.due_in() is None
    screen.status(queue("a.test"))
    assert "more waiting" not in stream.getvalue()
    screen.closed("  -> allow")
    screen.ask("next")
    screen.status(queue("a.test"))
    assert stream.getvalue().endswith(f"next\n{PROMPT}\n  (1 more waiting: a.test)\n{PROMPT}")
