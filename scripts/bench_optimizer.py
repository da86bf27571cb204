#!/usr/bin/env python3
"""Benchmark the optimizer: N = 128 threads, batches 1..1024 profiled at powers of two,
the optimum (and the servable plan) for every B from 1 to 1024.

The profile is synthetic (Amdahl-style: serial part + parallel part with diminishing returns,
plus a per-batch overhead), so the benchmark needs no measurement. Also times the textbook
O(N^2 B^2) recurrence of ARCHITECTURE.md at N = 16 for a few B, for scale.

    python scripts/bench_optimizer.py [--cores 128] [--max-batch 1024] [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from packrat.core.optimizer import Optimizer  # noqa: E402
from packrat.core.profile import Profile, ProfilePoint  # noqa: E402


def synthetic_profile(max_threads: int, max_batch: int) -> Profile:
    points = []
    for t in range(1, max_threads + 1):
        b = 1
        while b <= max_batch:
            work = 20.0 * b
            latency = 2.0 + 0.1 * work + 0.9 * work / t ** 0.8 + 0.05 * t
            points.append(ProfilePoint(t, b, latency))
            b *= 2
    return Profile(tuple(points))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cores", type=int, default=128)
    ap.add_argument("--max-batch", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()

    profile = synthetic_profile(args.cores, args.max_batch)
    times = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        opt = Optimizer(profile, args.cores)
        results = [opt.plan(b) for b in range(1, args.max_batch + 1)]
        times.append(time.perf_counter() - start)
    med = statistics.median(times)
    print(f"profile: {len(profile.points)} points (t = 1..{args.cores}, b = 1..{args.max_batch} "
          f"powers of two)")
    print(f"fast DP, N = {args.cores}, every B = 1..{args.max_batch}: median {med:.3f} s "
          f"(min {min(times):.3f}, max {max(times):.3f}, {args.repeat} runs)")
    mean_speedup = statistics.mean(r.speedup for r in results if r.speedup)
    print(f"mean predicted speedup over one {args.cores}-thread instance: {mean_speedup:.3f}")

    # The textbook recurrence, for scale: N = 16, a few B.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from reference_dp import textbook_dp  # noqa: E402

    small = synthetic_profile(16, args.max_batch)
    table = small.table()
    fast16 = Optimizer(small, 16)
    for b in (16, 32, 64):
        start = time.perf_counter()
        slow = textbook_dp(table, 16, b)
        slow_s = time.perf_counter() - start
        assert abs(slow - fast16.plan(b).optimal.latency_ms) < 1e-9
        print(f"textbook DP, N = 16, one B = {b}: {slow_s:.2f} s (same optimum as the fast DP)")


if __name__ == "__main__":
    main()
