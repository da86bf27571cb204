"""What to serve: from an optimizer result or a manual request to a ServedPlan, and whether a
switch is worth it (packrat/core/switchcost.py: gain over the level's stay against the cost of
a warm or cold switch). Pure functions of data: no HTTP, no clock, no files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from packrat.core.optimizer import Optimizer
from packrat.core.plan import ServedPlan, Shape, slots_for
from packrat.core.switchcost import (
    DEFAULT_STAY_S,
    NO_MEASUREMENTS,
    SwitchJudgement,
    SwitchStats,
    judge_switch,
)
from packrat.errors import PlanError


@dataclass(frozen=True)
class PolicyParams:
    # A floor under any switch: the profile's latencies are a few percent noisy, so a smaller
    # predicted gain may be none at all, however cheap the switch.
    min_gain: float = 0.05
    # Also weigh the gain over the level's expected stay against the measured cost of the
    # switch (warm or cold); False: the floor alone decides, as before.
    cost_aware: bool = True


def served_latency(opt: Optimizer, threads: int, instances: int, batch_size: int, batch: int,
                   delay_ms: float = 0.0) -> float:
    """Predicted latency of B requests on a version of `instances` workers with `threads`
    threads and `batch_size`: the queue hands out ceil(B / batch_size) batches, so a worker
    may run several rounds; and where B cannot fill every worker's batch, TorchServe waits
    its batching delay (delay_ms) for more requests first. inf if the profile cannot tell."""
    size = min(batch_size, batch)
    batches = -(-batch // size)
    rounds = -(-batches // instances)
    wait = delay_ms if instances * batch_size > batch else 0.0
    return rounds * opt.latency(threads, size) + wait


def plan_for_batch(opt: Optimizer, model: str, version: str, batch: int,
                   cores: tuple[int, ...]) -> ServedPlan:
    """The optimizer's servable plan for B, with cores assigned."""
    batch = max(1, min(batch, opt.max_servable))
    served = opt.plan(batch).served
    if served is None:
        raise PlanError(f"no plan with one thread count serves B={batch} on {opt.cores} cores")
    threads = served.instances[0].threads
    instances = len(served.instances)
    size = max(i.batch for i in served.instances)
    return ServedPlan(model, version, threads, instances, size,
                      slots_for(threads, instances, cores), served.latency_ms, batch)


def plan_of_shape(opt: Optimizer, model: str, version: str, shape: Shape, batch: int,
                  cores: tuple[int, ...], delay_ms: float = 0.0) -> ServedPlan:
    """The served plan of a given (instances, threads, batch_size), e.g. a standby's, with
    its predicted latency for B."""
    instances, threads, batch_size = shape
    return ServedPlan(model, version, threads, instances, batch_size,
                      slots_for(threads, instances, cores),
                      served_latency(opt, threads, instances, batch_size, batch, delay_ms), batch)


def capacity_rps(opt: Optimizer, plan: ServedPlan) -> float:
    """Requests per second the plan serves with every worker's batch full: the most it can
    keep up with (0 where the profile cannot tell)."""
    ms = opt.latency(plan.threads, plan.batch_size)
    return 0.0 if not (ms > 0 and math.isfinite(ms)) else (
        plan.instances * plan.batch_size * 1000.0 / ms)


def queued_latency_ms(opt: Optimizer, plan: ServedPlan, rate: float) -> float:
    """A request's expected latency under the plan at `rate` arrivals per second: its batch
    latency L plus an M/D/1-like wait, L x rho / (2 (1 - rho)) shared over its instances
    (rho = rate / capacity); infinite at or beyond its capacity. Rough, but it ranks a plan of
    a little more capacity and much longer batches (ResNet-50's 2x<t=1,b=4>: 8% more than
    1x<t=2,b=1>, 7x its latency) below the live one until the live one nears saturation."""
    capacity = capacity_rps(opt, plan)
    if capacity <= 0 or rate >= capacity:
        return math.inf
    rho = max(0.0, rate) / capacity
    ms = opt.latency(plan.threads, plan.batch_size)
    return ms * (1 + rho / (2 * plan.instances * (1 - rho)))


def batch_for_rate(opt: Optimizer, rate: float | None, cores: tuple[int, ...],
                   utilization: float = 0.9) -> int:
    """The smallest B whose served plan on these cores keeps up with `rate` requests per
    second within `utilization` of its capacity (the B a queue settles at); where none does,
    the B whose plan has the least queued latency at the rate (queued_latency_ms), and where
    none keeps up at all, the B of the plan of most capacity; 1 with no rate. For a model
    placed on new cores, whose estimate may still describe its time on the shared core.
    (Capacity alone put ResNet-50 at 6.8 requests/s on one core on 1x<t=1,b=8>: 2% more
    capacity than 1x<t=1,b=4>, and twice its batch latency.)"""
    if not rate or rate <= 0:
        return 1
    plans: list[tuple[int, ServedPlan]] = []
    for batch in range(1, opt.max_servable + 1):
        try:
            plan = plan_for_batch(opt, "", "", batch, cores)
        except PlanError:
            continue
        if utilization * capacity_rps(opt, plan) >= rate:
            return batch
        plans.append((batch, plan))
    if not plans:
        return 1
    best = min(plans, key=lambda bp: (queued_latency_ms(opt, bp[1], rate), bp[0]))
    if math.isfinite(queued_latency_ms(opt, best[1], rate)):
        return best[0]
    top = max(capacity_rps(opt, p) for _, p in plans)
    return next(b for b, p in plans if capacity_rps(opt, p) == top)


def manual_plan(opt: Optimizer, model: str, version: str, instances: int, threads: int,
                batch_size: int, cores: tuple[int, ...]) -> ServedPlan:
    for name, value in (("instances", instances), ("threads", threads), ("batch", batch_size)):
        if value < 1:
            raise PlanError(f"--{name} must be >= 1, got {value}")
    slots = slots_for(threads, instances, cores)
    batch = instances * batch_size
    return ServedPlan(model, version, threads, instances, batch_size, slots,
                      served_latency(opt, threads, instances, batch_size, batch), batch)


@dataclass(frozen=True)
class Verdict:
    """Whether to switch, and why, in words for the log; `judgement` when the gain was
    weighed."""

    switch: bool
    why: str
    judgement: SwitchJudgement | None = None


def switch_verdict(current: ServedPlan | None, target: ServedPlan, opt: Optimizer, batch: int,
                   params: PolicyParams = PolicyParams(), delay_ms: float = 0.0, *,
                   stats: SwitchStats = NO_MEASUREMENTS, stay_s: float = DEFAULT_STAY_S,
                   warm: bool = False, keeps_up: bool = False) -> Verdict:
    """Switch when the target differs and is predicted enough faster at the estimated B
    (delay_ms: TorchServe's max_batch_delay, paid by batches B cannot fill): at least
    min_gain faster and, when cost_aware, gaining more over stay_s than a switch of its kind
    (warm: the target's shape is loaded as a standby) costs by stats. keeps_up: the live plan
    serves the measured arrival rate, so a B beyond its one round is a passing queue, and a
    cold switch must pass the cost rule (mid-burst, ResNet-50's cold switch to a plan
    predicted 8% faster at B = 8 took 13 s on the busy cores while the queue grew to 151)."""
    if current is None:
        return Verdict(True, "nothing serves yet")
    if target.same_shape(current):
        return Verdict(False, f"already serves {current.describe()}")
    now = served_latency(opt, current.threads, current.instances, current.batch_size, batch,
                         delay_ms)
    new = served_latency(opt, target.threads, target.instances, target.batch_size, batch,
                         delay_ms)
    change = f"{now:.1f} -> {new:.1f} ms at B={batch}"
    if math.isinf(now):
        return Verdict(not math.isinf(new), f"{change}: the profile cannot tell the live plan")
    # A cold switch also needs B clearly beyond the live plan's one round: at low load the
    # estimate wavers between 1 and 2, and switches forced by two rounds churned.
    rounds = -(-batch // (current.instances * current.batch_size))
    faster = new <= now * (1.0 - params.min_gain) and (warm or rounds >= 3
                                                        or not params.cost_aware)
    if keeps_up and not warm and params.cost_aware:
        faster = False  # (the several-rounds shortcuts below skip the cost rule)
    if faster and current.instances * current.batch_size < batch <= target.instances * target.batch_size:
        # The live plan needs several rounds for B; the profile has no figure for the queueing
        # and per-batch costs between rounds, so its prediction is too kind: serve B in one.
        # (Only where the target is predicted faster too: on bursty ResNet-50 traffic, cold
        # switches to plans predicted 2% faster lengthened the queue they were to shorten.)
        return Verdict(True, f"{change}: {current.describe()} needs several rounds for "
                             f"B={batch}, {target.describe()} one")
    if faster and batch > current.instances * current.batch_size:
        # Overloaded (B beyond what any plan holds in one round): requests queue up behind the
        # live plan and its cost grows with time, not with the stay; take the faster plan.
        return Verdict(True, f"{change}: {current.describe()} needs several rounds for B; "
                             "its queue grows")
    if not params.cost_aware:
        ok = new <= now * (1.0 - params.min_gain)
        floor = f"{'at least' if ok else 'under'} {params.min_gain:.0%} faster"
        return Verdict(ok, f"{change}: {floor}")
    judgement = judge_switch(now, new, stay_s, stats.cost(warm), params.min_gain)
    kind = "warm" if warm else "cold"
    return Verdict(judgement.worth, f"{change}, {kind}: {judgement.describe()}", judgement)


def should_switch(current: ServedPlan | None, target: ServedPlan, opt: Optimizer, batch: int,
                  params: PolicyParams = PolicyParams(), delay_ms: float = 0.0, *,
                  stats: SwitchStats = NO_MEASUREMENTS, stay_s: float = DEFAULT_STAY_S,
                  warm: bool = False) -> bool:
    """switch_verdict's answer alone."""
    return switch_verdict(current, target, opt, batch, params, delay_ms, stats=stats,
                          stay_s=stay_s, warm=warm).switch
