"""A test run never writes to the real user's files: every process gets a HOME of its own.

The suite's own check (conftest.py) compares the real home before and after a run; this test
shows the check bites, by running real tests in a child pytest with a sentinel "real home".
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).parent


def test_a_run_leaves_the_real_home_untouched(tmp_path) -> None:
    sentinel = tmp_path / "real-home"
    (sentinel / ".local" / "state").mkdir(parents=True)
    before = sorted(p.relative_to(sentinel) for p in sentinel.rglob("*"))
    env = {**os.environ, "HOME": str(sentinel), "AGENT_EGRESS_TEST_REAL_HOME": str(sentinel)}
    for name in ("XDG_CONFIG_HOME", "XDG_STATE_HOME", "XDG_CACHE_HOME", "XDG_DATA_HOME",
                 "XDG_RUNTIME_DIR"):
        env.pop(name, None)  # what a developer's shell would have: defaults under HOME
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         str(TESTS / "test_launch.py"), str(TESTS / "test_cli.py"), "-k",
         "env or run_starts or check or explain"],
        cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert sorted(p.relative_to(sentinel) for p in sentinel.rglob("*")) == before


def test_this_process_runs_with_a_home_of_its_own() -> None:
    assert Path.home() != Path(os.environ.get("AGENT_EGRESS_TEST_REAL_HOME", "/root"))
    for name in ("HOME", "XDG_CONFIG_HOME", "XDG_STATE_HOME", "XDG_RUNTIME_DIR"):
        assert "agent-egress-test-home-" in os.environ[name]
