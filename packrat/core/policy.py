"""What to serve: from an optimizer result or a manual request to a ServedPlan, and whether a
switch is worth it. Pure functions of data: no HTTP, no clock, no files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from packrat.core.optimizer import Optimizer
from packrat.core.plan import ServedPlan, slots_for
from packrat.errors import PlanError


@dataclass(frozen=True)
class PolicyParams:
    # Switching costs seconds of worker start-up and a brief overlap on the same cores, so a
    # new plan must promise at least this much lower latency at the estimated batch size.
    min_gain: float = 0.05


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


def manual_plan(opt: Optimizer, model: str, version: str, instances: int, threads: int,
                batch_size: int, cores: tuple[int, ...]) -> ServedPlan:
    for name, value in (("instances", instances), ("threads", threads), ("batch", batch_size)):
        if value < 1:
            raise PlanError(f"--{name} must be >= 1, got {value}")
    slots = slots_for(threads, instances, cores)
    batch = instances * batch_size
    return ServedPlan(model, version, threads, instances, batch_size, slots,
                      served_latency(opt, threads, instances, batch_size, batch), batch)


def should_switch(current: ServedPlan | None, target: ServedPlan, opt: Optimizer, batch: int,
                  params: PolicyParams = PolicyParams(), delay_ms: float = 0.0) -> bool:
    """Switch when the target differs and is predicted enough faster at the estimated B
    (delay_ms: TorchServe's max_batch_delay, paid by batches B cannot fill)."""
    if current is None:
        return True
    if target.same_shape(current):
        return False
    if current.instances * current.batch_size < batch <= target.instances * target.batch_size:
        # The live plan needs several rounds for B; the profile has no figure for the queueing
        # and per-batch costs between rounds, so its prediction is too kind: serve B in one.
        return True
    now = served_latency(opt, current.threads, current.instances, current.batch_size, batch, delay_ms)
    new = served_latency(opt, target.threads, target.instances, target.batch_size, batch, delay_ms)
    if math.isinf(now):
        return not math.isinf(new)
    return new <= now * (1.0 - params.min_gain)
