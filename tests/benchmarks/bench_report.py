"""Report speed and memory on a large generated audit log (target: 1M events under 30 s).

Run: .venv/bin/python tests/benchmarks/bench_report.py [--events 1000000]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def generate(path: Path, count: int) -> None:
    rng = random.Random(7)
    hosts = [f"h{i}.site{i % 500}.example" for i in range(5000)]
    reasons = ["not_allowlisted", "needs_approval", "denylist", "allowlist"]
    with path.open("w") as out:
        for index in range(count):
            reason = rng.choice(reasons)
            event = {"time": f"2026-11-{1 + index * 20 // count:02d}T{index % 24:02d}:00:00Z",
                     "event": "request.decided", "schema": 1, "client": "10.0.0.5:40000",
                     "scheme": "http", "method": "GET", "path": f"/p/{index % 50}",
                     "host": rng.choice(hosts), "port": 443,
                     "decision": "allow" if reason == "allowlist" else "deny", "reason": reason,
                     "agent": f"agent-{index % 7}"}
            out.write(json.dumps(event) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="bench-report-"))
    log = directory / "audit.jsonl"
    started = time.perf_counter()
    generate(log, args.events)
    print(f"generated {args.events:,} events ({log.stat().st_size / 2**20:.0f} MiB) in "
          f"{time.perf_counter() - started:.1f} s")
    for fmt in ("table", "json", "html"):
        started = time.perf_counter()
        result = subprocess.run(
            [sys.executable, "-c",
             "import resource, sys; from agent_egress.proxy.cli import main; "
             "code = main(sys.argv[1:]); "
             "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr); "
             "sys.exit(code)",
             "report", str(log), "--format", fmt, "-o", str(directory / f"report.{fmt}")],
            capture_output=True, text=True)
        elapsed = time.perf_counter() - started
        peak_mib = int(result.stderr.strip().splitlines()[-1]) / 1024
        print(f"report --format {fmt:<5} {elapsed:6.1f} s  peak RSS {peak_mib:5.0f} MiB  "
              f"(exit {result.returncode})", flush=True)


if __name__ == "__main__":
    main()
