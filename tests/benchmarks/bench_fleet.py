"""A fleet on one Redis: how fast a decision reaches every proxy, and what --state costs the
decisions that never need a person.

Run: .venv/bin/python tests/benchmarks/bench_fleet.py [--rounds 50] [--seconds 3]

A redis-server on loopback (nothing persisted) and three `serve --state` proxies, plus one
proxy without --state, all with the same policy (bench_proxy.py's: presets, "localhost"
allowed, default "ask").

- Propagation: each round, one client per proxy sends CONNECT for the same held destination
  (one pending approval for the fleet, two proxies joining it); the decision is written to
  Redis and published (agent-egress:events) by this script, as `approve --state` does; the
  figure is the time from just before the decision is written to each client's
  "200 Connection established". p50/p99 over every client of every round.
- Throughput: CONNECT setups to an allowed host (decided by policy) at concurrency 1 and 10,
  against a proxy with --state and one without; meanwhile Redis' command counters show what
  the decisions sent it (nothing but the subscriber's periodic PING).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).resolve().parent))
from agent_egress.addons import fleet_state  # noqa: E402
from bench_proxy import HOST, egress_policy, free_port, raise_fd_limit, run_load  # noqa: E402

HELD = "held.bench.test"


def start_proxy(workdir: Path, ports: list[int], state_url: str | None
                ) -> tuple[subprocess.Popen[str], int]:
    workdir.mkdir(parents=True, exist_ok=True)
    policy = workdir / "policy.toml"
    policy.write_text(egress_policy(ports) + f'[resolve]\n"{HELD}" = "127.0.0.1"\n')
    state = ["--state", state_url] if state_url else []
    process = subprocess.Popen(
        [sys.executable, "-m", "agent_egress.proxy", "serve", "--listen", "127.0.0.1:0",
         "--config", str(policy), "--audit-log", str(workdir / "audit.jsonl"),
         "--approval-socket", str(workdir / "approvals.sock"), *state],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=raise_fd_limit,
        env={**os.environ, "HOME": str(workdir), "XDG_CONFIG_HOME": str(workdir),
             "XDG_STATE_HOME": str(workdir), "XDG_DATA_HOME": str(workdir)})
    assert process.stdout is not None
    port = 0
    for line in process.stdout:
        if " listening on " in line and not line.startswith("SOCKS5"):
            port = int(line.rsplit(":", 1)[1])
        if line.strip().startswith("http_proxy="):
            break
    if not port:
        raise RuntimeError("the proxy did not start")
    return process, port


def connected(workdir: Path) -> bool:
    audit = workdir / "audit.jsonl"
    return audit.exists() and '"state.connected"' in audit.read_text()


def count(workdir: Path, event: str) -> int:
    audit = workdir / "audit.jsonl"
    return audit.read_text().count(f'"event": "{event}"') if audit.exists() else 0


async def held_connect(port: int, target_port: int) -> tuple[asyncio.StreamReader,
                                                              asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"CONNECT {HELD}:{target_port} HTTP/1.1\r\nHost: {HELD}:{target_port}\r\n\r\n"
                 .encode())
    await writer.drain()
    return reader, writer


async def released(reader: asyncio.StreamReader, started: float) -> float:
    """Seconds from ``started`` to this held client's "200 Connection established"."""
    head = await reader.readuntil(b"\r\n\r\n")
    if b" 200" not in head.split(b"\r\n", 1)[0]:
        raise RuntimeError(f"not released: {head[:80]!r}")
    return time.perf_counter() - started


async def propagation(redis: object, ports: list[int], workdirs: list[Path], target: int,
                      rounds: int) -> list[float]:
    latencies: list[float] = []
    for number in range(rounds):
        joined = [count(w, "approval.joined") for w in workdirs]
        clients = [await held_connect(ports[0], target)]
        while not await fleet_state.list_pending(redis):
            await asyncio.sleep(0.005)
        clients += [await held_connect(port, target) for port in ports[1:]]
        # Every other proxy joined the fleet's pending approval before the decision.
        while sum(count(w, "approval.joined") for w in workdirs) < sum(joined) + len(ports) - 1:
            await asyncio.sleep(0.005)
        started = time.perf_counter()
        await fleet_state.decide(redis, f"{HELD}:{target}", "allow", "once",
                                 "redis:default/bench")

        latencies += await asyncio.gather(*(released(reader, started) for reader, _ in clients))
        for _, writer in clients:
            writer.close()
        while await fleet_state.list_pending(redis):  # the owner has closed it in Redis
            await asyncio.sleep(0.005)
        print(f"round {number + 1}/{rounds}", file=sys.stderr, end="\r", flush=True)
    print(file=sys.stderr)
    return latencies


async def commands(redis: object) -> dict[str, int]:
    stats = await redis.info("commandstats")  # type: ignore[attr-defined]
    return {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()}


async def setup(port: int, target: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"CONNECT {HOST}:{target} HTTP/1.1\r\nHost: {HOST}:{target}\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    if b" 200" not in head.split(b"\r\n", 1)[0]:
        raise RuntimeError(f"refused: {head[:80]!r}")
    writer.close()


async def bench(args: argparse.Namespace, redis_url: str, ports: list[int], plain: int,
                workdirs: list[Path], target: int) -> None:
    redis = aioredis.from_url(redis_url)
    try:
        latencies = sorted(await propagation(redis, ports, workdirs, target, args.rounds))
        throughput: dict[str, dict[int, float]] = {"with --state": {}, "without": {}}
        before = await commands(redis)
        for concurrency in (1, 10):
            for name, port in (("with --state", ports[0]), ("without", plain)):
                load = await run_load(lambda p=port: setup(p, target), concurrency, args.seconds)
                throughput[name][concurrency] = load["per_second"]
        after = await commands(redis)
    finally:
        await redis.aclose()
    sent = {name: after[name] - before.get(name, 0) for name in after
            if after[name] != before.get(name, 0) and name != "info"}
    p99 = latencies[max(int(len(latencies) * 0.99) - 1, 0)]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}; {time.strftime('%Y-%m-%d')}")
    print(f"\napproval propagation, decision to release ({len(latencies)} held clients on "
          f"3 proxies, {args.rounds} rounds): p50 {statistics.median(latencies) * 1000:.1f} ms, "
          f"p99 {p99 * 1000:.1f} ms, max {latencies[-1] * 1000:.1f} ms")
    print("\n| CONNECT setups/s, decided by policy | with --state | without | ratio |")
    print("|---|---:|---:|---:|")
    for concurrency in (1, 10):
        with_state, without = (throughput["with --state"][concurrency],
                               throughput["without"][concurrency])
        print(f"| c={concurrency} | {with_state:.0f} | {without:.0f} | "
              f"{with_state / without:.2f} |")
    seconds = 2 * 2 * args.seconds
    print(f"\nRedis commands during the {seconds:.0f} s of throughput load: "
          f"{json.dumps(sent) if sent else 'none'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--rounds", type=int, default=50, help="propagation rounds")
    parser.add_argument("--seconds", type=float, default=3.0, help="per throughput figure")
    args = parser.parse_args()
    raise_fd_limit()
    workdir = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    redis_port = free_port()
    redis_server = subprocess.Popen(
        [shutil.which("redis-server") or "redis-server", "--port", str(redis_port), "--bind",
         "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{redis_port}/0"
    target = free_port()  # nothing listens: CONNECT is answered before any upstream connection
    processes = []
    try:
        time.sleep(0.5)
        started = [start_proxy(workdir / f"p{i}", [80, 443, target], url) for i in range(3)]
        plain = start_proxy(workdir / "alone", [80, 443, target], None)
        processes = [p for p, _ in started] + [plain[0]]
        workdirs = [workdir / f"p{i}" for i in range(3)]
        while not all(connected(w) for w in workdirs):
            time.sleep(0.05)
        asyncio.run(bench(args, url, [port for _, port in started], plain[1], workdirs,
                          target))
    finally:
        for process in processes:
            process.terminate()
            process.wait(15)
        redis_server.terminate()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
