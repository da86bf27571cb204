"""The allocator: how many dedicated cores each model of a server gets, and its plan there.

Pure code: served-latency curves and demands in, an Allocation out; no I/O, no clock.

Model (issue 12). Model m is served by one TorchServe version on n_m dedicated cores; its batch
latency is L_m(B_m, n) = the latency of the best *served* plan (one thread count) for its batch
B_m on n cores, `Optimizer(profile, n).plan(B).served` (ServedCurve, packrat/core/curve.py).
A busy model (B_m >= 1) gets n_m >= 1 cores, sum n_m <= N; an idle model (B_m = 0) gets none
(it answers from a shared core, outside this arithmetic). The objective, in this order:

1. if every SLO can be met (L_m <= SLO_m), meet them all; if not, minimize the worst ratio
   R = max_m L_m / SLO_m (the models without an SLO are unconstrained);
2. then minimize the request-weighted mean batch latency sum B_m L_m / sum B_m;
3. among equal objectives, use fewer cores; the rest are spare.

Algorithm. L_m is non-increasing in n (n + 1 cores allow every plan of n), so for a ratio bound
R model m needs at least need_m(R) = min { n : L_m(n) <= R SLO_m } cores, and R is achievable
iff sum need_m(R) <= N. That is monotone in R, and the optimal R* is one of the ratios
L_m(n) / SLO_m: a binary search over them. With the bound T = max(1, R*) fixed (1 when every
SLO can be met), step 2 is a knapsack over models x cores: dp[k][c] = the least sum B_m L_m of
the first k models on exactly c cores, each model m at n >= need_m(T); the answer is the
smallest c whose dp[K][c] ties the least dp[K][.]; back-pointers rebuild the split.
O(K N^2) with numpy over c; tests/test_allocate.py checks it against brute force.

Floating point: every comparison that decides (an SLO met, a ratio within the bound, two
weighted sums equal) goes through `within`, one relative tolerance, so a tie decided one way
in one step is decided the same way in the next.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from packrat.core.curve import ServedCurve
from packrat.core.optimizer import Plan
from packrat.errors import PlanError

# Two latencies (or ratios, or weighted sums) this close, relative to the larger, are equal.
# Far below the profile's noise, far above float rounding of sums of a few hundred terms.
REL_TOL = 1e-9


def within(a: float, b: float) -> bool:
    """a <= b, counting a difference within REL_TOL of b as a tie."""
    return a <= b + REL_TOL * abs(b)


def _positive_ms(x) -> bool:
    return (isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
            and x > 0)


# -- inputs and outputs ----------------------------------------------------------------------

@dataclass(frozen=True)
class ModelDemand:
    """One model of the server: its curve, its batch B (0: idle) and optional SLO (ms, on the
    batch latency)."""

    name: str
    curve: ServedCurve
    batch: int
    slo_ms: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise PlanError(f"a model name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.batch, int) or isinstance(self.batch, bool) or self.batch < 0:
            raise PlanError(f"model {self.name}: batch must be an integer >= 0 (0: idle), got "
                            f"{self.batch!r}")
        if self.slo_ms is not None and not _positive_ms(self.slo_ms):
            raise PlanError(f"model {self.name}: the SLO must be a positive number of ms, got "
                            f"{self.slo_ms!r}")

    @property
    def busy(self) -> bool:
        return self.batch > 0


@dataclass(frozen=True)
class ModelAllocation:
    """What one model gets: `cores` dedicated cores and its served plan there; an idle model
    gets none (cores 0, plan None: it answers from the shared core)."""

    name: str
    batch: int
    cores: int
    plan: Plan | None
    slo_ms: float | None = None

    @property
    def shared(self) -> bool:
        return self.cores == 0

    @property
    def latency_ms(self) -> float | None:
        return None if self.plan is None else self.plan.latency_ms

    @property
    def slo_ratio(self) -> float | None:
        """latency / SLO; None without an SLO or for an idle model."""
        if self.plan is None or self.slo_ms is None:
            return None
        return self.plan.latency_ms / self.slo_ms

    @property
    def slo_met(self) -> bool | None:
        """None where there is nothing to judge (no SLO, or idle)."""
        ratio = self.slo_ratio
        return None if ratio is None else within(ratio, 1.0)

    def to_json(self) -> dict:
        return {
            "batch": self.batch,
            "cores": self.cores,
            "shared": self.shared,
            "slo_ms": None if self.slo_ms is None else float(self.slo_ms),
            "slo_met": self.slo_met,
            "plan": None if self.plan is None else self.plan.to_json(),
        }


@dataclass(frozen=True)
class SloMiss:
    """A busy model whose plan is slower than its SLO."""

    name: str
    latency_ms: float
    slo_ms: float

    @property
    def ratio(self) -> float:
        return self.latency_ms / self.slo_ms

    @property
    def over_ms(self) -> float:
        return self.latency_ms - self.slo_ms

    def describe(self) -> str:
        return (f"{self.name}: {self.latency_ms:.1f} ms against an SLO of {self.slo_ms:g} ms "
                f"(+{self.over_ms:.1f} ms, {self.ratio:.2f}x)")

    def to_json(self) -> dict:
        return {"model": self.name, "latency_ms": round(self.latency_ms, 4),
                "slo_ms": float(self.slo_ms), "ratio": round(self.ratio, 4),
                "over_ms": round(self.over_ms, 4)}


@dataclass(frozen=True)
class Allocation:
    """Cores per model on a budget of `cores`; models in the order they were given."""

    cores: int
    models: tuple[ModelAllocation, ...]

    @property
    def spare_cores(self) -> int:
        return self.cores - sum(m.cores for m in self.models)

    @property
    def busy(self) -> tuple[ModelAllocation, ...]:
        return tuple(m for m in self.models if m.plan is not None)

    @property
    def weighted_latency_ms(self) -> float | None:
        """sum B_m L_m / sum B_m over the busy models; None when none is busy."""
        busy = self.busy
        if not busy:
            return None
        return sum(m.batch * m.plan.latency_ms for m in busy) / sum(m.batch for m in busy)

    @property
    def worst_slo_ratio(self) -> float | None:
        """The largest latency / SLO over the busy models with an SLO; None when none has one."""
        ratios = [m.slo_ratio for m in self.busy if m.slo_ratio is not None]
        return max(ratios) if ratios else None

    @property
    def missed(self) -> tuple[SloMiss, ...]:
        return tuple(SloMiss(m.name, m.plan.latency_ms, m.slo_ms)
                     for m in self.busy if m.slo_met is False)

    @property
    def slo_feasible(self) -> bool:
        """Every busy model with an SLO meets it (true when none has one)."""
        return not self.missed

    def model(self, name: str) -> ModelAllocation:
        for m in self.models:
            if m.name == name:
                return m
        raise PlanError(f"no model {name!r} in the allocation "
                        f"({', '.join(m.name for m in self.models)})")

    def to_json(self) -> dict:
        weighted = self.weighted_latency_ms
        worst = self.worst_slo_ratio
        return {
            "cores": self.cores,
            "spare_cores": self.spare_cores,
            "slo_feasible": self.slo_feasible,
            "weighted_latency_ms": None if weighted is None else round(weighted, 4),
            "worst_slo_ratio": None if worst is None else round(worst, 4),
            "missed": [m.to_json() for m in self.missed],
            "models": {m.name: m.to_json() for m in self.models},
        }


# -- the allocation --------------------------------------------------------------------------

def allocate(demands: Sequence[ModelDemand], cores: int) -> Allocation:
    """The exact allocation of `cores` cores to the models (objective in the module doc)."""
    _check(demands, cores)
    busy = [d for d in demands if d.busy]
    lat = {d.name: _latencies(d, cores) for d in busy}
    _check_servable(busy, lat, cores)

    bound = _ratio_bound(busy, lat, cores)
    need = [_need(d, lat[d.name], bound) for d in busy]
    split = _least_weighted(busy, lat, need, cores)
    given = dict(zip((d.name for d in busy), split))
    return _allocation(demands, given, cores)


def _check(demands: Sequence[ModelDemand], cores: int) -> None:
    if not isinstance(cores, int) or isinstance(cores, bool) or cores < 1:
        raise PlanError(f"cores must be an integer >= 1, got {cores!r}")
    seen: set[str] = set()
    for d in demands:
        if d.name in seen:
            raise PlanError(f"model {d.name} is given twice; name each model once")
        seen.add(d.name)
        if d.curve.cores < cores:
            raise PlanError(f"model {d.name}: its curve covers {d.curve.cores} cores, not "
                            f"{cores}; build it for {cores}")
    busy = sum(1 for d in demands if d.busy)
    if busy > cores:
        raise PlanError(f"{busy} busy models need a dedicated core each but there are only "
                        f"{cores} cores: give more cores or make some models idle (B = 0)")


def _latencies(d: ModelDemand, cores: int) -> np.ndarray:
    """L(B, n) for n = 0..cores, inf where no served plan exists."""
    plans = d.curve.plans(d.batch)[: cores + 1]
    return np.array([math.inf if p is None else p.latency_ms for p in plans])


def _check_servable(busy: list[ModelDemand], lat: dict[str, np.ndarray], cores: int) -> None:
    fewest = {}
    for d in busy:
        finite = np.flatnonzero(np.isfinite(lat[d.name]))
        if not len(finite):
            raise PlanError(
                f"model {d.name}: B={d.batch} cannot be served on {cores} cores by one thread "
                f"count (the largest servable batch is {d.curve.largest_batch(cores)}); lower "
                f"B or profile with a larger --max-batch")
        fewest[d.name] = int(finite[0])
    if sum(fewest.values()) > cores:
        needs = ", ".join(f"{name} {n}" for name, n in fewest.items())
        raise PlanError(f"the busy models need {sum(fewest.values())} cores to serve their "
                        f"batches at all ({needs}) but there are {cores}: give more cores, "
                        f"lower B or make some models idle (B = 0)")


def _need(d: ModelDemand, lat: np.ndarray, bound: float) -> int:
    """The fewest cores on which d serves its batch within `bound` x its SLO (or at all, without
    an SLO); len(lat) when no n does."""
    for n in range(1, len(lat)):
        if math.isfinite(lat[n]) and (d.slo_ms is None or within(lat[n] / d.slo_ms, bound)):
            return n
    return len(lat)


def _ratio_bound(busy: list[ModelDemand], lat: dict[str, np.ndarray], cores: int) -> float:
    """T = max(1, R*): 1 when every SLO can be met, else the least achievable worst ratio."""
    slo = [d for d in busy if d.slo_ms is not None]
    if not slo:
        return 1.0

    def achievable(r: float) -> bool:
        return sum(_need(d, lat[d.name], r) for d in busy) <= cores

    if achievable(1.0):
        return 1.0
    # R* is the ratio of some model on some n: the least candidate that is achievable.
    candidates = sorted({float(x / d.slo_ms) for d in slo for x in lat[d.name][1:]
                         if math.isfinite(x) and x > d.slo_ms})
    lo, hi = 0, len(candidates) - 1  # the largest is achievable: every model at its fewest
    while lo < hi:
        mid = (lo + hi) // 2
        if achievable(candidates[mid]):
            hi = mid
        else:
            lo = mid + 1
    return candidates[lo]


def _least_weighted(busy: list[ModelDemand], lat: dict[str, np.ndarray], need: list[int],
                    cores: int) -> list[int]:
    """Cores per busy model: least sum B_m L_m with n_m >= need_m, then fewest cores."""
    inf = math.inf
    dp = np.full(cores + 1, inf)  # dp[c]: least weighted sum on exactly c cores so far
    dp[0] = 0.0
    back = []  # back[k][c]: the cores model k takes when the first k + 1 models use c
    for d, lo in zip(busy, need):
        cost = d.batch * lat[d.name]
        new = np.full(cores + 1, inf)
        pick = np.zeros(cores + 1, dtype=np.int64)
        for n in range(lo, cores + 1):  # ascending: on an exact tie the smaller n stays
            if not math.isfinite(cost[n]):
                continue
            cand = np.full(cores + 1, inf)
            cand[n:] = dp[: cores + 1 - n] + cost[n]
            better = cand < new
            new[better] = cand[better]
            pick[better] = n
        dp = new
        back.append(pick)
    least = float(np.min(dp))
    total = next(c for c in range(cores + 1) if within(float(dp[c]), least))
    split = [0] * len(busy)
    for k in range(len(busy) - 1, -1, -1):
        split[k] = int(back[k][total])
        total -= split[k]
    return split


def _allocation(demands: Sequence[ModelDemand], given: dict[str, int], cores: int) -> Allocation:
    out = []
    for d in demands:
        n = given.get(d.name, 0)
        plan = d.curve.plan(d.batch, n) if d.busy else None
        out.append(ModelAllocation(d.name, d.batch, n, plan, d.slo_ms))
    return Allocation(cores, tuple(out))


# -- fixed splits, for comparison ------------------------------------------------------------

def evaluate_split(demands: Sequence[ModelDemand], split: Sequence[int],
                   cores: int) -> Allocation:
    """The Allocation of a given split (cores per model, in the order of `demands`)."""
    _check(demands, cores)
    if len(split) != len(demands):
        raise PlanError(f"the split names {len(split)} models, not {len(demands)}")
    for d, n in zip(demands, split):
        if (d.busy and n < 1) or (not d.busy and n != 0):
            raise PlanError(f"model {d.name}: {n} cores for B={d.batch}; a busy model needs "
                            f">= 1, an idle one 0")
        if d.busy and d.curve.plan(d.batch, n) is None:
            raise PlanError(f"model {d.name}: no served plan takes B={d.batch} on {n} cores")
    if sum(split) > cores:
        raise PlanError(f"the split uses {sum(split)} cores, more than {cores}")
    return _allocation(demands, {d.name: n for d, n in zip(demands, split)}, cores)


def even_split(demands: Sequence[ModelDemand], cores: int) -> tuple[int, ...]:
    """N / K cores per busy model; the remainder one each to the busiest (B, then order)."""
    _check(demands, cores)
    busy = [k for k, d in enumerate(demands) if d.busy]
    split = [0] * len(demands)
    if not busy:
        return tuple(split)
    for k in busy:
        split[k] = cores // len(busy)
    for k in sorted(busy, key=lambda k: -demands[k].batch)[: cores % len(busy)]:
        split[k] += 1
    return tuple(split)


def proportional_split(demands: Sequence[ModelDemand], cores: int) -> tuple[int, ...]:
    """Cores in proportion to B (the load), by largest remainder, each busy model >= 1."""
    _check(demands, cores)
    busy = [k for k, d in enumerate(demands) if d.busy]
    split = [0] * len(demands)
    if not busy:
        return tuple(split)
    total = sum(demands[k].batch for k in busy)
    quota = {k: cores * demands[k].batch / total for k in busy}
    for k in busy:
        split[k] = max(1, math.floor(quota[k]))
    # The floor of 1 can overshoot: take back from those furthest over their quota.
    while sum(split) > cores:
        k = max((k for k in busy if split[k] > 1), key=lambda k: (split[k] - quota[k], -k))
        split[k] -= 1
    # Hamilton's rule: the cores left go to the largest remainders (ties: the order given).
    while sum(split) < cores:
        k = max(busy, key=lambda k: (quota[k] - split[k], -k))
        split[k] += 1
    return tuple(split)


# -- the cost view (Harpagon): what a latency target costs in cores --------------------------

@dataclass(frozen=True)
class SloCost:
    """The fewest cores n <= N whose served plan serves B within the SLO, and that plan; or,
    when no n does (cores None), the best latency on N cores and the fewest cores giving it."""

    batch: int
    slo_ms: float
    cores: int | None
    plan: Plan | None
    best_latency_ms: float
    best_cores: int

    @property
    def met(self) -> bool:
        return self.cores is not None

    def to_json(self) -> dict:
        return {
            "slo_ms": float(self.slo_ms),
            "met": self.met,
            "cores": self.cores,
            "plan": None if self.plan is None else self.plan.to_json(),
            "best_latency_ms": round(self.best_latency_ms, 4),
            "best_cores": self.best_cores,
        }


def cores_for_slo(curve: ServedCurve, batch: int, slo_ms: float,
                  cores: int | None = None) -> SloCost:
    """What serving `batch` within `slo_ms` costs in cores (up to `cores`, default the
    curve's)."""
    cores = curve.cores if cores is None else cores
    if not isinstance(cores, int) or not 1 <= cores <= curve.cores:
        raise PlanError(f"cores must be an integer in 1..{curve.cores}, got {cores!r}")
    if not _positive_ms(slo_ms):
        raise PlanError(f"the SLO must be a positive number of ms, got {slo_ms!r}")
    plans = curve.plans(batch)[: cores + 1]
    if plans[cores] is None:
        raise PlanError(f"B={batch} cannot be served on {cores} cores by one thread count (the "
                        f"largest servable batch is {curve.largest_batch(cores)})")
    best = plans[cores].latency_ms
    best_cores = next(n for n in range(1, cores + 1)
                      if plans[n] is not None and within(plans[n].latency_ms, best))
    for n in range(1, cores + 1):
        if plans[n] is not None and within(plans[n].latency_ms, slo_ms):
            return SloCost(batch, slo_ms, n, plans[n], best, best_cores)
    return SloCost(batch, slo_ms, None, None, best, best_cores)
