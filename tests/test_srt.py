"""Anthropic's sandbox-runtime (`srt`) with agent-egress as its network filter.

srt isolates the command (bubblewrap: files, processes, a network namespace) and, with
`httpProxyPort`/`socksProxyPort`, hands every connection it lets out to an external proxy: ours.
The real package (npm `@anthropic-ai/sandbox-runtime`, installed by .ci/run) runs a real curl;
srt's own domain list is left empty, so every decision is agent-egress's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import policy_text
from proxyproc import ProxyProcess

ROOT = Path(__file__).resolve().parents[1]
SRT = os.environ.get("AGENT_EGRESS_SRT") or shutil.which("srt") or str(
    ROOT / ".ci" / "npm" / "node_modules" / ".bin" / "srt")
pytestmark = pytest.mark.skipif(
    not (Path(SRT).exists() and shutil.which("bwrap") and shutil.which("socat")
         and shutil.which("rg")),
    reason="needs srt (npm @anthropic-ai/sandbox-runtime), bubblewrap, socat and ripgrep; "
           ".ci/run installs them")


@pytest.fixture(scope="module")
def egress(plain_origin, tmp_path_factory) -> Iterator[ProxyProcess]:
    process = ProxyProcess(tmp_path_factory.mktemp("srt-proxy"),
                           policy_text(plain_origin.port), "--socks-listen", "127.0.0.1:0")
    yield process
    process.stop()


def _srt(tmp_path: Path, egress: ProxyProcess, script: str) -> subprocess.CompletedProcess:
    settings = tmp_path / "srt-settings.json"
    settings.write_text(json.dumps({
        "network": {"allowedDomains": [], "deniedDomains": [],
                    "httpProxyPort": egress.port, "socksProxyPort": egress.socks_port},
        "filesystem": {"denyRead": [], "allowRead": [], "allowWrite": [str(tmp_path)],
                       "denyWrite": []},
    }))
    home = tmp_path / "home"
    home.mkdir()
    env = {key: value for key, value in os.environ.items()
           if key.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
           and not key.startswith("XDG_")}
    env.update(HOME=str(home), XDG_CACHE_HOME=str(tmp_path / "cache"),
               XDG_CONFIG_HOME=str(tmp_path / "config"))
    return subprocess.run([SRT, "--settings", str(settings), "sh", "-c", script], env=env,
                          capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          stdin=subprocess.DEVNULL)


def test_srt_sandboxed_command_is_decided_by_agent_egress(tmp_path, egress,
                                                          plain_origin) -> None:
    mark, before = egress.mark(), plain_origin.connections
    port = plain_origin.port
    result = _srt(tmp_path, egress,
                  f"curl -sS --max-time 20 http://allowed.test:{port}/hello; "
                  f"curl -sS --max-time 20 -w '%{{http_code}}' http://denied.evil.test:{port}/")
    assert result.returncode == 0, result.stderr
    assert f"hello from plain-origin: /hello host=allowed.test:{port}" in result.stdout
    assert "agent-egress blocked this request" in result.stdout  # the 403 and its reason
    assert "denied.evil.test" in result.stdout
    assert result.stdout.endswith("403")
    assert plain_origin.connections == before + 1  # only the allowed request
    allowed = egress.wait_for_event(lambda e: e["event"] == "request.decided"
                                    and e.get("host") == "allowed.test", after=mark)
    denied = egress.wait_for_event(lambda e: e["event"] == "request.decided"
                                   and e.get("host") == "denied.evil.test", after=mark)
    assert allowed["decision"] == "allow" and denied["reason"] == "denylist"


def test_srt_sandbox_has_no_way_round_the_proxy(tmp_path, egress, plain_origin) -> None:
    before = plain_origin.connections
    result = _srt(tmp_path, egress,
                  f"curl -sS --max-time 5 --noproxy '*' http://127.0.0.1:{plain_origin.port}/;"
                  " echo direct=$?")
    outcome = [line for line in result.stdout.splitlines() if line.startswith("direct=")]
    assert outcome and outcome != ["direct=0"], result.stdout + result.stderr  # it ran, failed
    assert plain_origin.connections == before
