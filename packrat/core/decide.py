"""The controller's decisions, as data: from what is known of each model (its live plan, its
estimated B, whether a switch is under way) to the actions an executor carries out. Pure: no
clock (the time is an argument), no HTTP, no files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

from packrat.core.optimizer import Optimizer
from packrat.core.plan import ServedPlan, Shape, shape_of
from packrat.core.policy import (
    PolicyParams,
    Verdict,
    batch_for_rate,
    capacity_rps,
    manual_plan,
    plan_for_batch,
    plan_of_shape,
    queued_latency_ms,
    switch_verdict,
)
from packrat.core.switchcost import (
    NO_LEVELS,
    NO_MEASUREMENTS,
    LevelHistory,
    SwitchStats,
    expected_stay_s,
)
from packrat.errors import PackratError, PlanError


@dataclass(frozen=True)
class ModelView:
    """What decide() needs to know of one model."""

    name: str
    optimizer: Optimizer
    cores: tuple[int, ...]
    plan: ServedPlan | None      # the live plan (None: nothing serves yet)
    auto: bool                   # automatic reconfiguration, or a manual plan holds
    estimate: int                # the estimator's B
    switching: bool              # a switch of this model is under way
    hold_until: float            # no automatic switch before (after a failure, after --auto)
    next_version: int
    stats: SwitchStats = NO_MEASUREMENTS     # measured switch costs (defaults until measured)
    levels: LevelHistory = NO_LEVELS         # how long B levels lasted: the expected stay
    warm_shapes: frozenset[Shape] = frozenset()  # (instances, threads, batch_size) in standby
    load: float | None = None    # the estimator's smoothed load (mean requests in the system)
    rate: float | None = None    # the estimator's arrivals per second (EWMA)
    placement: str = ""          # the model's cores in the server's allocation, for messages
    draining: bool = False       # an old version still drains on its cores: no cold switch
    # its plan if the idle models woke up: a busy model's on the fewer cores it would keep,
    # an idle one's on its core for the rate it reached when last busy (see CoreBudget)
    wake_plan: ServedPlan | None = None
    slow_rate: float | None = None  # a slower average of the arrivals (estimator.SLOW_ALPHA)
    peak_rate: float | None = None  # the highest `rate` of the last PEAK_WINDOW_S
    sure_rate: float | None = None  # a rate the last interval's arrivals surely exceeded


class Reason(Enum):
    AUTO = "auto"          # the estimate calls for a better plan
    MANUAL = "manual"      # `packrat reconfigure`
    RESTORE = "restore"    # TorchServe restarted: serve the plan again
    PREWARM = "prewarm"    # load a likely next plan into standby; the live plan stays
    REALLOCATE = "reallocate"  # the model's cores changed (several models, one core budget)
    OVERLOAD = "overload"  # arrivals outrun the live plan: a standby plan of more capacity


@dataclass(frozen=True)
class SwitchTo:
    """Serve `plan` (a new version) make-before-break. `after`: models whose switches (and
    the retiring of their versions) must end before this one starts (e.g. they shrink before
    this model grows onto their cores)."""

    plan: ServedPlan
    reason: Reason
    request_id: str | None = None
    after: tuple[str, ...] = ()
    warm: bool = False  # the plan's shape is in standby: make that version the default
    why: str = ""       # the policy's reasons, for the log

    @property
    def model(self) -> str:
        return self.plan.model


@dataclass(frozen=True)
class SetAuto:
    model: str
    hold_until: float  # watch the load until then before deciding


@dataclass(frozen=True)
class SetManual:
    model: str  # the live plan holds until --auto


@dataclass(frozen=True)
class Answer:
    """The answer to a `packrat reconfigure` request that needs no switch."""

    request_id: str
    ok: bool
    message: str
    plan: ServedPlan | None


@dataclass(frozen=True)
class Note:
    """Something the user should see in `packrat status` (last_error)."""

    model: str
    message: str


@dataclass(frozen=True)
class Stay:
    """A faster plan exists but is not worth its switch yet (for the log; nothing to do).
    Repeated every interval while it holds: log it when `why` changes."""

    model: str
    why: str


Action = SwitchTo | SetAuto | SetManual | Answer | Note | Stay


# A plan is overloaded when the arrivals exceed this share of its capacity (full batches)
# while more requests wait than it holds in one round: its queue can only grow.
OVERLOAD_UTILIZATION = 0.9
# ... and a plan of less capacity than the live one is taken only below this share of its
# capacity: the band between the two keeps the arrival rate's noise (Poisson, ~10% over a
# few seconds at 15 requests/s) from flapping between plans at a burst's rate.
DOWN_UTILIZATION = 0.7
# ... and it must serve the highest arrival rate of this many seconds within
# OVERLOAD_UTILIZATION: on bursty small-cnn traffic, warm switches down between bursts (to a
# third of the capacity) left each burst queueing until the overload rule moved it back: p99
# 4.6 s against 204 ms for the cold configuration, which held its plan. (Autoscalers keep a
# scale-down window for the same reason.)
PEAK_WINDOW_S = 60.0
# ... and the overload's plan must promise a queued latency under this share of the live one's
RESCUE_GAIN = 0.9
# ... and at least this much more capacity: calibrated capacities moved by ~10% between runs on
# the 2-core VM, and during the switch the old version's queue drains on the same cores. (On
# bursty ResNet-50 traffic, switches to plans of 1-8% more capacity made every burst slower.)
RESCUE_CAPACITY = 1.15


def decide(models: list[ModelView], now: float, policy: PolicyParams,
           max_batch_delay_ms: float) -> list[Action]:
    """Automatic switches: for each model under automatic control, not switching and not on
    hold, the plan for its estimated B if the policy says it is worth a switch (a warm one if
    its shape is in standby, or a standby plan nearly as good where the cold switch to the
    best is not worth its cost), or at once a standby plan that keeps up with arrivals the
    live plan cannot; Stay where only the switch's cost holds it back."""
    actions: list[Action] = []
    for m in models:
        if not m.auto or m.switching or now < m.hold_until:
            continue
        try:
            target = plan_for_batch(m.optimizer, m.name, str(m.next_version), m.estimate, m.cores)
            target = _for_the_arrivals(m, target, max_batch_delay_ms)
        except PlanError as e:
            actions.append(Note(m.name, str(e)))
            continue
        standby = [plan_of_shape(m.optimizer, m.name, str(m.next_version), s, m.estimate,
                                 m.cores, max_batch_delay_ms)
                   for s in sorted(m.warm_shapes) if m.plan is None or s != shape_of(m.plan)]
        rescue = _overload_rescue(m, standby)
        if rescue is not None:
            actions.append(rescue)
            continue
        stay_s = expected_stay_s(m.levels, now)

        def verdict(live, plan, warm, m=m, stay_s=stay_s):
            if not _keeps_up(m, plan):
                peak = (f", up to {m.peak_rate:.1f}/s in the last {PEAK_WINDOW_S:g} s"
                        if m.peak_rate else "")
                return Verdict(False, f"{plan.describe()} serves at most "
                                      f"{capacity_rps(m.optimizer, plan):.1f} requests/s, "
                                      f"{_arrivals(m):.1f}/s arrive{peak}")
            return switch_verdict(live, plan, m.optimizer, m.estimate, policy,
                                  max_batch_delay_ms, stats=m.stats, stay_s=stay_s, warm=warm,
                                  keeps_up=_live_keeps_up(m))

        warm = shape_of(target) in m.warm_shapes
        best = verdict(m.plan, target, warm)
        if m.draining and not warm:
            # two versions already share the cores: loading a third would slow both
            best = Verdict(False, f"{target.describe()} is cold and an old version still "
                                  "drains")
        if not warm and standby:
            # The best standby plan for B: taken instead of a cold switch to the best plan
            # unless that one is worth its cost over the standby one too.
            alt = min(standby, key=lambda p: p.predicted_ms)
            by_alt = verdict(m.plan, alt, True)
            if by_alt.switch and not (best.switch and verdict(alt, target, False).switch):
                actions.append(SwitchTo(alt, Reason.AUTO, warm=True,
                                        why=f"{by_alt.why}; in standby, unlike "
                                            f"{target.describe()}"))
                continue
        if best.switch:
            actions.append(SwitchTo(target, Reason.AUTO, warm=warm, why=best.why))
        elif (j := best.judgement) is not None and j.relative >= max(policy.min_gain, 1e-9):
            actions.append(Stay(m.name, best.why))  # faster, but not by enough for the cost
    return actions


def _for_the_arrivals(m: ModelView, target: ServedPlan, delay_ms: float) -> ServedPlan:
    """The plan for B; but where the live plan does not keep up with the arrivals and the
    plan for B would not either, the plan for the arrival rate (batch_for_rate; the higher of
    the rate and the peak of the last PEAK_WINDOW_S), predicted at B. B is capped at the most
    the profile serves, and the plan for a larger batch may serve fewer requests per second:
    on bursty small-cnn traffic the plan for B = 64, 2x<t=1,b=32> (547 requests/s by its
    calibrated profile), took bursts of 548/s without a way out, while 2x<t=1,b=8> serves
    685/s: p99 114 s, 2,915 requests dropped. Only a plan of RESCUE_CAPACITY times the live
    plan's capacity, as for the overload rescue: on bursty ResNet-50 traffic a cold switch
    to one of 11% more (2x<t=1,b=1>) took 8.6 s mid-burst, and p99 reached 24 s."""
    if m.rate is None or m.plan is None or _live_keeps_up(m):
        return target
    opt = m.optimizer
    rate = max(m.rate, m.peak_rate or 0.0)
    if OVERLOAD_UTILIZATION * capacity_rps(opt, target) >= rate:
        return target
    by_rate = plan_for_batch(opt, m.name, target.version, batch_for_rate(opt, rate, m.cores),
                             m.cores)
    more = capacity_rps(opt, by_rate)
    if more <= capacity_rps(opt, target) or more < RESCUE_CAPACITY * capacity_rps(opt, m.plan):
        return target
    return plan_of_shape(opt, m.name, target.version, shape_of(by_rate), m.estimate, m.cores,
                         delay_ms)


def _live_keeps_up(m: ModelView) -> bool:
    """The live plan serves the measured arrivals within OVERLOAD_UTILIZATION of its
    capacity (a closed loop's rate sits at the capacity: there it does not)."""
    return (m.plan is not None and m.rate is not None
            and m.rate <= OVERLOAD_UTILIZATION * capacity_rps(m.optimizer, m.plan))


def _keeps_up(m: ModelView, plan: ServedPlan) -> bool:
    """The plan has no less capacity than the live one, or serves the arrivals within
    DOWN_UTILIZATION of its capacity: a plan that is faster at B but serves fewer requests
    per second would queue them (B is an estimate; the arrival rate is measured). The
    arrivals are the higher of the fast and the slow average: the fast one alone dips below
    the line by chance (ResNet-50 at 6.4 requests/s flapped four times in 35 s between plans
    of 14.3 and 7.5 requests/s, each dip followed by an overload), and after a real fall the
    slow one crosses it within a few seconds too. And it serves the peak rate of the last
    PEAK_WINDOW_S within OVERLOAD_UTILIZATION: the next burst would queue on it."""
    if m.rate is None or m.plan is None:
        return True
    capacity = capacity_rps(m.optimizer, plan)
    return (capacity >= capacity_rps(m.optimizer, m.plan)
            or (DOWN_UTILIZATION * capacity >= _arrivals(m)
                and OVERLOAD_UTILIZATION * capacity >= (m.peak_rate or 0.0)))


def _arrivals(m: ModelView) -> float:
    """The arrival rate a plan of less capacity must serve (see _keeps_up)."""
    return max(m.rate or 0.0, m.slow_rate or 0.0)


def _overload_rescue(m: ModelView, standby: list[ServedPlan]) -> SwitchTo | None:
    """When requests arrive near or beyond what the live plan can serve and queue beyond one
    round, a standby plan of more capacity, taken at once (no patience: the queue grows every
    second): among those of RESCUE_CAPACITY times the live plan's capacity or more, the one
    of least queued latency at the rate (policy.queued_latency_ms) if that is under
    RESCUE_GAIN of the live plan's, else, where none keeps up, the one of most capacity. (Capacity alone once took ResNet-50 from 1x<t=2,b=1> to 2x<t=1,b=4> at 92% of
    the live plan's capacity: 8% more capacity, 7x the batch latency, and slower requests.)
    Cold plans are left to the cost rule: loading one on the busy cores would cut the
    capacity further while the queue grows."""
    if m.plan is None or m.rate is None or not standby:
        return None
    opt = m.optimizer
    # (the sure rate sees a burst an interval in; the EWMA, several: it is only the start)
    rate = max(m.rate, m.sure_rate or 0.0)
    live_rps = capacity_rps(opt, m.plan)
    load = m.load if m.load is not None else m.estimate
    if rate <= OVERLOAD_UTILIZATION * live_rps or load <= m.plan.instances * m.plan.batch_size:
        return None
    more = [p for p in standby if capacity_rps(opt, p) >= RESCUE_CAPACITY * live_rps]
    if not more:
        return None
    best = min(more, key=lambda p: (queued_latency_ms(opt, p, rate), p.predicted_ms))
    best_ms = queued_latency_ms(opt, best, rate)
    if math.isfinite(best_ms):
        if best_ms >= RESCUE_GAIN * queued_latency_ms(opt, m.plan, rate):
            return None
        pick = best
    else:
        pick = max(more, key=lambda p: capacity_rps(opt, p))
    return SwitchTo(pick, Reason.OVERLOAD, warm=True,
                    why=f"overloaded: {rate:.1f} requests/s arrive, {m.plan.describe()} "
                        f"serves at most {live_rps:.1f}/s, {pick.describe()} "
                        f"{capacity_rps(m.optimizer, pick):.1f}/s (in standby)")


@dataclass(frozen=True)
class Reconfigure:
    """A `packrat reconfigure` request: `auto`, or the plan for `for_batch`, or a manual
    ⟨instances, threads, batch⟩."""

    model: str
    auto: bool = False
    for_batch: int | None = None
    instances: int | None = None
    threads: int | None = None
    batch: int | None = None
    id: str = ""  # the request file's name, given when the controller reads it

    def to_json(self) -> dict:
        """The request file's content (the id is its name)."""
        out: dict = {"model": self.model}
        if self.auto:
            out["auto"] = True
        for key in ("for_batch", "instances", "threads", "batch"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    @staticmethod
    def from_json(request_id: str, data: object) -> "Reconfigure":
        """Raises PackratError naming what is wrong with the request."""
        if not isinstance(data, dict):
            raise PackratError(f"request {request_id} is not a JSON object")

        def integer(key: str) -> int | None:
            value = data.get(key)
            if value is None:
                return None
            if type(value) is not int:
                raise PackratError(f"{key} must be an integer, got {value!r}")
            return value

        return Reconfigure(str(data.get("model")), bool(data.get("auto")),
                           integer("for_batch"), integer("instances"), integer("threads"),
                           integer("batch"), id=request_id)


def decide_request(models: list[ModelView], request: Reconfigure, now: float,
                   watch_s: float) -> list[Action]:
    """What to do about a reconfigure request. watch_s: after --auto, how long to watch the
    load before deciding (the estimate may still describe the manual period's load)."""
    view = next((m for m in models if m.name == request.model), None)
    if view is None:
        served = ", ".join(m.name for m in models) or "none"
        return [Answer(request.id, False, f"no model {request.model!r} is served; served: "
                                          f"{served}", None)]
    if request.auto:
        return [SetAuto(view.name, now + watch_s),
                Answer(request.id, True, f"{view.name}: automatic reconfiguration on", view.plan)]
    version = str(view.next_version)
    try:
        if request.for_batch is not None:
            opt = view.optimizer
            if not 1 <= request.for_batch <= opt.max_servable:
                raise PlanError(f"--for-batch {request.for_batch}: the profile serves B = 1.."
                                f"{opt.max_servable} on {len(view.cores)} cores")
            plan = plan_for_batch(opt, view.name, version, request.for_batch, view.cores)
        elif None in (request.instances, request.threads, request.batch):
            raise PlanError("give --instances, --threads and --batch together, or --for-batch, "
                            "or --auto")
        else:
            plan = manual_plan(view.optimizer, view.name, version, request.instances,
                               request.threads, request.batch, view.cores)
    except PlanError as e:
        where = f" ({view.placement})" if view.placement else ""
        return [Answer(request.id, False, f"bad request: {e}{where}", view.plan)]
    if plan.same_shape(view.plan):
        return [SetManual(view.name),
                Answer(request.id, True, f"{view.name} already serves {plan.describe()}",
                       view.plan)]
    return [SwitchTo(plan, Reason.MANUAL, request_id=request.id)]
