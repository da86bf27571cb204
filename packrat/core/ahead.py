"""Ahead of need: which plan to load into standby next, so that the next change of a model's
plan is warm. Pure, as decide.py: the controller asks after each step and loads what this
returns (if it fits the standby budget) as a version that never becomes the default.
"""

from __future__ import annotations

from packrat.core.decide import (
    OVERLOAD_UTILIZATION,
    RESCUE_CAPACITY,
    ModelView,
    Reason,
    SwitchTo,
)
from packrat.core.optimizer import Optimizer
from packrat.core.plan import ServedPlan, shape_of
from packrat.core.policy import capacity_rps, plan_for_batch
from packrat.errors import PlanError

# Ahead of need: a settled model whose load leaves its cores headroom gets the plans of the
# neighbouring batch sizes loaded into standby, so that the next change is warm too.
PREWARM_SETTLED_S = 10.0    # the estimate has held this long
PREWARM_UTILIZATION = 0.5   # at most this share of the live plan's batch capacity in use


def prewarm(m: ModelView, now: float) -> SwitchTo | None:
    """A plan to load into standby for m, or None: its plan if an idle model woke up
    (m.wake_plan: a busy model's cold shrink would also keep that model waiting, an idle
    model's cold switch would queue its rising load; the only plan loaded for such a model,
    while it keeps up with the arrivals); else the plans of most capacity (what an overload
    needs, when loading it cold would cost most), then the plans for 2B and B/2 (the next
    levels the estimator reports), while it uses at most half its live plan's capacity and
    its B has settled. Never one live or already warm; only under automatic control (an idle
    model on the shared core only its wake plan) and with no old version draining. The
    caller checks that it fits the standby budget without evicting anything."""
    if m.switching or m.draining or now < m.hold_until or m.plan is None:
        return None
    if not m.auto and m.wake_plan is None:
        return None
    live = shape_of(m.plan)
    load = m.load if m.load is not None else m.estimate
    held = m.plan.instances * m.plan.batch_size
    keeps_up = (load <= held if m.rate is None
                else m.rate <= OVERLOAD_UTILIZATION * capacity_rps(m.optimizer, m.plan))
    # (the wake plan does not wait for B to settle: B wavering between 1 and 2 kept
    # ResNet-50 from loading its shrink plan for a whole phase; it is loaded once, see
    # CoreBudget)
    wake = m.wake_plan
    if (wake is not None and keeps_up and shape_of(wake) != live
            and shape_of(wake) not in m.warm_shapes):
        cores = ",".join(map(str, sorted({c for s in wake.slots for c in s})))
        return SwitchTo(wake, Reason.PREWARM,
                        why=f"ahead of need: its plan on cores {cores} if "
                            f"{'an idle model' if m.auto else 'it'} wakes up")
    if not m.auto:
        return None
    settled = m.levels.since is not None and now - m.levels.since >= PREWARM_SETTLED_S
    # (headroom by the arrival rate where it is known: Little's L counts the frontend's
    # time too, and read 0.5-0.65 of one instance at 95 requests/s while the cores were
    # 40% busy, which blocked every load ahead of need on small-cnn)
    busy = (load > PREWARM_UTILIZATION * held if m.rate is None
            else m.rate > PREWARM_UTILIZATION * capacity_rps(m.optimizer, m.plan))
    if wake is not None or not settled or busy:
        # (a model that would give cores up loads nothing else on them: a long load would
        # hold up the woken model's cores)
        return None
    version = str(m.next_version)
    # (one the overload rescue would not take, for too little capacity over the live plan's,
    # is not worth its memory and its load)
    rescue_rps = RESCUE_CAPACITY * capacity_rps(m.optimizer, m.plan)
    candidates = [(p, "a plan of the most capacity, for an overload")
                  for p in (most_capacity(m.optimizer, m.name, version, m.cores),
                            most_capacity(m.optimizer, m.name, version, m.cores, within=0.9))
                  if p is not None and capacity_rps(m.optimizer, p) >= rescue_rps]
    for batch in (2 * m.estimate, m.estimate // 2):
        if not 1 <= batch <= m.optimizer.max_servable:
            continue
        try:
            plan = plan_for_batch(m.optimizer, m.name, version, batch, m.cores)
        except PlanError:
            continue
        candidates.append((plan, f"the plan for B={batch}"))
    for plan, what in candidates:
        if shape_of(plan) != live and shape_of(plan) not in m.warm_shapes:
            return SwitchTo(plan, Reason.PREWARM, why=f"ahead of need: {what}")
    return None


def most_capacity(opt: Optimizer, model: str, version: str, cores: tuple[int, ...],
                  within: float = 0.95) -> ServedPlan | None:
    """Of the plans for B = 1, 2, 4, ... up to the most the profile serves, the one that
    serves most requests per second (capacity_rps); among those within `within` of it, the
    one of least latency. None where no plan serves. (Prewarmed at 95% and at 90%: the
    second is often much faster and keeps up with all but the highest rates.)"""
    plans = []
    batch = 1
    while batch <= opt.max_servable:
        try:
            plans.append(plan_for_batch(opt, model, version, batch, cores))
        except PlanError:
            pass
        batch *= 2
    if not plans:
        return None
    top = max(capacity_rps(opt, p) for p in plans)
    return min((p for p in plans if capacity_rps(opt, p) >= within * top),
               key=lambda p: p.predicted_ms)
