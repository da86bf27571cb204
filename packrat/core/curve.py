"""L(B, n) for every core count n: the latency of the plan TorchServe can serve (one thread
count) for batch B on n cores, from one Optimizer over all the cores. The allocator
(packrat/core/allocate.py) weighs core splits with it.

Pure code: no I/O, no clock.
"""

from __future__ import annotations

import math

from packrat.core.optimizer import Instance, Optimizer, Plan
from packrat.core.profile import Profile
from packrat.errors import PlanError


class ServedCurve:
    """L(B, n) for n = 1..cores: the plan TorchServe can serve for B on n cores.

    `Optimizer(profile, n).plan(B).served` picks, among the (threads t, instances i) with
    t <= n and t * i <= n, ordered by t then i, the first of the least latency of one t-thread
    instance serving ceil(B / i). The latency table is the same for every n (a thread count
    above n is simply not a candidate), so one Optimizer over all N cores answers every n: the
    candidates of n are those of n - 1 plus the pairs with t * i = n, and a running minimum
    over n, keyed (latency, t, i), keeps the Optimizer's tie order. tests/test_allocate.py
    checks it against an Optimizer per n.
    """

    def __init__(self, optimizer: Optimizer) -> None:
        self.optimizer = optimizer
        self.cores = optimizer.cores
        self._pairs_by_cores: list[list[tuple[int, int]]] = [[] for _ in range(self.cores + 1)]
        for t in optimizer.threads:
            for i in range(1, self.cores // t + 1):
                self._pairs_by_cores[t * i].append((t, i))
        self._cache: dict[int, tuple[Plan | None, ...]] = {}

    @classmethod
    def of(cls, profile: Profile, cores: int) -> ServedCurve:
        return cls(Optimizer(profile, cores))

    def plans(self, batch: int) -> tuple[Plan | None, ...]:
        """Index n = 0..cores: the served plan for `batch` on n cores; None where no plan with
        one thread count serves it (always at n = 0)."""
        if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
            raise PlanError(f"batch size must be an integer >= 1, got {batch!r}")
        cached = self._cache.get(batch)
        if cached is not None:
            return cached
        opt = self.optimizer
        out: list[Plan | None] = [None]
        best: tuple[float, int, int] | None = None
        plan: Plan | None = None
        for n in range(1, self.cores + 1):
            for t, i in self._pairs_by_cores[n]:
                lat = opt.latency(t, -(-batch // i))
                if math.isfinite(lat) and (best is None or (lat, t, i) < best):
                    best = (lat, t, i)
                    plan = _served_plan(batch, t, i, lat)
            out.append(plan)
        result = tuple(out)
        self._cache[batch] = result
        return result

    def plan(self, batch: int, cores: int) -> Plan | None:
        """The served plan for `batch` on `cores` cores (None: none serves it)."""
        if not isinstance(cores, int) or not 1 <= cores <= self.cores:
            raise PlanError(f"cores must be an integer in 1..{self.cores}, got {cores!r}")
        return self.plans(batch)[cores]

    def latency(self, batch: int, cores: int) -> float:
        """L(batch, cores); inf where no served plan exists."""
        plan = self.plan(batch, cores)
        return math.inf if plan is None else plan.latency_ms

    def largest_batch(self, cores: int | None = None) -> int:
        """The largest B a served plan takes on `cores` cores (default all): i instances of t
        threads take up to i times the largest batch one t-thread instance takes."""
        cores = self.cores if cores is None else cores
        best = 0
        for t in self.optimizer.threads:
            if t <= cores:
                best = max(best, self._largest_instance_batch(t) * (cores // t))
        return best

    def _largest_instance_batch(self, threads: int) -> int:
        # latency(t, b) is finite exactly for b up to t's largest profiled batch
        lo, hi = 0, self.optimizer.max_batch
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if math.isfinite(self.optimizer.latency(threads, mid)):
                lo = mid
            else:
                hi = mid - 1
        return lo


def _served_plan(batch: int, threads: int, instances: int, latency: float) -> Plan:
    """The version's queue hands out batches of ceil(B / i), then the remainder (as
    Optimizer's served plan does)."""
    size = -(-batch // instances)
    sizes = [size] * (batch // size) + ([batch % size] if batch % size else [])
    return Plan(tuple(Instance(threads, b) for b in sizes), latency)
