"""What `agent-egress watch` writes: the question, the prompt, and one status line for the rest.

An agent can hold thousands of requests at once. A line per new request would scroll the
question away while a person is reading it, so what else waits is summarised on one status line
above the prompt, redrawn in place on a terminal and written at most once a second.
"""

from __future__ import annotations

import shutil
import sys
import time
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from .textsafe import host_display, printable, shortened

PROMPT = "allow [o]nce, for the [s]ession, [a]lways; [d]eny; s[k]ip; [q]uit? "
STATUS_INTERVAL = 1.0  # seconds between status lines
_CLEAR_LINE = "\r\x1b[2K"
_UP = "\x1b[1A"


def _width(char: str) -> int:
    if unicodedata.combining(char):
        return 0
    return 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1


def fit(text: str, columns: int) -> str:
    """The text cut to fit in `columns` terminal cells (a wrapped line could not be redrawn)."""
    widths = [_width(char) for char in text]
    if sum(widths) <= columns:
        return text
    room, used = columns - 3, 0
    for index, width in enumerate(widths):
        if used + width > room:
            return text[:index] + "..."
        used += width
    return text


def summary(queue: Sequence[dict[str, Any]], columns: int) -> str:
    """`(37 more waiting: evil.test x20, a.test x10, ...)`, most waiting hosts first."""
    if not queue:
        return "(nothing else waiting)"
    counts = Counter(host_display(str(item.get("host"))) for item in queue)
    head = f"({len(queue)} more waiting: "
    shown: list[str] = []
    for host, count in counts.most_common():
        part = host if count == 1 else f"{host} x{count}"
        if shown and len(head) + len(", ".join([*shown, part])) + len(", ...)") > columns:
            return head + ", ".join(shown) + ", ...)"
        shown.append(part)
    return head + ", ".join(shown) + ")"


class WatchScreen:
    """Writes everything `watch` shows, and knows what is on its last lines: the prompt (the
    cursor right after it) and maybe the status line above it, so both can be redrawn."""

    def __init__(self, stream: TextIO = sys.stdout, *, interval: float = STATUS_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream
        self.in_place = stream.isatty()
        self.interval = interval
        self.clock = clock
        self._prompt_shown = False
        self._status_above_prompt = False
        self._status_due = False  # the queue changed since the status line was written
        self._written_at = -interval

    def ask(self, question: str) -> None:
        """A new question and the prompt under it."""
        self._write(f"\n{question}\n{PROMPT}")
        self._prompt_shown, self._status_above_prompt = True, False
        self._status_due = True  # what else waits, under the new question

    def answer(self, text: str) -> None:
        """The person's answer, after the prompt."""
        self._write(f"{text}\n")
        self._prompt_shown = self._status_above_prompt = False

    def note(self, text: str) -> None:
        """A line of its own; a prompt on screen moves below it."""
        prompt = self._prompt_shown
        self._write(self._leave_prompt() + f"{text}\n" + (PROMPT if prompt else ""))
        self._prompt_shown, self._status_above_prompt = prompt, False

    def closed(self, text: str) -> None:
        """How the question on screen ended; its prompt goes."""
        self._write(self._leave_prompt() + f"{text}\n")
        self._prompt_shown = self._status_above_prompt = False

    def queue_changed(self) -> None:
        self._status_due = True

    def due_in(self) -> float | None:
        """Seconds until a status line is due (select's timeout); None while none is."""
        if not (self._status_due and self._prompt_shown):
            return None
        return max(self._written_at + self.interval - self.clock(), 0.0)

    def status(self, queue: Sequence[dict[str, Any]]) -> None:
        """The status line, if it is due: redrawn above the prompt, or appended when piped."""
        due = self.due_in()
        if due is None or due > 0:
            return
        self._status_due = False
        if not queue and not self._status_above_prompt:
            return  # nothing to say, nothing to take back
        self._written_at = self.clock()
        columns = shutil.get_terminal_size().columns - 1
        text = fit(summary(queue, columns), columns)
        if not self.in_place:
            self._write(f"\n  {text}\n{PROMPT}")
            return
        # The prompt line becomes the status line (or the status line above it is replaced),
        # and the prompt is written again below it.
        self._write(_CLEAR_LINE + (_UP + _CLEAR_LINE if self._status_above_prompt else "")
                    + f"{text}\n{PROMPT}")
        self._status_above_prompt = True

    def _leave_prompt(self) -> str:
        """What takes the cursor from the end of a prompt to the start of a fresh line."""
        if not self._prompt_shown:
            return ""
        return _CLEAR_LINE if self.in_place else "\n"

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()


def describe(pending: dict[str, Any]) -> str:
    """One line per pending approval. Host, path and agent are the agent's own text: escaped."""
    what = printable(str(pending["scheme"]).upper())
    if pending.get("method"):
        what += f" {shortened(pending['method'], 16)}"
        if pending.get("path"):
            what += f" {shortened(pending['path'])}"
    waiting = ("client gone" if pending["clients_gone"]
               else f"{pending['waiting']} waiting")
    agent = f" agent={printable(pending['agent'])}" if pending.get("agent") else ""
    return (f"{printable(pending['id'])}  {host_display(pending['host'], pending['port'])}  "
            f"{what}  from {printable(pending['client'])}{agent}  "
            f"({waiting}, {pending['expires_in']:.0f}s left){_review(pending.get('review'))}")


def _review(review: dict[str, Any] | None) -> str:
    """Auto-review's word beside a held request; the rationale may be a model's: escaped."""
    if not isinstance(review, dict):
        return ""
    state, why = review.get("state"), shortened(review.get("rationale") or "", 240)
    if state == "reviewing":
        return "  [auto-review: the model is reviewing it]"
    if state == "paused":
        return f"  [auto-review paused: {why}]"
    if not review.get("risk_level"):
        return f"  [auto-review: {why}]"
    return (f"  [auto-review: {printable(review.get('risk_level'))} risk "
            f"({printable(review.get('reviewer'))}): {why}]")


def paused_lines(paused: list[dict[str, Any]]) -> list[str]:
    lines = []
    for pause in paused:
        agents = pause.get("agents") or []
        resume = printable(agents[0]) if agents else "'*'"
        lines.append(f"auto-review paused for {printable(pause.get('owner'))} after "
                     f"{printable(pause.get('denials'))} auto-denials; resume: agent-egress "
                     f"approve --resume-auto {resume}")
    return lines
