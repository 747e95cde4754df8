"""Policy engine benchmark: compile time, memory and host decisions per second.

Run: .venv/bin/python tests/benchmarks/bench_policy.py [--sizes 1000,100000,1000000]

Prints one table; targets (docs/performance.md): >= 500,000 decisions/s at 100k rules on one
core, compile of 100k rules under 1 s. Decisions are measured two ways: "cold" bypasses the
per-host decision cache (every host normalised and matched from scratch), "cached" is what the
proxy sees for repeated destinations.
"""

from __future__ import annotations

import argparse
import gc
import random
import resource
import time
import tomllib

from agent_egress.policy import engine, normalize_host
from agent_egress.policy.hosts import normalize_host_uncached
from agent_egress.policy.layering import ParsedFile, compile_layers
from agent_egress.policy.model import PolicyFile

TLDS = ["com", "org", "net", "io", "dev", "co.uk", "de", "test"]


def make_rules(count: int, rng: random.Random) -> tuple[list[str], list[str], list[str]]:
    """Allow and deny patterns of every form, and hosts that hit and miss them."""
    allow, deny, hosts = [], [], []
    for i in range(count):
        domain = f"site{i}.{TLDS[i % len(TLDS)]}"
        form = i % 10
        if form < 4:
            pattern, host = domain, domain
        elif form < 7:
            pattern, host = f"*.{domain}", f"api.v{i % 7}.{domain}"
        elif form == 7:
            pattern, host = f"**.{domain}", domain
        elif form == 8:
            pattern, host = f"region*.{domain}", f"region{i % 5}.{domain}"
        else:
            pattern, host = f"{domain}:8443", domain
        (deny if i % 20 == 0 else allow).append(pattern)
        hosts.append(host)
        hosts.append(f"miss{i}.example{i % 97}.com")
    rng.shuffle(hosts)
    return allow, deny, hosts


def policy_text(allow: list[str], deny: list[str]) -> str:
    def toml_list(items: list[str]) -> str:
        return "[\n" + ",\n".join(f'  "{item}"' for item in items) + "\n]"

    return (f'version = 1\n[network]\ndefault = "deny"\nports = [80, 443, 8443]\n'
            f"allow = {toml_list(allow)}\ndeny = {toml_list(deny)}\n")


def rate(function, hosts: list[str], seconds: float = 1.0) -> float:
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for host in hosts:
            function(host, 443)
        done += len(hosts)
    return done / (time.perf_counter() - start)


def rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,100000,1000000")
    args = parser.parse_args()
    rng = random.Random(1)
    print(f"{'rules':>9} {'TOML s':>7} {'compile s':>10} {'RSS MiB':>8} {'cold dec/s':>11} "
          f"{'cold us':>8} {'cached dec/s':>13}")
    for size in (int(s) for s in args.sizes.split(",")):
        allow, deny, hosts = make_rules(size, rng)
        text = policy_text(allow, deny)
        gc.collect()
        before = rss_mib()
        start = time.perf_counter()
        data = tomllib.loads(text)
        parsed = time.perf_counter()
        parsed_file = ParsedFile(PolicyFile.model_validate(data), f"<{size} rules>", text)
        policy = compile_layers(parsed_file, None, {})
        compiled = time.perf_counter()
        del data
        gc.collect()
        memory = rss_mib() - before
        sample = hosts[:20000]
        # Cold: no decision cache and no normalisation cache, every host from scratch.
        engine.normalize_host = normalize_host_uncached
        try:
            cold_rate = rate(policy._decide, sample)
        finally:
            engine.normalize_host = normalize_host
        cached_rate = rate(policy.decide, sample[:1000])
        print(f"{size:>9,} {parsed - start:>7.2f} {compiled - parsed:>10.2f} {memory:>8.0f} "
              f"{cold_rate:>11,.0f} {1e6 / cold_rate:>8.2f} {cached_rate:>13,.0f}", flush=True)
        del policy, text, allow, deny, hosts


if __name__ == "__main__":
    main()
