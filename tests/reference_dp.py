"""Slow, obviously-correct planners used as oracles for packrat.core.optimizer in tests."""

from __future__ import annotations

import math
from functools import lru_cache


def cost(table: dict[int, dict[int, float]], t: int, b: int) -> float:
    """Latency of one t-thread instance serving b: the smallest profiled batch >= b, made
    monotone (a smaller batch is never slower), as packrat.core.optimizer defines it."""
    row = table.get(t, {})
    above = [row[q] for q in row if q >= b]
    return min(above) if above else math.inf


def brute_force(table, cores: int, batch: int) -> float:
    """Enumerate every multiset of instances (t, b) with sum t <= cores, sum b = batch."""
    threads = sorted(table)

    @lru_cache(maxsize=None)
    def best(cores_left: int, batch_left: int, min_t: int, min_b: int) -> float:
        # instances are taken in non-decreasing (t, b) order so each multiset is seen once
        if batch_left == 0:
            return 0.0
        out = math.inf
        for t in threads:
            if t < min_t or t > cores_left:
                continue
            for b in range(1, batch_left + 1):
                if (t, b) < (min_t, min_b):
                    continue
                c = cost(table, t, b)
                if c >= out:
                    continue
                rest = best(cores_left - t, batch_left - b, t, b)
                out = min(out, max(c, rest))
        return out

    return best(cores, batch, 0, 0)


def textbook_dp(table, cores: int, batch: int) -> float:
    """The recurrence of ARCHITECTURE.md, O(N^2 B^2), on the raw table (no monotone envelope).

    opt[t][0] = 0
    opt[t][b] = min(opt[t-1][b], min over t', b' of max(opt[t-t'][b-b'], L[t'][b']))
    """
    def raw(t, b):
        row = table.get(t, {})
        above = [q for q in row if q >= b]
        return row[min(above)] if above else math.inf

    opt = [[math.inf] * (batch + 1) for _ in range(cores + 1)]
    for t in range(cores + 1):
        opt[t][0] = 0.0
    for t in range(1, cores + 1):
        for b in range(1, batch + 1):
            v = opt[t - 1][b]
            for tp in range(1, t + 1):
                for bp in range(1, b + 1):
                    v = min(v, max(opt[t - tp][b - bp], raw(tp, bp)))
            opt[t][b] = v
    return opt[cores][batch]


def best_served(table, cores: int, batch: int) -> float:
    """One thread count t, i instances, TorchServe batch_size ceil(B / i)."""
    out = math.inf
    for t in table:
        for i in range(1, cores // t + 1):
            out = min(out, cost(table, t, -(-batch // i)))
    return out
