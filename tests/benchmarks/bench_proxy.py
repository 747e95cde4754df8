"""Side-by-side proxy benchmark: direct, plain mitmdump, agent-egress (default policy and a
100k-rule policy), Squid and tinyproxy, against local origins on loopback.

Run: .venv/bin/python tests/benchmarks/bench_proxy.py [--seconds 3] [--rounds 3] [--json out.json]

Squid and tinyproxy are used when installed (Debian: apt-get install squid tinyproxy); this
script installs nothing. Every proxy allows exactly the origin's host name ("localhost") and
the origin ports; agent-egress and mitmdump pass TLS through untouched (no interception),
except the two "intercepting" setups: mitmdump terminating every tunnel's TLS with its CA, and
agent-egress with a request rule on the origin's host (so it intercepts it with its local CA);
both verify the origin against its CA. The client trusts each setup's CA.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import trustme

HERE = Path(__file__).resolve()
BULK_BYTES = 64 * 2**20
HOST = "localhost"
FIGURES = ("tunnels_per_s_c1", "tunnel_p50_ms_c1", "tunnel_p99_ms_c1", "tunnels_per_s_c50",
           "tunnel_p50_ms_c50", "tunnel_p99_ms_c50", "tunnels_per_s_c10", "tls_req_per_s_c10",
           "http_req_per_s_c10", "bulk_mb_per_s",
           "rss_mib_start", "rss_mib_1000_idle_tunnels", "kib_per_idle_tunnel",
           "rss_mib_200_held", "kib_per_held_approval")


# -- origins (run in their own process) -------------------------------------------------------

ORIGIN_CODE = r'''
import asyncio, ssl, sys
BULK = int(sys.argv[3])
SMALL = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: text/plain\r\n\r\nhello"
CHUNK = b"x" * 65536
async def handle(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            if head.split(b" ", 2)[1].startswith(b"/bulk"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % BULK)
                for _ in range(BULK // len(CHUNK)):
                    writer.write(CHUNK)
                    await writer.drain()
            else:
                writer.write(SMALL)
                await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError, OSError):
        pass
    finally:
        writer.close()
async def main():
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(sys.argv[4])
    hosts = ["127.0.0.1", "::1"]
    plain = await asyncio.start_server(handle, hosts, int(sys.argv[1]), backlog=2048)
    tls = await asyncio.start_server(handle, hosts, int(sys.argv[2]), ssl=context, backlog=2048)
    print("ready", flush=True)
    await asyncio.gather(plain.serve_forever(), tls.serve_forever())
asyncio.run(main())
'''


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))


# -- proxies -----------------------------------------------------------------------------------

class Proxy:
    def __init__(self, name: str, command: list[str] | None, port: int | None,
                 workdir: Path, env: dict[str, str] | None = None,
                 ca_file: Path | None = None) -> None:
        self.name, self.port, self.process = name, port, None
        self.ca_file = ca_file  # the CA the client must trust (an intercepting proxy's)
        if command:
            self.log = (workdir / f"{name.replace(' ', '_')}.log").open("w")
            self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT,
                                            env={**os.environ, **(env or {})},
                                            preexec_fn=raise_fd_limit)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    time.sleep(0.1)
            else:
                raise RuntimeError(f"{name} did not start; see {self.log.name}")

    def rss_mib(self) -> float:
        if self.process is None:
            return 0.0
        total = 0
        pids = [self.process.pid] + [int(p) for p in subprocess.run(
            ["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True
        ).stdout.split()]
        for pid in pids:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        return total / 1024

    def stop(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def egress_policy(ports: list[int], extra_rules: int = 0, default: str = "ask",
                  intercept_with: Path | None = None) -> str:
    rules = ",\n".join(f'  "site{i}.example{i % 97}.com"' for i in range(extra_rules))
    requests = "" if intercept_with is None else (
        f'upstream_ca_file = "{intercept_with}"\n'
        '[[network.requests]]\nhost = "localhost"\nmethods = ["GET", "HEAD"]\n'
        'action = "allow"\n')
    return (f'version = 1\npresets = ["package-registries", "github", "docs"]\n'
            f'[network]\ndefault = "{default}"\nallow = [\n  "localhost",\n{rules}\n]\n'
            f"ports = {ports}\nallowed_cidrs = [\"127.0.0.0/8\", \"::1/128\"]\n"
            # The load generator is one local client: the per-client bounds are lifted for it.
            "max_connections_per_client = 8192\n"
            f"{requests}"
            "[approvals]\ntimeout = 600\nmax_pending = 1000\nmax_pending_per_agent = 1000\n")


def start_proxies(workdir: Path, ports: list[int], names: set[str],
                  baseline: str | None = None, origin_ca: Path | None = None) -> list[Proxy]:
    python = sys.executable
    bin_dir = Path(python).parent
    proxies = [Proxy("direct", None, None, workdir)]
    if "mitmdump" in names:
        port = free_port()
        proxies.append(Proxy("mitmdump", [
            str(bin_dir / "mitmdump"), "-q", "--listen-host", "127.0.0.1", "--listen-port",
            str(port), "--set", "connection_strategy=lazy", "--set", "stream_large_bodies=1m",
            "--ignore-hosts", ".*"], port, workdir))
    if "mitmdump intercepting" in names:
        port = free_port()
        confdir = workdir / "mitmproxy-conf"
        proxies.append(Proxy("mitmdump intercepting", [
            str(bin_dir / "mitmdump"), "-q", "--listen-host", "127.0.0.1", "--listen-port",
            str(port), "--set", "connection_strategy=lazy", "--set", "stream_large_bodies=1m",
            "--set", f"confdir={confdir}", "--set",
            f"ssl_verify_upstream_trusted_ca={origin_ca}"], port, workdir,
            ca_file=confdir / "mitmproxy-ca-cert.pem"))
    builds = [("agent-egress", 0, python), ("agent-egress 100k", 100_000, python),
              ("agent-egress intercepting", 0, python)]
    if baseline:  # another checkout's interpreter: the same figures, measured side by side
        builds.append(("agent-egress baseline", 0, baseline))
        names = names | {"agent-egress baseline"}
    for label, rules, python in builds:
        if label not in names:
            continue
        port = free_port()
        policy = workdir / f"policy-{label.replace(' ', '-')}.toml"
        intercepting = label.endswith("intercepting")
        policy.write_text(egress_policy(ports, rules,
                                        intercept_with=origin_ca if intercepting else None))
        ca_dir = workdir / f"ca-{label.replace(' ', '-')}"
        if intercepting:  # made now, so the client can trust it from the first request
            subprocess.run([python, "-m", "agent_egress.proxy", "ca", "path", "--ca-dir",
                            str(ca_dir)], check=True, capture_output=True)
        proxies.append(Proxy(label, [
            python, "-m", "agent_egress.proxy", "serve", "--listen", f"127.0.0.1:{port}",
            "--config", str(policy),
            "--audit-log", str(workdir / f"audit-{label.replace(' ', '-')}.jsonl"),
            "--approval-socket", str(workdir / f"s-{label.replace(' ', '-')}" / "a.sock"),
            # (a baseline build from before interception knows no --ca-dir)
            *(("--ca-dir", str(ca_dir)) if intercepting else ())],
            port, workdir,
            env={"XDG_CONFIG_HOME": str(workdir), "XDG_STATE_HOME": str(workdir)},
            ca_file=ca_dir / "agent-egress-ca-cert.pem" if intercepting else None))
    if "squid" in names and shutil.which("squid"):
        port = free_port()
        config = workdir / "squid.conf"
        config.write_text(
            f"http_port 127.0.0.1:{port}\nacl allowed dstdomain {HOST}\n"
            f"acl ports port {' '.join(map(str, ports))}\n"
            "http_access deny !ports\nhttp_access allow allowed\nhttp_access deny all\n"
            "cache deny all\ncache_mem 8 MB\naccess_log none\ncache_log /dev/null\n"
            f"pid_filename {workdir}/squid.pid\ncoredump_dir {workdir}\n"
            "max_filedescriptors 16384\nshutdown_lifetime 1 seconds\n")
        proxies.append(Proxy("squid", ["squid", "-N", "-f", str(config)], port, workdir))
    elif "squid" in names:
        print("squid not installed (apt-get install squid): skipped", file=sys.stderr)
    if "tinyproxy" in names and shutil.which("tinyproxy"):
        port = free_port()
        filter_file = workdir / "tinyproxy.filter"
        filter_file.write_text(f"^{HOST}$\n")
        config = workdir / "tinyproxy.conf"
        config.write_text(
            f"Port {port}\nListen 127.0.0.1\nTimeout 600\nMaxClients 4096\n"
            f'Filter "{filter_file}"\nFilterDefaultDeny Yes\nFilterExtended On\n'
            + "".join(f"ConnectPort {p}\n" for p in ports) + "LogLevel Critical\n")
        proxies.append(Proxy("tinyproxy", ["tinyproxy", "-d", "-c", str(config)], port,
                             workdir))
    elif "tinyproxy" in names:
        print("tinyproxy not installed (apt-get install tinyproxy): skipped", file=sys.stderr)
    return proxies


# -- clients -----------------------------------------------------------------------------------

async def open_tunnel(proxy: Proxy, tls_port: int, context: ssl.SSLContext
                      ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if proxy.port is None:
        return await asyncio.open_connection(HOST, tls_port, ssl=context,
                                             server_hostname=HOST)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(f"CONNECT {HOST}:{tls_port} HTTP/1.1\r\nHost: {HOST}:{tls_port}\r\n\r\n"
                 .encode())
    head = await reader.readuntil(b"\r\n\r\n")
    if b" 200" not in head.split(b"\r\n", 1)[0]:
        raise RuntimeError(f"{proxy.name}: CONNECT refused: {head[:80]!r}")
    await writer.start_tls(context, server_hostname=HOST)
    return reader, writer


async def tunnel_request(proxy: Proxy, tls_port: int, context: ssl.SSLContext) -> None:
    reader, writer = await open_tunnel(proxy, tls_port, context)
    writer.write(f"GET / HTTP/1.1\r\nHost: {HOST}:{tls_port}\r\n\r\n".encode())
    await reader.readuntil(b"hello")
    writer.close()


async def kept_tunnel_requests(proxy: Proxy, tls_port: int, context: ssl.SSLContext,
                               concurrency: int, seconds: float) -> dict[str, float]:
    """Requests over TLS tunnels kept open (keep-alive): what interception costs per request
    once the handshakes are done."""
    pool: asyncio.Queue = asyncio.Queue()
    for _ in range(concurrency):
        pool.put_nowait(await open_tunnel(proxy, tls_port, context))
    request = f"GET / HTTP/1.1\r\nHost: {HOST}:{tls_port}\r\n\r\n".encode()

    async def one() -> None:
        reader, writer = await pool.get()
        writer.write(request)
        await reader.readuntil(b"hello")
        pool.put_nowait((reader, writer))

    result = await run_load(one, concurrency, seconds)
    while not pool.empty():
        pool.get_nowait()[1].close()
    return result


async def run_load(operation: Callable[[], Awaitable[None]], concurrency: int,
                   seconds: float) -> dict[str, float]:
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            await operation()
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {"per_second": len(latencies) / elapsed,
            "p50_ms": statistics.median(latencies) * 1000,
            "p99_ms": latencies[max(int(len(latencies) * 0.99) - 1, 0)] * 1000}


async def plain_requests(proxy: Proxy, plain_port: int, concurrency: int,
                         seconds: float) -> dict[str, float]:
    port = plain_port if proxy.port is None else proxy.port
    connections = [await asyncio.open_connection("127.0.0.1", port) for _ in range(concurrency)]
    target = "/" if proxy.port is None else f"http://{HOST}:{plain_port}/"
    request = f"GET {target} HTTP/1.1\r\nHost: {HOST}:{plain_port}\r\n\r\n".encode()
    pool: asyncio.Queue = asyncio.Queue()
    for connection in connections:
        pool.put_nowait(connection)

    async def one() -> None:
        reader, writer = await pool.get()
        for _ in range(2):  # a proxy without client keep-alive (tinyproxy) closes: reconnect
            try:
                writer.write(request)
                await reader.readuntil(b"hello")
                break
            except (asyncio.IncompleteReadError, ConnectionError):
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
        pool.put_nowait((reader, writer))

    result = await run_load(one, concurrency, seconds)
    while not pool.empty():
        pool.get_nowait()[1].close()
    return result


async def bulk(proxy: Proxy, tls_port: int, context: ssl.SSLContext, seconds: float) -> float:
    """MB/s over as many BULK_BYTES responses through one tunnel as fit in `seconds` (at least
    three: one transfer takes only a tenth of a second here, too short to measure alone)."""
    reader, writer = await open_tunnel(proxy, tls_port, context)
    transferred, started = 0, time.perf_counter()
    while transferred < 3 * BULK_BYTES or time.perf_counter() - started < seconds:
        writer.write(f"GET /bulk HTTP/1.1\r\nHost: {HOST}:{tls_port}\r\n\r\n".encode())
        await reader.readuntil(b"\r\n\r\n")
        remaining = BULK_BYTES
        while remaining:
            chunk = await reader.read(min(remaining, 1 << 20))
            remaining -= len(chunk)
        transferred += BULK_BYTES
    elapsed = time.perf_counter() - started
    writer.close()
    return transferred / 2**20 / elapsed


async def idle_tunnels(proxy: Proxy, tls_port: int, context: ssl.SSLContext,
                       count: int) -> list[asyncio.StreamWriter]:
    """`count` TLS tunnels, handshake done, left open and idle."""
    opened: list[asyncio.StreamWriter] = []
    semaphore = asyncio.Semaphore(50)

    async def one() -> None:
        async with semaphore:
            opened.append((await open_tunnel(proxy, tls_port, context))[1])

    await asyncio.gather(*(one() for _ in range(count)))
    return opened


async def held_approvals(proxy: Proxy, tls_port: int, count: int) -> list[asyncio.StreamWriter]:
    """`count` CONNECTs to hosts no rule covers, waiting for a person's decision."""
    writers = []
    for index in range(count):
        _, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(f"CONNECT held{index}.example:{tls_port} HTTP/1.1\r\n\r\n".encode())
        writers.append(writer)
    return writers


async def measure_speed(proxy: Proxy, ports: tuple[int, int], context: ssl.SSLContext,
                        seconds: float) -> dict[str, float]:
    plain_port, tls_port = ports
    figures: dict[str, float] = {}
    for concurrency in (1, 10, 50):
        result = await run_load(lambda: tunnel_request(proxy, tls_port, context), concurrency,
                                seconds)
        figures[f"tunnels_per_s_c{concurrency}"] = result["per_second"]
        figures[f"tunnel_p50_ms_c{concurrency}"] = result["p50_ms"]
        figures[f"tunnel_p99_ms_c{concurrency}"] = result["p99_ms"]
    figures["tls_req_per_s_c10"] = (await kept_tunnel_requests(
        proxy, tls_port, context, 10, seconds))["per_second"]
    figures["http_req_per_s_c10"] = (await plain_requests(proxy, plain_port, 10, seconds))[
        "per_second"]
    figures["bulk_mb_per_s"] = await bulk(proxy, tls_port, context, seconds)
    return figures


async def measure_memory(proxy: Proxy, tls_port: int, context: ssl.SSLContext
                         ) -> dict[str, float]:
    """RSS with 1,000 idle tunnels, then with 200 held approvals on top, and the cost of each
    (KiB). The first request is made before the baseline: what it loads is not per tunnel."""
    figures = {"rss_mib_start": proxy.rss_mib()}
    await tunnel_request(proxy, tls_port, context)
    baseline = proxy.rss_mib()
    writers = await idle_tunnels(proxy, tls_port, context, 1000)
    await asyncio.sleep(1)
    figures["rss_mib_1000_idle_tunnels"] = proxy.rss_mib()
    figures["kib_per_idle_tunnel"] = (figures["rss_mib_1000_idle_tunnels"] - baseline) * 1024 / 1000
    if proxy.name.startswith("agent-egress"):
        writers += await held_approvals(proxy, tls_port, 200)
        await asyncio.sleep(2)
        figures["rss_mib_200_held"] = proxy.rss_mib()
        figures["kib_per_held_approval"] = (
            figures["rss_mib_200_held"] - figures["rss_mib_1000_idle_tunnels"]) * 1024 / 200
    for writer in writers:
        writer.close()
    await asyncio.sleep(1)
    return figures


def median_figures(rounds: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(r[key] for r in rounds) for key in rounds[0]} if rounds else {}


def render(results: dict[str, dict[str, float]]) -> str:
    metrics = [key for key in FIGURES if any(key in figures for figures in results.values())]
    names = list(results)
    lines = [f"{'figure':<28}" + "".join(f"{n:>19}" for n in names)]
    for metric in metrics:
        row = f"{metric:<28}"
        for name in names:
            value = results[name].get(metric)
            if value is None:
                row += f"{'-':>19}"
                continue
            ratios = []
            # An intercepting setup is compared with mitmdump intercepting the same traffic.
            mitmdump = "mitmdump intercepting" if name.endswith("intercepting") else "mitmdump"
            for base in ("direct", mitmdump):
                reference = results.get(base, {}).get(metric)
                if reference and name != base:
                    ratios.append(f"{value / reference:.2f}")
            row += f"{value:>10.1f}" + f"{' (' + '/'.join(ratios) + ')' if ratios else '':>9}"
        lines.append(row)
    lines.append("(ratios: to direct / to mitmdump, intercepting setups to mitmdump "
                 "intercepting; for latency and memory lower is better)")
    return "\n".join(lines)


def client_context(proxy: Proxy, origin_trust: ssl.SSLContext) -> ssl.SSLContext:
    """What the client trusts through this setup: the origin's CA, or the intercepting
    proxy's."""
    if proxy.ca_file is None:
        return origin_trust
    return ssl.create_default_context(cafile=str(proxy.ca_file))


def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--seconds", type=float, default=3.0, help="per load measurement")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of the speed figures (each figure: the median; 0: memory "
                             "figures only)")
    parser.add_argument("--json", default="bench_proxy.json", help="where to write figures")
    parser.add_argument("--only", default="direct,mitmdump,agent-egress,agent-egress 100k,"
                                          "squid,tinyproxy,mitmdump intercepting,"
                                          "agent-egress intercepting",
                        help="comma-separated setups to measure (default: all)")
    parser.add_argument("--baseline", metavar="PYTHON",
                        help="also measure the agent-egress installed for this interpreter "
                             "(another checkout's venv), as 'agent-egress baseline'")
    args = parser.parse_args()
    raise_fd_limit()
    workdir = Path(tempfile.mkdtemp(prefix="bench-proxy-"))
    ca = trustme.CA()
    cert = ca.issue_cert(HOST, "127.0.0.1", "::1")
    cert_file = workdir / "origin.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    context = ssl.create_default_context()
    ca.configure_trust(context)
    origin_ca = workdir / "origin-ca.pem"
    ca.cert_pem.write_to_path(str(origin_ca))
    plain_port, tls_port = free_port(), free_port()
    origin = subprocess.Popen([sys.executable, "-c", ORIGIN_CODE, str(plain_port),
                               str(tls_port), str(BULK_BYTES), str(cert_file)],
                              stdout=subprocess.PIPE, text=True, preexec_fn=raise_fd_limit)
    assert origin.stdout is not None and origin.stdout.readline().strip() == "ready"
    names = set(args.only.split(","))
    proxies = start_proxies(workdir, [80, 443, plain_port, tls_port], names, args.baseline,
                            origin_ca)
    contexts = {proxy.name: client_context(proxy, context) for proxy in proxies}
    try:
        # Memory first, on fresh processes: after the load rounds the heap's high-water mark
        # would hide what idle tunnels and held approvals cost.
        memory: dict[str, dict[str, float]] = {proxy.name: {} for proxy in proxies}
        for proxy in proxies:
            if proxy.process is not None:
                print(f"memory: {proxy.name} ...", file=sys.stderr, flush=True)
                memory[proxy.name] = asyncio.run(measure_memory(proxy, tls_port,
                                                                contexts[proxy.name]))
        # Proxies take turns within each round, each round starting one further along, so a
        # slow spell of the machine or an effect of going after another proxy is spread over
        # all of them; each figure is the median over the rounds.
        speed: dict[str, list[dict[str, float]]] = {proxy.name: [] for proxy in proxies}
        for round_number in range(1, args.rounds + 1):
            shift = (round_number - 1) % len(proxies)
            for proxy in proxies[shift:] + proxies[:shift]:
                print(f"round {round_number}/{args.rounds}: {proxy.name} ...", file=sys.stderr,
                      flush=True)
                speed[proxy.name].append(asyncio.run(measure_speed(
                    proxy, (plain_port, tls_port), contexts[proxy.name], args.seconds)))
        results = {proxy.name: {**median_figures(speed[proxy.name]), **memory[proxy.name]}
                   for proxy in proxies}
    finally:
        for proxy in proxies:
            proxy.stop()
        origin.terminate()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}; {time.strftime('%Y-%m-%d')}")
    print(render(results))
    Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"figures written to {args.json}")


if __name__ == "__main__":
    main()
