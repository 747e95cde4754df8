"""Reading audit logs: files as given or whole directories (rotated ones too), gunzipped when
need be, line by line, with a progress bar on a terminal. Shared by every command that reads
them; what is made of the events is theirs."""

from __future__ import annotations

import gzip
import io
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO


def counted(number: int, noun: str, plural: str | None = None) -> str:
    """'1 request', '2 requests', '1,024 hosts': every count report prints reads as English."""
    return f"{number:,} {noun if number == 1 else plural or noun + 's'}"


def parse_when(text: str, now: datetime | None = None) -> datetime:
    """'24h', '7d', '30m' (ago), or an ISO date/time (UTC when no zone is given)."""
    now = now or datetime.now(UTC)
    units = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
    if text[:-1].isdigit() and text[-1:] in units:
        return now - timedelta(**{units[text[-1]]: int(text[:-1])})
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{text!r} is neither a duration like 24h/7d nor a date like "
                         "2026-11-24 or 2026-11-24T08:00") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def open_log(path: Path) -> tuple[IO[bytes], IO[str]]:
    """The raw file (its position drives the progress bar) and text lines, gunzipped if need be."""
    raw = path.open("rb")
    gzipped = raw.read(2) == b"\x1f\x8b"
    raw.seek(0)
    stream: IO[bytes] = gzip.GzipFile(fileobj=raw) if gzipped else raw  # type: ignore[assignment]
    return raw, io.TextIOWrapper(stream, encoding="utf-8", errors="replace")


class Progress:
    """A one-line progress indicator on a terminal's stderr; silent when piped."""

    def __init__(self, total_bytes: int, stream: IO[str] = sys.stderr) -> None:
        self.total = max(total_bytes, 1)
        self.stream = stream
        self.enabled = stream.isatty()
        self._shown = 0.0

    def update(self, done_bytes: int, events: int) -> None:
        now = time.monotonic()
        if not self.enabled or now - self._shown < 0.2:
            return
        self._shown = now
        share = min(done_bytes / self.total, 1.0)
        bar = "#" * int(share * 30)
        self.stream.write(f"\rreading audit logs [{bar:<30}] {share:6.1%} "
                          f"{counted(events, 'event')}")
        self.stream.flush()

    def finish(self) -> None:
        if self.enabled:
            self.stream.write("\r" + " " * 78 + "\r")
            self.stream.flush()


def expand_logs(paths: Iterable[str]) -> Iterator[Path]:
    """Files as given; a directory stands for its audit logs, rotated ones included."""
    for text in paths:
        path = Path(text)
        if path.is_dir():
            yield from sorted(p for p in path.iterdir() if p.is_file() and ".jsonl" in p.name)
        else:
            yield path


def chosen_logs(logs: list[str], default: Path) -> list[Path]:
    """The logs a command reads (the default one when none is named); ValueError names
    the ones that do not exist."""
    paths = list(expand_logs(logs or [str(default)]))
    missing = [str(p) for p in paths if not p.is_file()]
    if missing or not paths:
        raise ValueError(f"no such audit log: {', '.join(missing) or logs}")
    return paths


def read_lines(paths: Iterable[Path], line: Callable[[str, int, str], None],
               progress: Progress | None = None,
               events: Callable[[], int] = lambda: 0) -> None:
    """Call ``line(source, number, text)`` for every line of every log, in order."""
    done = 0
    for path in paths:
        raw, lines = open_log(path)
        with raw, lines:
            for number, text in enumerate(lines, start=1):
                line(str(path), number, text)
                if progress is not None and number % 20000 == 0:
                    progress.update(done + raw.tell(), events())
        done += path.stat().st_size
    if progress is not None:
        progress.finish()
