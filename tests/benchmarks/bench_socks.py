"""SOCKS5 against HTTP CONNECT: the tunnel setup rate of one agent-egress proxy, both ports.

Run: .venv/bin/python tests/benchmarks/bench_socks.py [--seconds 3] [--rounds 3]

One proxy (the same policy as bench_proxy.py: presets plus "localhost" on the origin ports)
listens with both ports; the origins run in their own process on loopback. Two operations per
port, at concurrency 1, 10 and 50:
- setup: a new connection, the CONNECT (or SOCKS5 greeting and request) until the proxy
  answers "established" (policy decision, DNS pin), then closed;
- TLS tunnel: the same, then a TLS handshake with the origin through the tunnel (SNI check)
  and one request and response.
Rounds alternate which port goes first; each figure is the median over the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trustme

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_proxy import (  # noqa: E402
    BULK_BYTES,
    HOST,
    ORIGIN_CODE,
    egress_policy,
    free_port,
    raise_fd_limit,
    run_load,
)

SOCKS_REQUEST = b"\x05\x01\x00\x03" + bytes([len(HOST)]) + HOST.encode()


async def connect_tunnel(port: int, tls_port: int
                         ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"CONNECT {HOST}:{tls_port} HTTP/1.1\r\nHost: {HOST}:{tls_port}\r\n\r\n"
                 .encode())
    head = await reader.readuntil(b"\r\n\r\n")
    if b" 200" not in head.split(b"\r\n", 1)[0]:
        raise RuntimeError(f"CONNECT refused: {head[:80]!r}")
    return reader, writer


async def socks_tunnel(port: int, tls_port: int
                       ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    # Greeting and request in one write, as curl and most clients pipeline them.
    writer.write(b"\x05\x01\x00" + SOCKS_REQUEST + tls_port.to_bytes(2, "big"))
    answer = await reader.readexactly(12)
    if answer[:2] != b"\x05\x00" or answer[3] != 0x00:
        raise RuntimeError(f"SOCKS5 refused: {answer!r}")
    return reader, writer


async def setup_only(opener, port: int, tls_port: int) -> None:
    _, writer = await opener(port, tls_port)
    writer.close()


async def tls_request(opener, port: int, tls_port: int, context: ssl.SSLContext) -> None:
    reader, writer = await opener(port, tls_port)
    await writer.start_tls(context, server_hostname=HOST)
    writer.write(f"GET / HTTP/1.1\r\nHost: {HOST}:{tls_port}\r\n\r\n".encode())
    await reader.readuntil(b"hello")
    writer.close()


async def measure(opener, port: int, tls_port: int, context: ssl.SSLContext,
                  seconds: float) -> dict[str, float]:
    figures: dict[str, float] = {}
    for concurrency in (1, 10, 50):
        setup = await run_load(lambda: setup_only(opener, port, tls_port), concurrency, seconds)
        figures[f"setups_per_s_c{concurrency}"] = setup["per_second"]
        figures[f"setup_p50_ms_c{concurrency}"] = setup["p50_ms"]
        tls = await run_load(lambda: tls_request(opener, port, tls_port, context), concurrency,
                             seconds)
        figures[f"tls_tunnels_per_s_c{concurrency}"] = tls["per_second"]
        figures[f"tls_tunnel_p50_ms_c{concurrency}"] = tls["p50_ms"]
    return figures


def start_proxy(workdir: Path, ports: list[int]) -> tuple[subprocess.Popen[str], int, int]:
    policy = workdir / "policy.toml"
    policy.write_text(egress_policy(ports))
    process = subprocess.Popen(
        [sys.executable, "-m", "agent_egress.proxy", "serve", "--listen", "127.0.0.1:0",
         "--socks-listen", "127.0.0.1:0", "--config", str(policy),
         "--audit-log", str(workdir / "audit.jsonl"),
         "--approval-socket", str(workdir / "approvals.sock")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=raise_fd_limit,
        env={**os.environ, "HOME": str(workdir), "XDG_CONFIG_HOME": str(workdir),
             "XDG_STATE_HOME": str(workdir), "XDG_DATA_HOME": str(workdir)})
    assert process.stdout is not None
    http_port = socks_port = 0
    for line in process.stdout:
        if line.startswith("SOCKS5 listening on "):
            socks_port = int(line.rsplit(":", 1)[1])
        elif " listening on " in line:
            http_port = int(line.rsplit(":", 1)[1])
        if line.strip().startswith("http_proxy="):
            break
    if not (http_port and socks_port):
        raise RuntimeError("the proxy did not start")
    return process, http_port, socks_port


def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--seconds", type=float, default=3.0, help="per load measurement")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (figures: the median)")
    args = parser.parse_args()
    raise_fd_limit()
    workdir = Path(tempfile.mkdtemp(prefix="bench-socks-"))
    ca = trustme.CA()
    cert_file = workdir / "origin.pem"
    ca.issue_cert(HOST, "127.0.0.1").private_key_and_cert_chain_pem.write_to_path(
        str(cert_file))
    context = ssl.create_default_context()
    ca.configure_trust(context)
    plain_port, tls_port = free_port(), free_port()
    origin = subprocess.Popen([sys.executable, "-c", ORIGIN_CODE, str(plain_port),
                               str(tls_port), str(BULK_BYTES), str(cert_file)],
                              stdout=subprocess.PIPE, text=True, preexec_fn=raise_fd_limit)
    assert origin.stdout is not None and origin.stdout.readline().strip() == "ready"
    proxy, http_port, socks_port = start_proxy(workdir, [80, 443, plain_port, tls_port])
    setups = {"HTTP CONNECT": (connect_tunnel, http_port), "SOCKS5": (socks_tunnel, socks_port)}
    rounds: dict[str, list[dict[str, float]]] = {name: [] for name in setups}
    try:
        for number in range(args.rounds):
            order = list(setups) if number % 2 == 0 else list(reversed(setups))
            for name in order:
                print(f"round {number + 1}/{args.rounds}: {name} ...", file=sys.stderr,
                      flush=True)
                opener, port = setups[name]
                rounds[name].append(asyncio.run(measure(opener, port, tls_port, context,
                                                        args.seconds)))
    finally:
        proxy.terminate()
        proxy.wait(15)
        origin.terminate()
    results = {name: {key: statistics.median(r[key] for r in rounds[name])
                      for key in rounds[name][0]} for name in setups}
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}; {time.strftime('%Y-%m-%d')}")
    print("| figure | HTTP CONNECT | SOCKS5 | SOCKS5 / CONNECT |\n|---|---:|---:|---:|")
    for key in results["HTTP CONNECT"]:
        connect, socks = results["HTTP CONNECT"][key], results["SOCKS5"][key]
        print(f"| {key} | {connect:.1f} | {socks:.1f} | {socks / connect:.2f} |")


if __name__ == "__main__":
    main()
