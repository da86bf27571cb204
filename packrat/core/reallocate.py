"""Live reallocation: which cores each model of a server holds, from its live load (issue 12).

Pure code: loads in, a Reallocation out; no clock, no I/O. The controller carries it out.

- Busy or idle is decided on the arrival rate, not on B (the estimator never reports B below
  1): a model is idle below IDLE_SHARE of one 1-thread worker's capacity (1 / L(1 thread,
  batch 1)), and an idle one turns busy again only above BUSY_AGAIN times that, so a rate near
  the line does not flap. A model not measured yet counts as busy.
- More busy models than cores: the least loaded (by rate) are treated as idle until cores
  free up (`crowded_out`, said in status).
- The busy models' cores come from `allocate` (SLOs first, then the request-weighted latency);
  a model on a manual plan keeps its cores, and the others share the rest.
- Idle models get no dedicated core: each is one 1-thread worker on the shared core, the last
  spare core if there is one, else the last core, which a busy model also holds (the one
  exception to "no core in two plans").
- Which cores: a model that shrinks keeps the first of its cores (its new version fits inside
  its old cores, make-before-break), a model that grows keeps all of its cores and takes freed
  ones in core order. So no model both gives and takes dedicated cores, and `donors` (shrink or
  go idle) switch before `receivers` (grow or wake up) start: at no moment do two models'
  dedicated workers share a core.
- Hysteresis (the switch-cost rule): a change of who is busy is always carried out, and so is
  one that meets more of the SLOs; otherwise the new split must gain at least min_gain of the
  weighted latency and more over the expected stay than the switches cost.
- One move per load change: when a model wakes while another busy one's rate is falling
  (below FALLING times its slow rate), the move waits (`wait_for_falling`, bounded by the
  caller) until that one is idle or steady. When one model's load ends as the other's starts,
  the waker would otherwise get a share of the cores, then all of them a few seconds later:
  two cold loads (ResNet-50: 20-30 s each on 2 busy cores).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from packrat.core.allocate import (
    Allocation,
    ModelDemand,
    allocate,
    evaluate_split,
    within,
)
from packrat.core.curve import ServedCurve
from packrat.core.optimizer import Optimizer
from packrat.core.switchcost import judge_switch
from packrat.errors import PlanError

IDLE_SHARE = 0.05   # idle below this share of one 1-thread worker's requests per second
BUSY_AGAIN = 2.0    # an idle model turns busy above this many times the idle line
FALLING = 0.75      # a busy model whose rate is below this share of its slow rate is falling


def idle_line(opt: Optimizer) -> float:
    """Requests per second below which a model is idle: IDLE_SHARE of what one 1-thread
    worker serves at batch 1."""
    ms = opt.latency(1, 1)
    return IDLE_SHARE * 1000.0 / ms if ms > 0 and math.isfinite(ms) else 0.0


@dataclass(frozen=True)
class ModelLoad:
    """One model as the reallocation sees it."""

    name: str
    curve: ServedCurve            # L(B, n) for n up to every core of the server
    batch: int                    # the estimator's B
    rate: float | None            # arrivals per second (None: not measured yet)
    slo_ms: float | None = None
    cores: tuple[int, ...] = ()   # its dedicated cores now (() when shared or not placed)
    shared: bool = False          # on the shared core now
    manual: bool = False          # a manual plan holds: its cores stay as they are
    slow_rate: float | None = None  # a slower average of the arrivals (None: use rate)

    def idle_line(self) -> float:
        """Requests per second below which the model is idle."""
        return idle_line(self.curve.optimizer)

    def busy(self) -> bool:
        """Busy above the idle line; an idle one only once both the rate and the slow rate
        are above BUSY_AGAIN times it (a few requests in a row do not take cores)."""
        if self.rate is None:
            return True
        if not self.shared:
            return self.rate >= self.idle_line()
        line = self.idle_line() * BUSY_AGAIN
        slow = self.rate if self.slow_rate is None else self.slow_rate
        return self.rate >= line and slow >= line

    def falling(self) -> bool:
        """Busy, and its arrivals fell to under FALLING of their slow average: it may be on
        its way to idle."""
        return (not self.shared and self.rate is not None and self.slow_rate is not None
                and self.rate < FALLING * self.slow_rate)


@dataclass(frozen=True)
class Placement:
    name: str
    cores: tuple[int, ...]   # dedicated cores; (the shared core,) when shared
    shared: bool
    batch: int               # B planned for (0: idle)


@dataclass(frozen=True)
class Reallocation:
    allocation: Allocation            # of the cores not held by manual plans
    placements: tuple[Placement, ...]
    donors: tuple[str, ...]           # switch first: their cores shrink, or they go idle
    receivers: tuple[str, ...]        # then: they grow onto freed cores, or wake up
    crowded_out: tuple[str, ...]      # busy, but treated as idle: more busy models than cores
    shared_core: int
    changed: bool                     # worth carrying out (the rest is for status)
    reason: str
    waiting: bool = False             # a model woke, but the move waits for a falling one

    def placement(self, name: str) -> Placement:
        return next(p for p in self.placements if p.name == name)


def reallocate(loads: Sequence[ModelLoad], cores: tuple[int, ...], *, min_gain: float = 0.05,
               stay_s: float = 60.0, cost: tuple[float, float] = (10.0, 1.0),
               wait_for_falling: bool = False) -> Reallocation:
    """The placement of every model on `cores` for these loads, and whether to move to it
    (cost: a switch's (duration_s, slowdown), stay_s: how long the loads are expected to
    hold; see packrat.core.switchcost.judge_switch). wait_for_falling: a move that only wakes
    models waits while another busy model's rate is falling (`waiting` says so)."""
    if not cores:
        raise PlanError("no cores to allocate")
    fixed = {c for m in loads if m.manual for c in m.cores}
    free = tuple(c for c in cores if c not in fixed)
    auto = [m for m in loads if not m.manual]
    busy = [m for m in auto if m.busy()]
    crowded: list[ModelLoad] = []
    if len(busy) > len(free):  # the least loaded wait on the shared core
        by_load = sorted(busy, key=lambda m: (m.rate or 0.0, m.batch), reverse=True)
        busy, crowded = by_load[:len(free)], by_load[len(free):]
        busy = [m for m in auto if m in busy]  # the models' order, for stable tie-breaks
    names = {m.name for m in busy}
    demands = [_demand(m, m.name in names) for m in auto]
    try:
        allocation = allocate(demands, len(free)) if free else None
    except PlanError:
        # Overloaded: B (the queue) beyond what the cores can serve in one round at all. Such
        # a model is served by its plan of most capacity wherever it goes, so weigh each at
        # the most its fair share of the cores serves (the estimate once kept a woken model
        # on the shared core for a whole phase: "need 4 cores ... but there are 2").
        share = max(1, len(free) // max(1, len(busy)))
        demands = [_demand(m, m.name in names, share) for m in auto]
        allocation = allocate(demands, len(free))
    if allocation is None:
        raise PlanError(f"every core ({_span(cores)}) is held by a manual plan; give one model "
                        "back with `packrat reconfigure --auto`")
    counts = {m.name: m.cores for m in allocation.models}
    placed = _assign(auto, counts, free)
    shared_core = next((c for c in reversed(free) if not any(c in p for p in placed.values())),
                       free[-1])
    placements = []
    for m in loads:
        if m.manual:
            placements.append(Placement(m.name, m.cores, False, m.batch))
        elif placed[m.name]:
            placements.append(Placement(m.name, placed[m.name], False, _batch(m)))
        else:
            placements.append(Placement(m.name, (shared_core,), True, 0))
    by_name = {m.name: m for m in loads}
    donors = tuple(p.name for p in placements if not by_name[p.name].manual and _gives(by_name[p.name], p))
    receivers = tuple(p.name for p in placements if not by_name[p.name].manual and _takes(by_name[p.name], p))
    changed, reason = _worth(auto, demands, allocation, placements, by_name, len(free),
                             min_gain, stay_s, cost)
    waiting = False
    woke = [p.name for p in placements if not p.shared and by_name[p.name].shared]
    slept = [p.name for p in placements if p.shared and not by_name[p.name].shared]
    falling = [m for m in busy if m.falling()]
    if changed and wait_for_falling and woke and not slept and falling:
        changed, waiting = False, True
        reason = (f"{', '.join(woke)} busy; the move waits while the rate of "
                  + ", ".join(f"{m.name} falls ({m.rate:.1f}/s, {m.slow_rate:.1f}/s on average)"
                              for m in falling)
                  + ": once it is idle or steady, one move")
    if crowded:
        reason += (f"; {', '.join(m.name for m in crowded)} treated as idle: more busy models "
                   f"than the {len(free)} cores")
    return Reallocation(allocation, tuple(placements), donors, receivers,
                        tuple(m.name for m in crowded), shared_core, changed, reason, waiting)


def if_woken(loads: Sequence[ModelLoad], cores: tuple[int, ...], **kw) -> Reallocation | None:
    """The reallocation if every model on the shared core turned busy now (at the rate that
    wakes it, B at least 1); None when none is idle. It tells where each busy model would be,
    so that a donor's next plan can be loaded into standby ahead of need: a cold shrink keeps
    the woken model waiting on the shared core while the donor loads and drains."""
    if not any(m.shared and not m.manual for m in loads):
        return None
    woken = []
    for m in loads:
        if m.shared and not m.manual:
            wake = m.idle_line() * BUSY_AGAIN
            m = replace(m, batch=max(1, m.batch), rate=max(m.rate or 0.0, wake),
                        slow_rate=max(m.slow_rate or 0.0, wake))
        woken.append(m)
    return reallocate(woken, cores, **kw)


def _batch(m: ModelLoad) -> int:
    return max(1, min(m.batch, m.curve.largest_batch()))


def _demand(m: ModelLoad, busy: bool, cores: int | None = None) -> ModelDemand:
    """m's demand, its B at most what `cores` cores serve (default: all)."""
    batch = max(1, min(_batch(m), m.curve.largest_batch(cores)))
    return ModelDemand(m.name, m.curve, batch if busy else 0, m.slo_ms)


def _assign(models: list[ModelLoad], counts: dict[str, int],
            free: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """Cores per model: shrinking ones keep a prefix of theirs, growing ones keep all of
    theirs and take the cores no one keeps, in core order."""
    kept: dict[str, tuple[int, ...]] = {}
    taken: set[int] = set()
    for m in models:  # (cores two models claim, e.g. after overlap, go to the first)
        mine = tuple(c for c in (() if m.shared else m.cores) if c in free and c not in taken)
        kept[m.name] = mine[:counts.get(m.name, 0)]
        taken.update(kept[m.name])
    pool = [c for c in free if c not in taken]
    out = {}
    for m in models:
        need = counts.get(m.name, 0) - len(kept[m.name])
        extra, pool = pool[:need], pool[need:]
        out[m.name] = tuple(sorted(kept[m.name] + tuple(extra), key=free.index))
    return out


def _gives(m: ModelLoad, p: Placement) -> bool:
    """m's new placement leaves some of its dedicated cores."""
    return not m.shared and bool(set(m.cores) - (set() if p.shared else set(p.cores)))


def _takes(m: ModelLoad, p: Placement) -> bool:
    """m's new placement takes dedicated cores it did not hold (or it had none yet)."""
    return not p.shared and (m.shared or bool(set(p.cores) - set(m.cores)))


def _worth(auto, demands, allocation: Allocation, placements, by_name, n_free, min_gain,
           stay_s, cost) -> tuple[bool, str]:
    moves = [p for p in placements if not by_name[p.name].manual
             and (p.shared != by_name[p.name].shared or (not p.shared and p.cores != by_name[p.name].cores))]
    if not moves:
        return False, "the allocation holds: " + _describe(placements)
    woke = [p.name for p in placements if not p.shared and by_name[p.name].shared]
    slept = [p.name for p in placements if p.shared and not by_name[p.name].shared
             and by_name[p.name].cores]
    first = [p.name for p in placements if not by_name[p.name].cores and not by_name[p.name].shared]
    if woke or slept or first:
        parts = ([f"{', '.join(first)} placed"] if first else []) + \
                ([f"{', '.join(woke)} busy"] if woke else []) + \
                ([f"{', '.join(slept)} idle"] if slept else [])
        return True, f"{'; '.join(parts)}: {_describe(placements, by_name)}"
    # The same models are busy; only their core counts differ. Compare with today's split.
    now_split = [len(by_name[d.name].cores) if d.busy else 0 for d in demands]
    try:
        now = evaluate_split(demands, now_split, n_free)
    except PlanError:  # today's split cannot serve today's B: move
        return True, f"the current split cannot serve the loads: {_describe(placements, by_name)}"
    worse, better = now.worst_slo_ratio, allocation.worst_slo_ratio
    if worse is not None and better is not None and worse > 1.0 and not within(worse, better * (1 + min_gain)):
        return True, (f"SLOs: worst latency/SLO {worse:.2f} -> {better:.2f}: "
                      f"{_describe(placements, by_name)}")
    live, new = now.weighted_latency_ms, allocation.weighted_latency_ms
    if live is None or new is None:
        return False, "nothing busy to weigh"
    judgement = judge_switch(live, new, stay_s, cost, min_gain)
    verdict = (f"weighted latency {live:.1f} -> {new:.1f} ms, {judgement.describe()}")
    if judgement.worth:
        return True, f"{verdict}: {_describe(placements, by_name)}"
    return False, f"{verdict}: the allocation holds"


def _describe(placements, before=None) -> str:
    """e.g. "a 1 -> 2 cores (0,1), b shared core 1" (before: the loads, for the change)."""
    def count(p_or_m) -> str:
        if p_or_m.shared:
            return "shared"
        n = len(p_or_m.cores)
        return f"{n} core{'s' if n != 1 else ''}"

    parts = []
    for p in placements:
        now = f"shared core {p.cores[0]}" if p.shared else f"{count(p)} ({_span(p.cores)})"
        was = before.get(p.name) if before else None
        moved = was is not None and (was.cores or was.shared) and count(was) != count(p)
        parts.append(f"{p.name} {count(was)} -> {now}" if moved else f"{p.name} {now}")
    return ", ".join(parts)


def _span(cores: tuple[int, ...]) -> str:
    return ",".join(str(c) for c in cores)
