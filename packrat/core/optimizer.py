"""The optimizer: the plan of instances <threads, batch> that minimizes batch latency.

Pure code: a Profile and a core count in, Plans out; no I/O, no clock, no torch.

Model (ARCHITECTURE.md). L[t][b] is the measured latency of one instance with t threads serving
b inputs. A batch that was not profiled costs the smallest profiled batch at or above it, at the
same t. A plan is a multiset of instances (t_k, b_k) with sum t_k <= N and sum b_k = B; its
latency is that of its slowest instance. We also take a smaller batch to be never slower than a
larger one at the same t (it could be padded up), so L is replaced by its running minimum from
the right: L'[t][b] = min over profiled q >= b of L[t][q]. Measured profiles are monotone up to
noise; the anchor figures of the published profiles are unchanged by it.

Algorithm. The textbook DP over (threads, batch) of ARCHITECTURE.md costs O(N^2 B P) per B.
We solve the same problem for every B at once by turning it around: for a latency bound lam,
an instance of t' threads can serve any batch up to g(lam, t') = the largest profiled batch
with L'[t'] <= lam (L' is monotone, so every smaller batch is servable too), and N cores serve
any total up to

    cap(lam, 0) = 0,   cap(lam, t) = max over 1 <= t' <= t of cap(lam, t - t') + g(lam, t')

(an unbounded knapsack over threads; g = 0 stands for cores left idle). cap(lam, N) grows with
lam, so the optimal latency for B is the smallest measured latency lam with cap(lam, N) >= B:
one binary search. The table is computed for all candidate lam at once with numpy, O(Lam N^2)
with Lam <= (number of profiled points); back-pointers per (lam, t) rebuild the plan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from packrat.core.plan import describe
from packrat.core.profile import MAX_THREADS, Profile
from packrat.errors import PlanError

# The solve costs O(points x N^2) time and an N x max_batch table: 1024 cores take well under
# a second; a mistyped 100000000 would take the machine's memory instead.
MAX_CORES = MAX_THREADS


@dataclass(frozen=True)
class Instance:
    threads: int
    batch: int

    def to_json(self) -> dict:
        return {"threads": self.threads, "batch": self.batch}


@dataclass(frozen=True)
class Plan:
    """Instances run side by side, each on its own cores; latency is the slowest one's."""

    instances: tuple[Instance, ...]
    latency_ms: float

    @property
    def batch(self) -> int:
        return sum(i.batch for i in self.instances)

    @property
    def cores(self) -> int:
        return sum(i.threads for i in self.instances)

    @property
    def servable(self) -> bool:
        """True when TorchServe can serve it as one version: one thread count for all."""
        return len({i.threads for i in self.instances}) <= 1

    def describe(self) -> str:
        groups: dict[tuple[int, int], int] = {}
        for i in self.instances:
            groups[(i.threads, i.batch)] = groups.get((i.threads, i.batch), 0) + 1
        parts = [describe(n, t, b) for (t, b), n in groups.items()]
        return " + ".join(parts)

    def to_json(self) -> dict:
        return {
            "instances": [i.to_json() for i in self.instances],
            "latency_ms": round(self.latency_ms, 4),
        }


@dataclass(frozen=True)
class PlanResult:
    """The optimum for one B, the plan TorchServe can serve, and the all-cores baseline."""

    batch: int
    cores: int
    optimal: Plan
    served: Plan | None  # None when no single thread count serves B
    baseline_latency_ms: float | None  # None when one instance cannot serve B
    baseline_threads: int

    @property
    def speedup(self) -> float | None:
        if self.baseline_latency_ms is None:
            return None
        return self.baseline_latency_ms / self.optimal.latency_ms

    @property
    def served_speedup(self) -> float | None:
        if self.baseline_latency_ms is None or self.served is None:
            return None
        return self.baseline_latency_ms / self.served.latency_ms

    def to_json(self) -> dict:
        def rnd(x):
            return None if x is None else round(x, 4)

        return {
            "batch": self.batch,
            "cores": self.cores,
            "optimal": self.optimal.to_json(),
            "served": None if self.served is None else self.served.to_json(),
            "baseline_latency_ms": rnd(self.baseline_latency_ms),
            "baseline_threads": self.baseline_threads,
            "speedup": rnd(self.speedup),
        }


class Optimizer:
    """Precomputes the optimum for every B a profile can serve on `cores` cores.

    Construction does the work (well under a second for N = 128, B up to 1024); `plan(B)`
    then only rebuilds the plan.
    """

    def __init__(self, profile: Profile, cores: int) -> None:
        if not isinstance(cores, int) or cores < 1:
            raise PlanError(f"cores must be an integer >= 1, got {cores!r}")
        if cores > MAX_CORES:
            raise PlanError(f"cores {cores} is more than Packrat plans for; give --cores 1..{MAX_CORES}")
        self.cores = cores
        self.profile = profile  # for the optimizer of fewer cores (a model's share)
        table = profile.table()
        self.threads = tuple(t for t in sorted(table) if t <= cores)
        if not self.threads:
            raise PlanError(
                f"the profile has no thread count <= {cores} cores (smallest is "
                f"{min(table)}); profile with fewer threads or plan for more cores"
            )
        self.max_batch = max(b for t in self.threads for b in table[t])
        # lat[t, b]: latency of one instance with t threads serving b inputs (b = 0..max_batch),
        # inf where t is not profiled or b is beyond its largest profiled batch.
        lat = np.full((cores + 1, self.max_batch + 1), np.inf)
        for t in self.threads:
            row = table[t]
            best = np.inf
            for b in sorted(row, reverse=True):  # running minimum from the right
                best = min(best, row[b])
                lat[t, 1 : b + 1] = best
        lat[:, 0] = 0.0
        self._lat = lat
        self._solve(table)
        self._solve_served()

    # -- the exact optimum ------------------------------------------------------------------

    def _solve(self, table: dict[int, dict[int, float]]) -> None:
        n = self.cores
        lams = np.unique(self._lat[1:, 1:][np.isfinite(self._lat[1:, 1:])])
        # g[k, t]: the largest batch one t-thread instance serves within latency lams[k].
        g = np.zeros((len(lams), n + 1), dtype=np.int64)
        for t in self.threads:
            finite = np.isfinite(self._lat[t])
            row = self._lat[t, finite]  # non-decreasing in b, starting at b = 0
            # number of b in 1.. with row[b] <= lam is the largest servable b (row is monotone)
            g[:, t] = np.searchsorted(row, lams, side="right") - 1
        cap = np.zeros((len(lams), n + 1), dtype=np.int64)
        choice = np.zeros((len(lams), n + 1), dtype=np.int64)
        for t in range(1, n + 1):
            # vals[:, j] = cap[:, t - (j + 1)] + g[:, j + 1] for t' = j + 1 = 1..t
            vals = cap[:, t - 1 :: -1][:, :t] + g[:, 1 : t + 1]
            j = np.argmax(vals, axis=1)
            cap[:, t] = vals[np.arange(len(lams)), j]
            choice[:, t] = j + 1
        self._lams, self._g, self._cap, self._choice = lams, g, cap, choice
        self.max_servable = int(cap[-1, n])

    def _optimal(self, batch: int) -> Plan:
        k = int(np.searchsorted(self._cap[:, self.cores], batch, side="left"))
        instances: list[list[int]] = []
        t = self.cores
        while t > 0:
            tp = int(self._choice[k, t])
            b = int(self._g[k, tp])
            if b > 0:
                instances.append([tp, b])
            t -= tp
        # The instances serve up to cap >= B: take the excess off the smallest shares last in
        # line, as TorchServe's queue does (it hands out full batches, then the remainder).
        instances.sort(key=lambda x: (-x[1], -x[0]))
        excess = sum(b for _, b in instances) - batch
        for inst in reversed(instances):
            take = min(excess, inst[1])
            inst[1] -= take
            excess -= take
        kept = tuple(Instance(t, b) for t, b in instances if b > 0)
        return Plan(kept, self._plan_latency(kept))

    def _plan_latency(self, instances) -> float:
        return max(float(self._lat[t, b]) for t, b in {(i.threads, i.batch) for i in instances})

    # -- what TorchServe can serve -------------------------------------------------------------

    def _solve_served(self) -> None:
        """Candidates for the best plan with one thread count t for i instances: a TorchServe
        version with batch_size s = ceil(B / i), whose queue hands out s, s, ..., remainder."""
        pairs = [(t, i) for t in self.threads for i in range(1, self.cores // t + 1)]
        # ordered by t, then i: argmin keeps the first of equal latencies (fewest threads)
        self._served_t = np.array([t for t, _ in pairs], dtype=np.int64)
        self._served_i = np.array([i for _, i in pairs], dtype=np.int64)

    def _served_plan(self, batch: int) -> Plan | None:
        s = -(-batch // self._served_i)
        lat = np.where(
            s <= self.max_batch, self._lat[self._served_t, np.minimum(s, self.max_batch)], np.inf
        )
        k = int(np.argmin(lat))
        if not math.isfinite(lat[k]):
            return None
        t, size = int(self._served_t[k]), int(s[k])
        sizes = [size] * (batch // size) + ([batch % size] if batch % size else [])
        return Plan(tuple(Instance(t, b) for b in sizes), float(lat[k]))

    # -- public -------------------------------------------------------------------------------

    def latency(self, threads: int, batch: int) -> float:
        """Predicted latency of one instance with `threads` threads serving `batch` (inf when
        the profile cannot serve it)."""
        if not (1 <= threads <= self.cores and 0 <= batch <= self.max_batch):
            return math.inf
        return float(self._lat[threads, batch])

    def plan(self, batch: int) -> PlanResult:
        if not isinstance(batch, int) or batch < 1:
            raise PlanError(f"batch size must be an integer >= 1, got {batch!r}")
        if batch > self.max_servable:
            raise PlanError(
                f"batch size {batch} cannot be served on {self.cores} cores with this profile: "
                f"the largest servable batch is {self.max_servable} (profiled batches go up "
                f"to {self.max_batch}); profile with a larger --max-batch"
            )
        optimal = self._optimal(batch)
        served = self._served_plan(batch)
        base_t = self.threads[-1]
        base = float(self._lat[base_t, batch]) if batch <= self.max_batch else math.inf
        return PlanResult(
            batch=batch,
            cores=self.cores,
            optimal=optimal,
            served=served,
            baseline_latency_ms=base if math.isfinite(base) else None,
            baseline_threads=base_t,
        )


def mean_speedup(profile: Profile, cores: int, batches) -> float:
    """Mean of baseline / optimal latency over the given batch sizes."""
    opt = Optimizer(profile, cores)
    ratios = [opt.plan(b).speedup for b in batches]
    if any(r is None for r in ratios):
        raise PlanError("the baseline cannot serve every batch size asked for")
    return sum(ratios) / len(ratios)
