"""Triage benchmark: `agent-egress triage` on a large generated audit log.

Run: .venv/bin/python tests/benchmarks/bench_triage.py [--events 1000000] [--agents 200]

Writes a log of N events (tunnels, allowed and refused requests, holds and approvals, a few
bypass attempts and uploads, for many agents over a day), then times the real command on it
(JSON output to a file) and reports its peak memory. Target (docs/performance.md): 1,000,000
events in under 30 s and 500 MB.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

HOSTS = ["pypi.org", "files.pythonhosted.org", "registry.npmjs.org", "github.com",
         "api.github.com", "objects.githubusercontent.com", "crates.io", "proxy.golang.org"]


def generate(path: Path, count: int, agents: int, rng: random.Random) -> None:
    start = datetime(2026, 12, 1, tzinfo=UTC)
    with path.open("w") as out:
        for n in range(count):
            when = start + timedelta(seconds=n * 86400 / count)
            agent = f"agent-{rng.randrange(agents)}"
            roll = rng.random()
            event: dict[str, object] = {
                "time": when.isoformat().replace("+00:00", "Z"), "schema": 1,
                "client": f"10.0.{rng.randrange(4)}.{rng.randrange(250)}:4{rng.randrange(9999)}",
                "agent": agent}
            if roll < 0.45:
                host = rng.choice(HOSTS)
                event.update(event="request.decided", scheme="connect", host=host, port=443,
                             decision="allow", reason="allowlist", rule=host)
            elif roll < 0.85:
                event.update(event="tunnel.closed", host=rng.choice(HOSTS), port=443,
                             protocol="tls", bytes_up=rng.randrange(500, 5000),
                             bytes_down=rng.randrange(1000, 2_000_000), duration_ms=80.5)
            elif roll < 0.93:
                event.update(event="request.decided", scheme="connect",
                             host=f"site{rng.randrange(5000)}.example.org", port=443,
                             decision=rng.choice(["deny", "held"]),
                             reason=rng.choice(["not_allowlisted", "needs_approval"]))
            elif roll < 0.97:
                event.update(event="approval.decided", host=f"site{rng.randrange(5000)}.org",
                             port=443, decision=rng.choice(["allow", "deny"]), scope="once",
                             actor="uid:1000", released=1)
            elif roll < 0.99:
                event.update(event="request.decided", scheme="connect", host="pypi.org",
                             port=443, decision="deny", reason="dns_error")
            elif roll < 0.995:
                event.update(event="request.decided", scheme="connect",
                             host="allowed.example.com", port=443, decision="deny",
                             reason="sni_mismatch", sni="evil.example")
            else:
                event.update(event="tunnel.closed", host=f"drop{rng.randrange(50)}.example.net",
                             port=443, protocol="tls", bytes_up=rng.randrange(2, 60) << 20,
                             bytes_down=4000, duration_ms=900.0)
            out.write(json.dumps(event) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--agents", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        log = Path(directory) / "audit.jsonl"
        started = time.perf_counter()
        generate(log, args.events, args.agents, random.Random(11))
        print(f"generated {args.events:,} events ({log.stat().st_size / 2**20:.0f} MiB) in "
              f"{time.perf_counter() - started:.1f} s")
        started = time.perf_counter()
        result = subprocess.run(
            [sys.executable, "-m", "agent_egress.proxy", "triage", str(log), "--format",
             "json", "-o", str(Path(directory) / "triage.json")],
            capture_output=True, text=True, stdin=subprocess.DEVNULL)
        elapsed = time.perf_counter() - started
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        if result.returncode not in (0, 3):
            raise SystemExit(result.stderr)
        data = json.loads((Path(directory) / "triage.json").read_text())
        escalate = sum(s["verdict"] == "escalate" for s in data["sessions"])
        print(f"triage: {elapsed:.1f} s, peak RSS {peak:.0f} MiB, "
              f"{args.events / elapsed:,.0f} events/s; {len(data['sessions'])} sessions, "
              f"{escalate} to escalate (exit {result.returncode})")


if __name__ == "__main__":
    main()
