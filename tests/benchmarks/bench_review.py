"""Auto-review benchmark: how long the rules reviewer takes per held request.

Run: .venv/bin/python tests/benchmarks/bench_review.py [--sizes 10,1000,100000] [--hosts 20000]

Prints one table per policy size: the time to build the reviewer (once per policy load, on
the first review), the memory it adds, and the latency of one review over a mix of hosts
(allowed domains, presets' hosts, risky services, homographs, random and generated names, IP
literals, odd ports). Target (docs/performance.md): under 1 ms per review.
"""

from __future__ import annotations

import argparse
import gc
import random
import resource
import string
import tempfile
import time
from pathlib import Path

from agent_egress.policy import load_policy
from agent_egress.policy.review import ReviewRequest, RulesReviewer

FIXED = ["test.pypi.org", "docs.rs", "foo.readthedocs.io", "registry.npmjs.org",
         "webhook.site", "abc.ngrok-free.app", "x.oast.fun", "xn--gthub-n2e.com",
         "githuh.com", "pypi-mirror.net", "a8f3k2m9q7x1b5z.example.com", "qwrtzplkmnb.com",
         "203.0.113.7", "2001:db8::1", "kubernetes.io", "stackoverflow.com"]
WORDS = ["alpha", "notes", "cloud", "data", "wiki", "build", "river", "stone", "metrics",
         "orbit", "delta", "pixel", "harbor", "signal", "forest", "lumen"]


def policy_file(size: int, directory: Path) -> Path:
    # Half name whole domains (which the reviewer indexes), half one service of a domain.
    allow = ", ".join(f'"{"" if i % 2 else "api."}site{i}.{("com", "org", "io", "dev")[i % 4]}"'
                      for i in range(size))
    path = directory / f"policy-{size}.toml"
    path.write_text(f"version = 1\n[network]\nallow = [{allow}]\n")
    return path


def hosts(count: int, rng: random.Random) -> list[ReviewRequest]:
    made = []
    for i in range(count):
        kind = i % 4
        if kind == 0:
            host = rng.choice(FIXED)
        elif kind == 1:
            host = f"{rng.choice(WORDS)}{rng.choice(WORDS)}.{rng.choice(['com', 'org', 'io'])}"
        elif kind == 2:
            label = "".join(rng.choices(string.ascii_lowercase + string.digits, k=24))
            host = f"{label}.{rng.choice(WORDS)}.net"
        else:
            host = f"docs.site{rng.randrange(100000)}.org"
        made.append(ReviewRequest(host, rng.choice([443, 443, 443, 80, 8443]),
                                  method=rng.choice([None, None, "GET", "POST"]),
                                  siblings=rng.randrange(1, 8)))
    return made


def rss_mib() -> float:
    """Resident memory now (not the peak: each size is measured after the last one)."""
    gc.collect()
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10,1000,100000")
    parser.add_argument("--hosts", type=int, default=20000)
    args = parser.parse_args()
    rng = random.Random(7)
    requests = hosts(args.hosts, rng)
    print(f"{'allow rules':>12} {'build s':>8} {'+MiB':>6} {'mean us':>8} {'p50 us':>7} "
          f"{'p99 us':>7} {'max us':>8} {'reviews/s':>10}")
    with tempfile.TemporaryDirectory() as directory:
        for size in (int(s) for s in args.sizes.split(",")):
            policy = load_policy(str(policy_file(size, Path(directory))))
            before = rss_mib()
            started = time.perf_counter()
            reviewer = RulesReviewer.build(policy)
            built = time.perf_counter() - started
            grown = rss_mib() - before
            for request in requests[:500]:  # warm caches, as a running proxy has them
                reviewer.review(request, "low")
            times = []
            total = time.perf_counter()
            for request in requests:
                start = time.perf_counter_ns()
                reviewer.review(request, "low")
                times.append(time.perf_counter_ns() - start)
            total = time.perf_counter() - total
            times.sort()

            def at(q: float, ordered: list[int] = times) -> float:
                return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000

            print(f"{size:>12} {built:>8.2f} {grown:>6.1f} {sum(times) / len(times) / 1000:>8.1f}"
                  f" {at(0.5):>7.1f} {at(0.99):>7.1f} {times[-1] / 1000:>8.1f} "
                  f"{len(times) / total:>10.0f}")


if __name__ == "__main__":
    main()
