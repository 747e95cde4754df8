"""`agent-egress watch`: answer held requests one key at a time as they arrive.

A request the model reviewer is still looking at is not asked about yet (it may never need a
person); once the reviewer escalates it, it joins the queue with the reviewer's rationale.
When auto-denials pause auto-review for an agent, watch says so and `r` resumes it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import sys
import termios
import tty
from collections.abc import Iterator
from typing import Any

from .approval_client import ApprovalClient
from .approver import approval_client, where
from .textsafe import printable
from .watch_screen import WatchScreen, describe, paused_lines

KEYS = {
    "o": ("allow", "once"),
    "s": ("allow", "session"),
    "a": ("allow", "always"),
    "d": ("deny", "once"),
}


def _reviewing(item: dict[str, Any]) -> bool:
    return (item.get("review") or {}).get("state") == "reviewing"


@contextlib.contextmanager
def _cbreak(fd: int) -> Iterator[None]:
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def cmd_watch(args: argparse.Namespace) -> int:
    with approval_client(args, timeout=None) as client:
        reply = client.request("subscribe")
        queue: list[dict[str, Any]] = reply["pending"]
        paused = reply.get("auto_review_paused") or []
        if not sys.stdin.isatty():
            for item in queue:
                print(describe(item))
            if not queue:
                print("no requests are waiting for approval")
            for line in paused_lines(paused):
                print(line)
            print("agent-egress watch: standard input is not a terminal, so there is nobody to "
                  "ask; use 'agent-egress approve ID' or 'agent-egress deny ID' from scripts",
                  file=sys.stderr)
            return 0
        print(f"watching {printable(where(client))} (Ctrl-C or q to stop)", flush=True)
        with _cbreak(sys.stdin.fileno()):
            return _Watch(client, queue, paused).loop()


class _Watch:
    def __init__(self, client: ApprovalClient, queue: list[dict[str, Any]],
                 paused: list[dict[str, Any]]) -> None:
        self.client = client
        self.screen = WatchScreen(sys.stdout)
        self.queue = [item for item in queue if not _reviewing(item)]
        self.reviewing = {item["id"]: item for item in queue if _reviewing(item)}
        self.current: dict[str, Any] | None = None
        self.paused = paused
        for line in paused_lines(paused):
            self.screen.note(f"{line} (or press r)")

    def loop(self) -> int:
        while True:
            if self.current is None and self.queue:
                self.current = self.queue.pop(0)
                self.screen.ask(describe(self.current))
            self.screen.status(self.queue)
            readable, _, _ = select.select([self.client, sys.stdin], [], [],
                                           self.screen.due_in())
            if self.client in readable:
                for message in self.client.read_available():
                    self.received(message)
            if sys.stdin in readable:
                key = os.read(sys.stdin.fileno(), 1).decode(errors="replace")
                if key in ("q", "\x04", ""):
                    print()
                    return 0
                self.pressed(key)

    def received(self, message: dict[str, Any]) -> None:
        event, screen = message.get("event"), self.screen
        item = message.get("pending", {})
        current = self.current
        if event == "pending.opened":
            if _reviewing(item):
                self.reviewing[item["id"]] = item
            else:
                self.queue.append(item)
                screen.queue_changed()
        elif event == "pending.closed":
            self.reviewing.pop(item["id"], None)
            self.queue[:] = [q for q in self.queue if q["id"] != item["id"]]
            screen.queue_changed()
            if current is not None and current["id"] == item["id"]:
                screen.closed(f"  -> {printable(message.get('outcome'))}")
                self.current = None
        elif event == "pending.updated":
            if item.get("id") in self.reviewing and not _reviewing(item):
                del self.reviewing[item["id"]]
                self.queue.append(item)  # the reviewer escalated it to a person
                screen.queue_changed()
            elif current and current["id"] == item["id"]:
                if item["clients_gone"] and not current["clients_gone"]:
                    screen.note("  (the waiting client has gone; a session or always "
                                "decision still applies to its retry)")
                self.current = item
        elif event == "auto_review.paused":
            self.paused.append(message)
            for line in paused_lines([message]):
                screen.note(f"{line} (or press r)")
        elif event is None and "released" in message:
            screen.note(f"  released {printable(message['released'])}")
        elif event is None and "resumed" in message:
            for pause in message["resumed"]:
                screen.note(f"  resumed auto-review for {printable(pause.get('owner'))}")

    def pressed(self, key: str) -> None:
        if key == "r" and self.paused:
            agents = {a for pause in self.paused for a in pause.get("agents") or ()}
            for agent in sorted(agents) or ["*"]:
                self.client.send({"op": "resume_auto", "agent": agent})
            self.paused = []
            return
        if self.current is None:
            return
        if key == "k":
            self.screen.answer("skipped")
            self.current = None
        elif key in KEYS:
            decision, scope = KEYS[key]
            self.screen.answer(f"{decision} {scope}")
            self.client.send({"op": "decide", "target": self.current["id"],
                              "decision": decision, "scope": scope})
