"""Proxy latency with telemetry off, exporting to a healthy collector, a dead one (closed port)
and a stalling one (accepts, never answers). The audit log must have every decision in all.

Run: .venv/bin/python tests/benchmarks/bench_telemetry.py [--requests 300]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parents[1]))

from origins import CountingServer  # noqa: E402
from otlp import HttpReceiver, StallingCollector, closed_port_endpoint  # noqa: E402
from proxyproc import ProxyProcess  # noqa: E402

POLICY = """version = 1
[network]
default = "deny"
allow = ["origin.test"]
ports = [{port}]
allowed_cidrs = ["127.0.0.0/8"]
[resolve]
"origin.test" = "127.0.0.1"
"""


def measure(proxy: ProxyProcess, port: int, count: int) -> list[float]:
    timings = []
    with httpx.Client(proxy=proxy.url, trust_env=False) as client:
        for index in range(count):
            started = time.perf_counter()
            response = client.get(f"http://origin.test:{port}/hello?n={index}")
            timings.append(time.perf_counter() - started)
            assert response.status_code == 200
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-telemetry-"))
    (workdir / "www").mkdir()
    origin = CountingServer("origin", workdir / "www", None).start()
    receiver, stalling = HttpReceiver(), StallingCollector()
    setups = {
        "telemetry off": {},
        "healthy collector": {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint},
        "dead collector": {"OTEL_EXPORTER_OTLP_ENDPOINT": closed_port_endpoint()},
        "stalling collector": {"OTEL_EXPORTER_OTLP_ENDPOINT": stalling.endpoint},
    }
    print(f"{args.requests} sequential plain-HTTP requests through the proxy, one client")
    print(f"{'setup':<20} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8} {'audit lines':>12} "
          f"{'stop s':>7}")
    for name, env in setups.items():
        proxy = ProxyProcess(workdir / name.replace(" ", "-"), POLICY.format(port=origin.port),
                             env={**env, "OTEL_METRIC_EXPORT_INTERVAL": "1000"})
        try:
            measure(proxy, origin.port, 20)  # warm up
            timings = sorted(measure(proxy, origin.port, args.requests))
        finally:
            started = time.monotonic()
            proxy.stop()
            stop_seconds = time.monotonic() - started
        lines = len(proxy.events("request.decided"))
        print(f"{name:<20} {statistics.median(timings) * 1000:>8.2f} "
              f"{timings[int(len(timings) * 0.99) - 1] * 1000:>8.2f} "
              f"{statistics.fmean(timings) * 1000:>8.2f} {lines:>12} {stop_seconds:>7.1f}",
              flush=True)
    receiver.stop()
    stalling.stop()
    origin.stop()


if __name__ == "__main__":
    main()
