"""Audit logs with known stories, for triage tests and its benchmark. Each story returns its
events (dicts as the proxy writes them); `write` puts them on disk in time order and says on
which line each landed."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import idna

START = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)


class Story:
    def __init__(self, agent: str, start: datetime = START) -> None:
        self.agent = agent
        self.now = start
        self.events: list[dict] = []
        self.marked: dict[str, dict] = {}  # name -> the event, to find its line later

    def at(self, seconds: float) -> Story:
        self.now += timedelta(seconds=seconds)
        return self

    def event(self, name: str, mark: str | None = None, **fields: object) -> dict:
        event = {"time": self.now.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), "event": name,
                 "schema": 1, "client": "127.0.0.1:40000", "agent": self.agent, **fields}
        self.events.append(event)
        if mark:
            self.marked[mark] = event
        self.now += timedelta(milliseconds=50)
        return event

    def decided(self, host: str, decision: str, reason: str, port: int = 443,
                mark: str | None = None, **fields: object) -> dict:
        return self.event("request.decided", mark, scheme="connect", host=host, port=port,
                          decision=decision, reason=reason, **fields)

    def tunnel(self, host: str, up: int, down: int = 4096, port: int = 443,
               mark: str | None = None) -> dict:
        return self.event("tunnel.closed", mark, host=host, port=port, protocol="tls",
                          bytes_up=up, bytes_down=down, duration_ms=120.0)

    def fetch(self, host: str, up: int = 900, down: int = 50_000) -> None:
        self.decided(host, "allow", "allowlist", rule=host)
        self.tunnel(host, up, down)


def clean_install() -> Story:
    story = Story("pip-clean")
    for _ in range(3):
        story.fetch("pypi.org")
        story.fetch("files.pythonhosted.org", down=2_000_000)
    story.decided("mirror.example.org", "held", "needs_approval")
    story.at(20).event("approval.decided", host="mirror.example.org", port=443,
                       decision="allow", scope="once", actor="uid:1000", released=1)
    story.decided("mirror.example.org", "allow", "approved", approval_actor="uid:1000",
                  approval_scope="once")
    story.tunnel("mirror.example.org", 800, 10_000)
    return story


def flaky_dns() -> Story:
    story = Story("dns-flaky")
    for _ in range(3):
        story.decided("pypi.org", "deny", "dns_error", detail="temporary failure in name "
                                                              "resolution").get("host")
        story.at(5)
    story.fetch("pypi.org")
    story.decided("cdn.example.net", "held", "needs_approval")
    story.at(120).decided("cdn.example.net", "deny", "approval_timeout")
    story.decided("docs.example.net", "deny", "not_allowlisted")
    return story


def three_spellings() -> Story:
    story = Story("spelly")
    story.fetch("pypi.org")
    story.decided("pastebin.com", "deny", "denylist", rule="pastebin.com", mark="plain")
    story.at(3).decided(idna.encode("pаstebin.com").decode(), "deny", "not_allowlisted",
                        mark="homograph")  # a Cyrillic а
    story.at(3).decided("pastebin.com", "deny", "port_not_allowed", port=8443, mark="port")
    story.at(3).decided("pastebin.com", "deny", "denylist", rule="pastebin.com")  # again
    return story


def misdirected_credential() -> Story:
    story = Story("cred-leak")
    story.fetch("api.github.com")
    story.event("request.decided", "leak", scheme="https", method="POST", path="/collect",
                host="collector.example.com", port=443, decision="deny",
                reason="credential_misdirected", credential="github", severity="high",
                detail="the placeholder of credential 'github' in header Authorization")
    return story


def upload_burst() -> Story:
    story = Story("uploader")
    for _ in range(40):
        story.fetch("pypi.org", up=2_000)
        story.at(10)
    story.decided("drop.example.org", "allow", "approved", approval_actor="uid:1000",
                  approval_scope="once")
    story.tunnel("drop.example.org", 50_000_000, 2_000, mark="upload")
    # Two hours later: a new session, as quiet as the first was.
    story.at(7200).fetch("pypi.org", up=2_000)
    return story


STORIES = {"clean_install": clean_install, "flaky_dns": flaky_dns,
           "three_spellings": three_spellings, "misdirected_credential": misdirected_credential,
           "upload_burst": upload_burst}


def write(path: Path, stories: list[Story]) -> dict[int, int]:
    """The stories' events interleaved in time order; id(event) -> its line number."""
    events = sorted((e for s in stories for e in s.events), key=lambda e: e["time"])
    lines = {}
    with path.open("w") as out:
        for number, event in enumerate(events, start=1):
            out.write(json.dumps(event) + "\n")
            lines[id(event)] = number
    return lines
