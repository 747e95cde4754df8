"""`agent-egress report` on audit logs full of agent-chosen hostile text: shown, never obeyed."""

from __future__ import annotations

import csv
import html
import json
import re
import tomllib
from pathlib import Path

import pytest
from reporting import decided, report, write_log

TOML_BREAKOUT = 'evil"\n[network]\nallow = ["*"]'
# Shown to people only as escapes: terminal control, overwrite, reordering, invisibility.
RAW_CONTROLS = ["\x1b", "\x9b", "\x07", "\x00", "\x7f", "\r", "\u202e", "\u2066", "\u200f",
                "\u2028"]


def _agents_events(host: str, agents: list[str], reason: str = "not_allowlisted",
                   **fields) -> list[dict]:
    """Audit-mode refusals: each host is an allow candidate, were it a valid pattern."""
    return [{**decided(f"2026-11-22T08:0{i}:00Z", host, "deny", reason, agent=agent, **fields),
             "mode": "audit", "enforced": False} for i, agent in enumerate(agents)]


@pytest.fixture
def hostile_log(tmp_path: Path) -> Path:
    hostile_agents = ["a\n[x]\nk = 1", 'b\\"q', "\x1b[31mred", "\u202eevil", "=cmd|' /C calc'!A0"]
    events = [
        # Every kind of hostile host, each blocked often enough by enough agents to be
        # suggested if it were a valid pattern.
        *_agents_events(TOML_BREAKOUT, ["a1", "a2", "a3"]),
        *_agents_events("*", ["a1", "a2", "a3"]),
        *_agents_events("clear\x1b[2J\x1b[H.test", ["a1", "a2", "a3"], path="/\x9b2J\x00\x7f"),
        *_agents_events("good.test\rbad.test", ["a1", "a2", "a3"]),
        *_agents_events("a.x\u202e.test", ["a1", "a2"]),
        *_agents_events("b.x\u202e.test", ["a3"]),
        *_agents_events("back\\slash\"quote.test", ["a1", "a2", "a3"]),
        *_agents_events("<script>alert(1)</script>", ["</style><script>x()</script>", "a2",
                                                     "a3"], path='/"onload=alert(1)'),
        *_agents_events("=HYPERLINK(\"http://x.test\")", ["+a", "-b", "@c"], path="/\u2066x"),
        *_agents_events("tab\there\u200f\u2028.test", ["a1", "a2", "a3"]),
        # A valid candidate whose evidence (agent names) is hostile.
        *_agents_events("api.tools.test", hostile_agents),
        # Deny candidates: one valid, one that must be skipped.
        decided("2026-11-22T09:00:00Z", "ask.example.com", "deny", "denied_by_approver",
                agent="a1"),
        decided("2026-11-22T09:01:00Z", 'sni"\n[network]\ndeny = []\n#', "deny", "sni_mismatch",
                agent="\x1b[2J"),
    ]
    return write_log(tmp_path / "audit.jsonl", events)


def _assert_no_raw_controls(text: str) -> None:
    shown = [c for c in RAW_CONTROLS if c in text]
    assert shown == [], f"raw control characters in the output: {shown!r}"


def test_suggest_is_toml_written_by_a_library_and_says_only_what_it_suggests(hostile_log):
    result = report(str(hostile_log), "--suggest")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    network = tomllib.loads(text)["network"]  # parses: nothing broke out of a string
    assert network == {"allow": ["api.tools.test"], "deny": ["ask.example.com"]}
    _assert_no_raw_controls(text)
    for line in text.splitlines():
        # No agent-chosen text starts a line: every line is a comment, a table header, a key,
        # a quoted suggestion, or the closing bracket.
        assert re.match(r'(#|\[network\]$|allow = \[|deny = \[|    "|    #|\]$|$)', line), line
    # The evidence (agent names), escaped:
    assert "(\\x1b[31mred, =cmd|' /C calc'!A0, a\\x0a[x]\\x0ak = 1 and 2 more)" in text
    skipped = "\n".join(line for line in text.splitlines() if "skipped" in line)
    assert "evil\"\\x0a[network]\\x0aallow = [\"*\"]" in skipped
    assert "a.x\\u202e.test" in skipped and "b.x\\u202e.test" in skipped


def test_table_and_markdown_show_controls_escaped(hostile_log):
    table = report(str(hostile_log), "--decision", "all")
    assert table.returncode == 0, table.stderr
    _assert_no_raw_controls(table.stdout)
    assert "clear\\x1b[2J\\x1b[H.test" in table.stdout
    assert "good.test\\x0dbad.test" in table.stdout
    # One line per host (and the headline, header, rule): no agent text starts a line.
    assert len(table.stdout.splitlines()) == 4 + 13
    markdown = report(str(hostile_log), "--decision", "all", "--format", "markdown").stdout
    _assert_no_raw_controls(markdown)
    assert len(markdown.splitlines()) == 6 + 13
    assert "<script>" not in markdown and "</style>" not in markdown
    assert "\\<script\\>" in markdown
    assert "/\\\\x9b2J\\\\x00\\\\x7f" in markdown  # markdown keeps printable()'s backslashes


def test_csv_cells_never_start_a_formula(hostile_log, tmp_path):
    out = tmp_path / "report.csv"
    assert report(str(hostile_log), "--format", "csv", "-o", str(out)).returncode == 0
    with out.open(newline="") as stream:  # carriage returns inside cells stay data
        rows = list(csv.reader(stream))
    assert len(rows) == 1 + 13
    for row in rows[1:]:
        for cell in row:
            assert not cell.startswith(("=", "+", "-", "@", "\t", "\r")), row
    formula = next(row for row in rows if "HYPERLINK" in row[2])
    assert formula[2] == "'=HYPERLINK(\"http://x.test\")"
    assert formula[4] == "'+a,-b,@c"
    # The data is otherwise exact: a spreadsheet shows what the agent sent.
    assert any(row[2] == TOML_BREAKOUT for row in rows)
    assert any(row[2] == "good.test\rbad.test" for row in rows)


def test_html_escapes_every_value_and_forbids_scripts(hostile_log, tmp_path):
    out = tmp_path / "report.html"
    result = report(str(hostile_log), "--decision", "all", "--format", "html", "-o", str(out))
    assert result.returncode == 0, result.stderr
    page = out.read_text()
    assert ('<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
            'style-src \'unsafe-inline\'">') in page
    assert "<script" not in page
    assert page.count("</style>") == 1  # only the page's own
    assert "onload=" not in page.replace("&quot;onload=", "")  # only inside escaped text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;/style&gt;&lt;script&gt;x()&lt;/script&gt;" in page
    _assert_no_raw_controls(page)
    assert "clear\\x1b[2J\\x1b[H.test" in page


def test_json_keeps_the_exact_data(hostile_log):
    data = json.loads(report(str(hostile_log), "--format", "json").stdout)
    hosts = {h["host"] for h in data["hosts"]}
    assert TOML_BREAKOUT in hosts and "good.test\rbad.test" in hosts
    assert "<script>alert(1)</script>" in hosts
    assert html.escape("<") not in json.dumps(data)
