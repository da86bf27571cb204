"""Several models on one server's cores (`--core-split`): where each model is placed at start,
and, with the allocator (`auto`), the reallocations the controller carries out. The choices
are packrat.core.reallocate's; this holds the server's side of them (its cores, the last
allocation for status, the hold after a move) and turns a decision into switches."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace

from packrat.core.allocate import ModelDemand, even_split
from packrat.core.curve import ServedCurve
from packrat.core.decide import OVERLOAD_UTILIZATION, Reason, SwitchTo
from packrat.core.optimizer import Optimizer
from packrat.core.plan import ServedPlan, Shape, shape_of
from packrat.core.policy import (
    batch_for_rate,
    capacity_rps,
    manual_plan,
    plan_for_batch,
    plan_of_shape,
    served_latency,
)
from packrat.core.reallocate import ModelLoad, Reallocation, idle_line, if_woken, reallocate
from packrat.core.switchcost import expected_stay_s, judge_switch
from packrat.errors import PackratError, PlanError
from packrat.serving.runtime import ControllerParams, CoreSplit, ModelRuntime

log = logging.getLogger(__name__)

# A wake-up's move waits at most this long for a falling model to go idle or steady (an EWMA
# of weight 0.3 falls from 195 to under 15 requests/s, small-cnn's idle line, in 7 intervals).
WAKE_WAIT_S = 10.0


class CoreBudget:
    def __init__(self, params: ControllerParams) -> None:
        self.params = params
        self.cores: tuple[int, ...] = ()      # every core of the server; () until placed
        self.last: dict | None = None         # the last reallocation, for status
        self.hold_until = 0.0                 # loads settle after a move before the next
        self.waiting_since: float | None = None  # a wake-up's move waits for a falling model
        self.curves: dict[str, ServedCurve] = {}  # L(B, n) per model, for the allocator

    @property
    def split(self) -> CoreSplit:
        return self.params.core_split

    def live(self, models: dict[str, ModelRuntime]) -> bool:
        """Reallocations are weighed: the allocator, several models, placed."""
        return self.split is CoreSplit.AUTO and len(models) > 1 and bool(self.cores)

    def place(self, models: dict[str, ModelRuntime], cores: tuple[int, ...], now: float,
              wall: float) -> None:
        """Give every model its cores before anything serves (at start-up): the allocator's
        split for B = each model's estimate (all busy: nothing is measured yet), an even
        split, or all cores for every model (overlap, or a single model)."""
        self.cores = cores
        for m in models.values():
            m.whole = m.whole or m.optimizer
        if len(models) < 2 or self.split is CoreSplit.OVERLAP:
            return
        if self.split is CoreSplit.EVEN:
            counts = even_split([ModelDemand(m.name, self.curve(m), 1)
                                 for m in models.values()], len(cores))
            start = 0
            for m, n in zip(models.values(), counts):
                if n == 0:
                    raise PackratError(f"--core-split even: {len(models)} models on "
                                       f"{len(cores)} cores leave {m.name} none; give "
                                       "--core-split auto (idle models share a core) or more cores")
                move(m, cores[start:start + n], False)
                start += n
            return
        for m in models.values():
            m.cores = ()  # nothing placed yet
        r = self.weigh(models, now)
        for p in r.placements:
            move(models[p.name], p.cores, p.shared)
        self._record(r, models, wall)

    def weigh(self, models: dict[str, ModelRuntime], now: float,
              how=reallocate, **kw) -> Reallocation | None:
        costs = [m.stats.cost(warm=False) for m in models.values()]
        cost = max(costs, key=lambda c: c[0] * c[1])
        stay = min(expected_stay_s(m.levels, now) for m in models.values())
        loads = [ModelLoad(m.name, self.curve(m), m.estimator.estimate, m.estimator.rate,
                           m.slo_ms, () if m.shared else m.cores, m.shared, not m.auto,
                           m.estimator.slow_rate)
                 for m in models.values()]
        return how(loads, self.cores, min_gain=self.params.policy.min_gain,
                   stay_s=stay, cost=cost, **kw)

    def wake_plans(self, models: dict[str, ModelRuntime], now: float,
                   warm_shapes: Callable[[str, tuple[int, ...]], frozenset[Shape]]
                   ) -> dict[str, ServedPlan]:
        """The plans to load into standby ahead of need for the case that the idle models
        woke now (packrat.core.reallocate.if_woken):
        - per model that would give cores up, the plan it would serve on the cores it kept:
          its shrink is then a set-default (warm_instead), and the woken model gets its cores
          without waiting for a cold load on busy cores. Where a plan is in standby on those
          cores already, that one: B wavers, and each new B must not load another.
        - per idle model that has been busy before (above its busy line) and would wake on
          the core it shares now, its plan there for the rate it reached when last busy
          (woken_plan): its one 1-thread worker would queue that load while a cold switch
          loads (small-cnn woke at 276 requests/s on a worker that serves 161/s, and queued
          648 requests)."""
        if not self.live(models):
            return {}
        try:
            r = self.weigh(models, now, if_woken)
        except PlanError:
            return {}
        out = {}
        for p in r.placements if r is not None else ():
            m = models[p.name]
            if not m.auto or p.shared:
                continue
            if m.shared:
                # only while it is idle (one on its way up is moved by the reallocation), and
                # on the core it holds now (a standby version belongs to the cores it is
                # pinned to: one on other cores would be evicted at once)
                rate = m.estimator.rate
                if (m.busy_rate is None or tuple(p.cores) != m.cores or rate is None
                        or rate >= idle_line(m.optimizer)):
                    continue
                try:
                    out[m.name] = woken_plan(m, p.cores, 1)
                except PlanError:
                    pass
                continue
            if not set(p.cores) < set(m.cores):
                continue
            try:
                # for its arrivals where known: its B may be a backlog (after a cold switch
                # ResNet-50's B of 24 loaded 1x<t=1,b=24>; its rate needed b=1)
                plan = plan_on(m, p.cores, 1 if m.estimator.rate is not None else p.batch)
            except PlanError:
                continue
            warm = warm_shapes(m.name, p.cores)
            if warm and shape_of(plan) not in warm:
                plan = plan_of_shape(Optimizer(m.whole.profile, len(p.cores)), m.name,
                                     plan.version, min(warm), plan.for_batch, p.cores)
            out[m.name] = plan
        return out

    def reallocate(self, models: dict[str, ModelRuntime], now: float, wall: float,
                   warm_shapes: Callable[[str, tuple[int, ...]], frozenset[Shape]] =
                   lambda name, cores: frozenset()) -> list[SwitchTo]:
        """The switches of a reallocation worth carrying out (none if not), donors first:
        a receiver's switch names the donors it must wait for (their switches, drains and
        deletions), so no two models' dedicated workers share a core at any moment. A plan
        in standby on a model's new cores (warm_shapes) is taken where it serves as well
        (see warm_instead)."""
        if now < self.hold_until:
            return []
        waited = 0.0 if self.waiting_since is None else now - self.waiting_since
        try:
            r = self.weigh(models, now, wait_for_falling=waited < WAKE_WAIT_S)
        except PlanError as e:
            self.last = {**(self.last or {}), "last_error": str(e)}
            return []
        if r.waiting and self.waiting_since is None:
            self.waiting_since = now
            log.info("reallocation waits: %s", r.reason)
        elif not r.waiting:
            self.waiting_since = None
        if not r.changed:
            if self.last is not None:
                self.last["last_weighed"] = r.reason
            return []
        log.info("reallocating: %s", r.reason)
        self._record(r, models, wall)
        self.hold_until = now + self.params.realloc_hold_s
        actions = []
        for p in r.placements:
            m = models[p.name]
            if not m.auto or (tuple(p.cores) == m.cores and p.shared == m.shared):
                continue
            woke = m.shared and not p.shared
            move(m, p.cores, p.shared)
            try:
                plan = woken_plan(m, m.cores, p.batch) if woke else plan_for(m, p.batch)
            except PlanError as e:
                m.last_error = str(e)
                continue
            shapes = warm_shapes(m.name, m.cores)
            plan = warm_instead(m, plan, shapes, now, self.params.max_batch_delay_ms,
                                self.params.policy.min_gain,
                                donor=p.name in r.donors and bool(r.receivers)) or plan
            after = r.donors if p.name in r.receivers else ()
            actions.append(SwitchTo(plan, Reason.REALLOCATE, after=after,
                                    warm=shape_of(plan) in shapes, why=r.reason))
        return sorted(actions, key=lambda a: bool(a.after))

    def curve(self, m: ModelRuntime) -> ServedCurve:
        curve = self.curves.get(m.name)
        if curve is None or curve.optimizer is not m.whole:
            curve = self.curves[m.name] = ServedCurve(m.whole)
        return curve

    def _record(self, r: Reallocation, models: dict[str, ModelRuntime], wall: float) -> None:
        self.last = {
            "decided_unix": wall,
            "reason": r.reason,
            "inputs": {m.name: {"batch": m.estimator.estimate,
                                "rate_rps": None if m.estimator.rate is None
                                else round(m.estimator.rate, 2)}
                       for m in models.values()},
            "cores": list(self.cores),
            "shared_core": r.shared_core,
            "spare_cores": r.allocation.spare_cores,
            "crowded_out": list(r.crowded_out),
            "slo_feasible": r.allocation.slo_feasible,
        }

    def note(self, m: ModelRuntime, models: dict[str, ModelRuntime]) -> str:
        """Where m stands in the allocation, for a refused manual plan's message."""
        if len(models) < 2 or self.split is CoreSplit.OVERLAP:
            return ""
        where = (f"shares core {m.cores[0]} while idle" if m.shared
                 else f"holds cores {','.join(map(str, m.cores))}")
        others = "; ".join(f"{o.name} " + ("shared" if o.shared else
                                          f"cores {','.join(map(str, o.cores))}")
                           for o in models.values() if o is not m)
        return f"{m.name} {where} in the allocation; {others}"


def move(m: ModelRuntime, cores: tuple[int, ...], shared: bool) -> None:
    """m's cores (and so its optimizer: for those cores alone) are now these."""
    m.cores, m.shared = tuple(cores), shared
    m.optimizer = Optimizer(m.whole.profile, len(m.cores))


def plan_for(m: ModelRuntime, batch: int) -> ServedPlan:
    """The plan of a model placed on its cores: one 1-thread worker on the shared core, or
    the plan for B, or for the B its arrivals need there if more (its estimate may still
    describe its time on the shared core)."""
    version = str(m.next_version)
    if m.shared:
        return replace(manual_plan(m.optimizer, m.name, version, 1, 1, 1, m.cores),
                       shared=True)
    return plan_on(m, m.cores, batch)


def plan_on(m: ModelRuntime, cores: tuple[int, ...], batch: int, rate: float | None = None,
            utilization: float = OVERLOAD_UTILIZATION) -> ServedPlan:
    """plan_for on these dedicated cores, which m may not hold yet, for B or for the B that
    serves `rate` (default: its measured arrivals) within `utilization` of its capacity."""
    opt = m.optimizer if tuple(cores) == m.cores else Optimizer(m.whole.profile, len(cores))
    rate = m.estimator.rate if rate is None else rate
    batch = max(batch, batch_for_rate(opt, rate, cores, utilization))
    return plan_for_batch(opt, m.name, str(m.next_version), batch, cores)


# A woken model's plan leaves this share of its capacity for the queue it built on the shared
# core meanwhile: at 0.9, small-cnn's 4 s backlog (1,000 requests) took 20 s to drain.
WAKE_UTILIZATION = 0.7


def woken_plan(m: ModelRuntime, cores: tuple[int, ...], batch: int) -> ServedPlan:
    """The plan of a model that wakes up onto these cores: for the higher of its measured
    arrivals and those it reached when last busy (it wakes as soon as its rate crosses the
    busy line, while its load still rises: planned for that rate, it got the plan it already
    had, then a cold switch once its queue had grown), within WAKE_UTILIZATION."""
    rates = [r for r in (m.estimator.rate, m.busy_rate) if r is not None]
    return plan_on(m, cores, batch, max(rates) if rates else None, WAKE_UTILIZATION)


def warm_instead(m: ModelRuntime, target: ServedPlan, shapes: frozenset[Shape], now: float,
                 delay_ms: float, min_gain: float, *, donor: bool = False) -> ServedPlan | None:
    """A plan in standby on m's cores to serve instead of a cold switch to target: the one
    of least latency at target's B among those that keep up with the arrivals, unless the
    cold target is worth its cost over it (the switch-cost rule).

    donor: m gives cores up to a model that waits for them. Its cold shrink would hold that
    model up as well (ResNet-50's took 13.8 s on 2 busy cores while small-cnn queued 648
    requests on the core they shared), so a donor takes a standby plan whenever there is
    one: of those that keep up, the fastest, else the one of most capacity. Its own policy
    may move it on later, on its own cores."""
    if shape_of(target) in shapes or not shapes:
        return None
    batch, rate = target.for_batch, m.estimator.rate
    every = [plan_of_shape(m.optimizer, m.name, target.version, s, batch, m.cores, delay_ms)
             for s in sorted(shapes)]
    plans = [p for p in every if rate is None
             or OVERLOAD_UTILIZATION * capacity_rps(m.optimizer, p) >= rate]
    if donor:
        return (min(plans, key=lambda p: p.predicted_ms) if plans
                else max(every, key=lambda p: capacity_rps(m.optimizer, p)))
    if not plans:
        return None
    alt = min(plans, key=lambda p: p.predicted_ms)
    cold_ms = served_latency(m.optimizer, target.threads, target.instances, target.batch_size,
                             batch, delay_ms)
    cold = judge_switch(alt.predicted_ms, cold_ms, expected_stay_s(m.levels, now),
                        m.stats.cost(warm=False), min_gain)
    return None if cold.worth else alt


def slo_met(m: ModelRuntime) -> bool | None:
    """The live plan's predicted batch latency at the estimated B within the SLO."""
    if m.slo_ms is None or m.plan is None or m.shared:
        return None
    return served_latency(m.optimizer, m.plan.threads, m.plan.instances,
                          m.plan.batch_size, m.estimator.estimate) <= m.slo_ms
