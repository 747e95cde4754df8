"""The HTML report's timeline and layout: buckets that fit the span, a page that fits 1200 px.

Layout is measured by real headless Chromium. The report forbids scripts (its CSP), so the
measuring page is a copy without the CSP and with a script that writes what Chromium laid out
into the DOM; `--dump-dom` reads it back. The report itself stays script-free.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from reporting import decided, report, write_log

needs_chromium = pytest.mark.skipif(
    shutil.which("chromium") is None and not os.environ.get("CI"),
    reason="Debian's chromium is not installed (.ci/run installs it)")

START = datetime(2026, 11, 20, 10, 0, tzinfo=UTC)


def stamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def spread(span: timedelta, count: int, host: str = "evil.test") -> list[dict]:
    """`count` refusals spread evenly over `span` from START."""
    step = span / max(count - 1, 1)
    return [decided(stamp(START + i * step), host, "deny", "not_allowlisted", agent="a1")
            for i in range(count)]


def html_report(tmp_path: Path, events: list, name: str = "report") -> str:
    log = write_log(tmp_path / f"{name}.jsonl", events)
    out = tmp_path / f"{name}.html"
    result = report(str(log), "--decision", "all", "--format", "html", "-o", str(out))
    assert result.returncode == 0, result.stderr
    return out.read_text()


def chart(page: str) -> tuple[str, int, list[str]]:
    """The chart's heading, its number of bars, and its axis labels (start, end)."""
    heading = re.search(r"<h2>([^<]*)</h2>\s*<svg", page)
    svg = page[page.index('<svg id="timeline"'):page.index("</svg>")]
    labels = re.findall(r'<text class="axis-label"[^>]*>([^<]*)</text>', svg)
    return heading.group(1) if heading else "", svg.count('<rect class="bar"'), labels


def test_an_hour_is_charted_by_the_minute(tmp_path) -> None:
    heading, bars, labels = chart(html_report(tmp_path, spread(timedelta(minutes=59), 30)))
    assert heading == "Requests per minute (UTC)"
    assert bars == 30
    assert labels == ["2026-11-20 10:00", "2026-11-20 11:00"]


def test_a_single_moment_still_has_distinct_ends(tmp_path) -> None:
    _, bars, labels = chart(html_report(tmp_path, spread(timedelta(0), 3)))
    assert bars == 1 and labels == ["2026-11-20 10:00", "2026-11-20 10:01"]


def test_days_are_charted_by_the_hour_and_months_by_the_day(tmp_path) -> None:
    heading, bars, labels = chart(html_report(tmp_path, spread(timedelta(days=3), 73), "days"))
    assert heading == "Requests per hour (UTC)" and bars == 73
    assert labels == ["2026-11-20 10:00", "2026-11-23 11:00"]
    heading, bars, labels = chart(html_report(tmp_path, spread(timedelta(days=90), 91),
                                              "months"))
    assert heading == "Requests per day (UTC)" and bars == 91
    assert labels == ["2026-11-20", "2027-02-19"]


def test_bars_stand_where_their_time_is(tmp_path) -> None:
    """Gaps stay gaps: two bursts an hour apart are not drawn side by side."""
    events = spread(timedelta(minutes=1), 2) + [
        decided(stamp(START + timedelta(minutes=59)), "evil.test", "deny", "not_allowlisted")]
    page = html_report(tmp_path, events)
    xs = [float(x) for x in re.findall(r'<rect class="bar" x="([0-9.]+)"', page)]
    assert len(xs) == 3
    assert xs[2] - xs[1] > 20 * (xs[1] - xs[0])


def test_a_log_too_long_for_minutes_is_kept_by_the_hour() -> None:
    """Memory stays bounded: past the minutes it keeps, the timeline folds into hours."""
    from agent_egress.proxy.report_timeline import Timeline

    timeline = Timeline(minutes_kept=3)
    for minute in ("10:00", "10:01", "10:02", "11:30", "11:31", "12:00"):
        timeline.add(f"2026-11-20T{minute}:00Z")
    assert timeline.hourly() == {"2026-11-20T10": 3, "2026-11-20T11": 2, "2026-11-20T12": 1}
    assert len(timeline.counts) == 3
    unit, start, buckets = timeline.buckets()
    assert unit == "hour" and start == START  # minutes are gone: never charted by the minute
    assert [n for _, n in buckets] == [3, 2, 1]


def long_log(tmp_path: Path) -> Path:
    """An hour of traffic with the longest cells a real log has: long hosts, paths, agent
    lists and approval histories."""
    events = []
    agents = [f"claude-code-runner-{n:02d}.build-farm.example" for n in range(6)]
    for index in range(12):
        host = f"telemetry-ingest-{index}.eu-west-1.observability.example-corp-internal.test"
        if index == 0:
            host = f"{'a' * 63}.{'b' * 63}.test"
        for minute in range(0, 60, 7):
            when = stamp(START + timedelta(minutes=minute, seconds=index))
            path = (f"/api/v4/projects/{index}/repository/files/src%2Fmain%2Fresources%2F"
                    f"application-{minute}.properties/raw")
            events.append(decided(when, host, "deny", "denied_by_approver",
                                  agent=agents[minute % 6], path=path))
        events += [{"time": stamp(START), "event": "approval.requested", "schema": 1,
                    "approval_id": f"id{index}", "host": host, "port": 443}]
        for decision, scope in (("allow", "session"), ("deny", "once"), ("deny", "always")):
            events.append({"time": stamp(START), "event": "approval.decided", "schema": 1,
                           "host": host, "port": 443, "decision": decision, "scope": scope,
                           "actor": "uid:1000", "released": 1})
        events.append({"time": stamp(START), "event": "approval.decided", "schema": 1,
                       "host": host, "port": 443, "decision": "deny", "scope": "timeout",
                       "actor": "timeout", "released": 1})
    return write_log(tmp_path / "long.jsonl", events)


MEASURE = """<script>
addEventListener("load", () => {
  const root = document.documentElement;
  const cells = [...document.querySelectorAll("th, td")];
  const result = {
    viewport: innerWidth,
    page: root.scrollWidth,
    columns: cells.filter(c => c.tagName === "TH").length,
    rightmost: Math.max(...cells.map(c => c.getBoundingClientRect().right)),
    overflowing: cells.filter(c => c.scrollWidth > c.clientWidth + 1).map(c => c.textContent),
    chart: document.getElementById("timeline").getBoundingClientRect().right,
  };
  const out = document.createElement("pre");
  out.id = "measured";
  out.textContent = JSON.stringify(result);
  document.body.append(out);
});
</script>"""


def chromium(tmp_path: Path, *args: str, width: int = 1200, height: int = 2000,
             text: bool = False) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--hide-scrollbars", "--run-all-compositor-stages-before-draw",
             f"--user-data-dir={tmp_path / 'profile'}", f"--window-size={width},{height}"]
    return subprocess.run(["chromium", *flags, *args], capture_output=True, text=text,
                          timeout=120, check=True)


@needs_chromium
def test_the_page_fits_1200_pixels_in_a_real_browser(tmp_path) -> None:
    out = tmp_path / "report.html"
    result = report(str(long_log(tmp_path)), "--format", "html", "-o", str(out))
    assert result.returncode == 0, result.stderr
    page = out.read_text()
    assert "<script" not in page and "Content-Security-Policy" in page

    shot = tmp_path / "shot.png"
    chromium(tmp_path, f"--screenshot={shot}", out.as_uri())
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 10_000
    assert int.from_bytes(data[16:20], "big") == 1200  # the PNG is the 1200 px viewport

    csp = re.search(r'<meta http-equiv="Content-Security-Policy"[^>]*>', page)
    assert csp is not None
    measuring = tmp_path / "measure.html"
    measuring.write_text(page.replace(csp.group(), "").replace("</body>", MEASURE + "</body>"))
    dom = chromium(tmp_path, "--virtual-time-budget=5000", "--dump-dom", measuring.as_uri(),
                   text=True).stdout
    found = re.search(r'<pre id="measured">([^<]*)</pre>', dom)
    assert found is not None, dom[-2000:]
    measured = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert measured["viewport"] == 1200
    assert measured["columns"] == 10
    assert measured["page"] <= 1200, measured  # no horizontal scrolling at all
    assert measured["rightmost"] <= 1200, measured  # every column, approvals included, shows
    assert measured["overflowing"] == [], measured  # no cell's text cut or spilling over
    assert measured["chart"] <= 1200


@needs_chromium
def test_the_one_hour_chart_renders_minute_bars(tmp_path) -> None:
    out = tmp_path / "report.html"
    report(str(long_log(tmp_path)), "--format", "html", "-o", str(out))
    dom = chromium(tmp_path, "--dump-dom", out.as_uri(), text=True).stdout
    bars = dom.count('class="bar"')
    assert bars >= 9  # one per minute with requests, not one full-width bar
    labels = re.findall(r'<text class="axis-label"[^>]*>([^<]*)</text>', dom)
    assert labels == ["2026-11-20 10:00", "2026-11-20 10:57"]
